"""Demo: a small MIRNet on synthetic low-light pairs, trained on a laptop CPU in minutes.

``make demo`` runs ``python -m mirnet_jax.main --config=configs/demo.py --workdir=...``. The data
are made on the fly from scikit-image's sample photographs (no download). The run ends by
printing the validation PSNR of the model and of the dark input itself (WORKDIR/final_metrics.json).

Validation pairs come from held-out bands of the same six photographs the training pairs are
cropped from (see mirnet_jax/data/synthetic.py), so the figure measures enhancement on unseen
pixels of familiar scenes. On an idle 2-core CPU the run takes about a minute (1 min 5 s
measured with `time make demo`, compile included; 2 min 35 s on a machine loaded by other jobs)
and ends about 8 dB above the dark input (tests/test_demo.py asserts at least 3 dB).
"""

import importlib.util
import pathlib

import ml_collections


def _lol_config() -> ml_collections.ConfigDict:
  # configs/ is not a package: load the sibling file by path, as config_flags does.
  spec = importlib.util.spec_from_file_location('lol', pathlib.Path(__file__).with_name('lol.py'))
  lol = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(lol)
  return lol.get_config()


def get_config(arg: str = '') -> ml_collections.ConfigDict:
  """The demo config; ``arg`` is unused (no variants)."""
  if arg:
    raise ValueError(f'configs/demo.py: no variants; got {arg!r}')
  config = _lol_config()

  config.model.num_features = 16  # channels of the full-resolution stream (C0)
  config.model.num_rrg = 1  # recursive residual groups
  config.model.num_mrb = 1  # multi-scale residual blocks per group
  config.model.height = 2  # parallel streams (resolutions 1 and 1/2)
  config.model.width = 2  # columns of DAUs per stream
  config.model.reduction = 4  # channel reduction in channel attention and SKFF

  config.data.name = 'synthetic'  # pairs made from scikit-image sample photographs
  config.data.synthetic_pairs = 128  # train pairs (images)
  config.data.synthetic_eval_pairs = 12  # validation pairs (images): 2 from each photograph
  config.data.synthetic_size = 96  # side of each synthetic image (pixels)
  config.data.synthetic_seed = 0  # seed of the synthetic pairs (integer)
  config.data.crop_size = 64  # training crop side (pixels)
  config.data.mixup = False  # MixUp slows early progress; the demo is short
  config.data.num_workers = 0  # in-process loading: worker start-up costs seconds here
  config.data.eval_batch_size = 4  # global images per eval batch (full resolution)

  config.train.batch_size = 8  # global images per step
  config.train.num_epochs = 0.0  # epochs (0: use num_steps)
  config.train.num_steps = 300  # optimiser steps
  config.train.log_every_steps = 25  # steps between progress lines
  config.train.eval_every_steps = 100  # steps between validations
  config.train.checkpoint_every_steps = 100  # steps between checkpoints
  config.train.num_grid_images = 4  # validation images shown as grids
  config.train.remat = 'none'  # a micro model: memory is no concern, recomputing costs time

  config.optim.learning_rate = 5e-4  # peak learning rate (2.5x the paper's: few steps)
  config.optim.end_learning_rate = 1e-6  # learning rate at the end of the cosine decay
  config.optim.warmup_steps = 20  # linear warm-up (steps)
  config.optim.grad_clip_norm = 1.0  # global-norm clipping: keeps the high rate stable

  config.eval.split = 'validation'  # the synthetic test split is separate photographs
  return config
