"""MIRNet-v2 on LoL: the official recipe (swz30/MIRNetv2, Enhancement/Options/
Enhancement_MIRNet_v2_Lol.yml; Zamir et al., TPAMI 2022) and its fixed-patch variant.

Variants are chosen with the config argument, e.g. ``--config=configs/lol_v2.py:fixed``:
  ''       the option file: MIRNet-v2 80 channels x 1.5, 4 RRGs x 2 MRBs (5,858,560
           parameters); 150k steps of progressive training, crops 128/160/192/256/320/384 with
           global batches 64/40/32/16/8/8 for 46k/32k/24k/18k/18k/12k steps; Adam(0.9, 0.999)
           at 2e-4 under BasicSR's CosineAnnealingRestartCyclicLR (periods 46k/104k, minima
           3e-4/1e-6: the rate rises from 2e-4 to 3e-4 over the first cycle, then restarts at
           2e-4 and decays to 1e-6); gradients clipped to global norm 0.01; L1 loss; 8 dihedral
           transforms; MixUp Beta(1.2, 1.2).
  'fixed'  the option file's commented alternative: 128x128 crops, global batch 64, 300k
           steps; the cycles scaled with it to 92k/208k, as the option file's comment states.
Everything else (data, eval, predict, checkpoints) is configs/lol.py's; every key is
overridable on the command line, e.g. ``--config.train.num_steps=1000``.
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


def model_config() -> ml_collections.ConfigDict:
  """The published MIRNet-v2 (``MIRNet_v2()``, 5,858,560 parameters)."""
  model = ml_collections.ConfigDict()
  model.arch = 'mirnet_v2'  # 'mirnet' | 'mirnet_v2' (see configs/lol.py)
  model.num_features = 80  # channels of the full-resolution stream (C0)
  model.channel_factor = 1.5  # channel multiplier per stream: 80/120/180 (dimensionless)
  model.num_mrb = 2  # multi-scale residual blocks per RRG (there are always 4 RRGs)
  model.reduction = 8  # channel reduction in the SKFFs
  model.dtype = 'float32'  # compute dtype: 'float32' or 'bfloat16' (parameters stay float32)
  return model


def get_config(arg: str = '') -> ml_collections.ConfigDict:
  """Returns the training/eval config; ``arg`` picks a variant (see module docstring)."""
  config = _lol_config()
  config.model = model_config()

  config.data.crop_size = 128  # crop side without stages; the stage table below overrides it
  config.data.mixup = True  # MixUp (BasicSR mixing_augs.mixup)
  config.data.mixup_alpha = 1.2  # Beta(alpha, alpha) of the MixUp weight (mixup_beta)
  config.data.mixup_start_step = 0  # BasicSR mixes from the first iteration (steps)
  # 'per_image' (MIRNet: a lambda per image, every batch) | 'batch_or_identity' (BasicSR's
  # Mixing_Augment with use_identity: one lambda per batch, applied to half the batches).
  config.data.mixup_mode = 'batch_or_identity'

  config.train.batch_size = 64  # global batch without stages (8 GPUs x 8 in the option file)
  config.train.num_epochs = 0.0  # the recipe counts iterations (0: use num_steps)
  config.train.num_steps = 150_000  # total_iter (steps)
  # MIRNet-v2 is measured without remat (README, Performance: 19.1 s, 5.2 GiB at 4 x 128x128);
  # 'mrb' or 'rrg' (configs/lol.py) trade time for memory as for MIRNet.
  config.train.remat = 'none'
  # Progressive training (datasets.train.iters / gt_sizes / mini_batch_sizes x 8 GPUs): stage
  # j runs stage_steps[j] steps of stage_crop_sizes[j]-pixel crops in global batches of
  # stage_batch_sizes[j]; the last stage runs to num_steps. Empty tuples: no stages.
  config.train.stage_steps = (46_000, 32_000, 24_000, 18_000, 18_000, 12_000)  # (steps)
  config.train.stage_crop_sizes = (128, 160, 192, 256, 320, 384)  # (pixels)
  config.train.stage_batch_sizes = (64, 40, 32, 16, 8, 8)  # (global images per step)

  config.optim.learning_rate = 2e-4  # Adam base rate (optim_g.lr)
  config.optim.warmup_steps = 0  # warmup_iter -1: no warm-up (steps)
  config.optim.beta1 = 0.9  # Adam first-moment decay (dimensionless)
  config.optim.beta2 = 0.999  # Adam second-moment decay (dimensionless)
  config.optim.weight_decay = 0.0  # plain Adam (the option file's weight decay is commented out)
  config.optim.grad_clip_norm = 0.01  # use_grad_clip: clip_grad_norm_(params, 0.01)
  # 'warmup_cosine' (configs/lol.py) | 'cosine_restart_cyclic' (BasicSR's
  # CosineAnnealingRestartCyclicLR, mirnet_jax/schedules.py; end_learning_rate is unused).
  config.optim.schedule = 'cosine_restart_cyclic'
  config.optim.restart_periods = (46_000, 104_000)  # length of each cosine cycle (steps)
  config.optim.restart_weights = (1.0, 1.0)  # scale of each cycle (dimensionless)
  config.optim.restart_eta_mins = (3e-4, 1e-6)  # minimum of each cycle (learning rate)

  config.loss.name = 'l1'  # pixel_opt: L1Loss, mean
  config.loss.clamp_output = False  # BasicSR takes the loss on the raw output (MIRNet clamps)

  if arg == 'fixed':
    config.train.num_steps = 300_000  # iters: [300000]
    config.train.stage_steps = (300_000,)  # one stage (steps)
    config.train.stage_crop_sizes = (128,)  # gt_sizes: [128] (pixels)
    config.train.stage_batch_sizes = (64,)  # mini_batch_sizes: [8] x 8 GPUs (images)
    config.optim.restart_periods = (92_000, 208_000)  # the option file's 300k split (steps)
  elif arg:
    raise ValueError(f'configs/lol_v2.py: unknown variant {arg!r}; known: "" (official), "fixed"')
  return config
