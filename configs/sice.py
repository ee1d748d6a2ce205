"""MIRNet on SICE (Cai et al., TIP 2018): the LoL paper recipe on the SICE builder.

SICE images are large and of mixed sizes: training uses 128x128 crops as on LoL, and validation
runs at full resolution one image per device (images of one size per batch).
Variants: ``''`` (paper model), ``'seed'`` (the seed project's batch 4, 50 epochs).
"""

import importlib.util
import pathlib

import ml_collections


def get_config(arg: str = '') -> ml_collections.ConfigDict:
  """The SICE config; ``arg`` picks a variant of configs/lol.py."""
  # configs/ is not a package: load the sibling file by path, as config_flags does.
  spec = importlib.util.spec_from_file_location('lol', pathlib.Path(__file__).with_name('lol.py'))
  lol = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(lol)
  config = lol.get_config(arg)
  config.data.name = 'sice'  # TFDS builder mirnet_jax/data/sice
  config.data.eval_batch_size = 1  # mixed image sizes: one image per eval batch (images)
  config.train.eval_every_steps = 2_000  # validation at full SICE resolution is slow (steps)
  return config
