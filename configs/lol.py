"""MIRNet on LoL: the paper recipe (Zamir et al., ECCV 2020, Sec. 4) and its variants.

Variants are chosen with the config argument, e.g. ``--config=configs/lol.py:seed``:
  ''      the paper recipe: MIRNet 64/3/2, height 3, width 2, 128x128 crops, global batch 16,
          Adam(0.9, 0.999) at 2e-4, linear warm-up then cosine decay to 1e-6, Charbonnier loss.
  'seed'  the seed project's recipe: batch 4 of 128x128 crops, lr 2e-4, 50 epochs.
Every key is overridable on the command line, e.g. ``--config.optim.learning_rate=1e-4``.
"""

import ml_collections

LOL_TRAIN_IMAGES = 385  # pairs in the LoL train split (our485 minus 100 validation pairs)


def model_config() -> ml_collections.ConfigDict:
  """The paper configuration of MIRNet (31,787,419 parameters)."""
  model = ml_collections.ConfigDict()
  # 'mirnet' (this file, ECCV 2020) | 'mirnet_v2' (configs/lol_v2.py, TPAMI 2022); the other
  # model keys are that architecture's. Configs and model.json files without it mean 'mirnet'.
  model.arch = 'mirnet'
  model.num_features = 64  # channels of the full-resolution stream (C0)
  model.num_rrg = 3  # recursive residual groups
  model.num_mrb = 2  # multi-scale residual blocks per group
  model.height = 3  # parallel streams (resolutions 1, 1/2, 1/4, ...)
  model.width = 2  # columns of DAUs per stream
  model.channel_factor = 2  # channel multiplier from one stream to the next (paper: 2)
  model.reduction = 8  # channel reduction in channel attention and SKFF
  model.kernel_size = 3  # spatial size of the body convolutions
  model.dtype = 'float32'  # compute dtype: 'float32' or 'bfloat16' (parameters stay float32)
  return model


def get_config(arg: str = '') -> ml_collections.ConfigDict:
  """Returns the training/eval config; ``arg`` picks a variant (see module docstring)."""
  config = ml_collections.ConfigDict()
  config.seed = 0  # root PRNG seed (integer); data and dropout keys fold from it
  # Persistent XLA compilation cache, local or gs:// ('' = off, unless $JAX_COMPILATION_CACHE_DIR
  # names one): a rerun or resume loads the compiled train and eval steps instead of compiling.
  config.jax_compilation_cache_dir = ''
  config.model = model_config()

  config.data = ml_collections.ConfigDict()
  config.data.name = 'lol'  # 'lol' | 'sice' (TFDS), 'folder' (low/ + high/), 'synthetic'
  config.data.data_dir = ''  # TFDS data_dir ('' = TFDS default, ~/tensorflow_datasets)
  config.data.folder = ''  # name='folder': directory holding low/ and high/
  config.data.validation_folder = ''  # name='folder': separate validation dir ('' = split off)
  config.data.validation_percent = 10.0  # name='folder': % of pairs held out when no folder given
  config.data.synthetic_pairs = 64  # name='synthetic': number of pairs made (images)
  config.data.synthetic_size = 128  # name='synthetic': image side (pixels, at most 150)
  config.data.synthetic_eval_pairs = 8  # name='synthetic': pairs in validation and in test (images)
  config.data.synthetic_seed = 0  # name='synthetic': seed of the pairs (integer; fixed per split)
  config.data.crop_size = 128  # training crop side (pixels)
  config.data.mixup = True  # MixUp of training pairs (one lambda for low and high)
  config.data.mixup_alpha = 1.2  # Beta(alpha, alpha) of the MixUp lambda
  config.data.mixup_start_step = 0  # first train step that applies MixUp (steps)
  # 'per_image' (MIRNet: a lambda per image, every batch) | 'batch_or_identity' (BasicSR's
  # Mixing_Augment with use_identity, MIRNet-v2: one lambda per batch, half the batches).
  config.data.mixup_mode = 'per_image'
  config.data.num_workers = 2  # grain worker processes per host (0 = in-process)
  config.data.eval_batch_size = 4  # global images per eval batch (full resolution)
  config.data.cache = False  # decode every record of each split once into host memory (bool)

  config.train = ml_collections.ConfigDict()
  config.train.batch_size = 16  # global images per step, split over all devices
  config.train.num_epochs = 0.0  # epochs over the train split; when > 0 it overrides num_steps
  config.train.num_steps = 100_000  # optimiser steps when num_epochs == 0 (steps)
  config.train.log_every_steps = 50  # steps between scalar summaries and progress lines
  config.train.eval_every_steps = 1_000  # steps between validations (0 = only at the end)
  config.train.checkpoint_every_steps = 1_000  # steps between checkpoints (and at each eval)
  config.train.keep_checkpoints = 2  # latest checkpoints kept (plus the best by eval PSNR)
  config.train.num_grid_images = 4  # validation images shown as low | enhanced | high grids
  config.train.init_from = ''  # converted-weights dir or another run's workdir ('' = random)
  # What the backward pass recomputes instead of keeping in memory (memory, not architecture: a
  # run resumes under another value). 'none': keeps every activation; 'mrb': keeps only each
  # MRB's input and recomputes the MRB (one extra MRB forward per step); 'rrg': keeps only each
  # RRG's input, with its MRBs rematerialised inside (two extra forwards). Paper step at
  # 4 x 128x128 on the README's 2-core CPU: 'none' 43 s, XLA plan 7.9 GiB; 'mrb' 46 s,
  # 2.5 GiB (README, Performance), hence the default.
  config.train.remat = 'mrb'
  # How the backward pass computes the kernel gradients of the 3x3 convolutions (the same
  # gradients to float32 rounding; models/ops.py). 'taps': one GEMM per kernel tap; 'xla':
  # XLA's own convolution rule; 'auto': XLA's rule on GPU and TPU; on CPU, where which is
  # faster depends on the CPU (README, Performance), a fresh run times both (a few seconds)
  # and takes XLA's rule where the taps take over 1.25x as long, and a resumed run keeps the
  # form its checkpoint was trained with. Name one to pin it; `python -m mirnet_jax.benchmark
  # --mode=kernel_grad` times both here.
  config.train.conv_kernel_grad = 'auto'
  # jax.profiler trace of this many steps into WORKDIR/plugins/profile/ (TensorBoard's Profile
  # tab under --logdir=WORKDIR; process 0 only). 0 = off.
  config.train.profile_steps = 0  # (steps)
  config.train.profile_start_step = 5  # steps of this run before the trace (compile, warm-up)
  # Progressive training (MIRNet-v2, configs/lol_v2.py): stage j runs stage_steps[j] steps of
  # stage_crop_sizes[j]-pixel crops in global batches of stage_batch_sizes[j]; the last stage
  # runs to the end. Empty: no stages (data.crop_size and train.batch_size throughout).
  config.train.stage_steps = ()  # steps per stage (steps)
  config.train.stage_crop_sizes = ()  # training crop side per stage (pixels)
  config.train.stage_batch_sizes = ()  # global images per step per stage (images)

  config.optim = ml_collections.ConfigDict()
  config.optim.learning_rate = 2e-4  # peak learning rate (per step, Adam)
  config.optim.end_learning_rate = 1e-6  # learning rate at the end of the cosine decay
  config.optim.warmup_steps = 3 * LOL_TRAIN_IMAGES // 16  # linear warm-up from 0 (steps)
  config.optim.beta1 = 0.9  # Adam first-moment decay (dimensionless)
  config.optim.beta2 = 0.999  # Adam second-moment decay (dimensionless)
  config.optim.weight_decay = 0.0  # decoupled weight decay per step (AdamW; 0 = plain Adam)
  config.optim.grad_clip_norm = 0.0  # global L2 norm gradients are clipped to (0 = off)
  # 'warmup_cosine' (warmup_steps, then cosine to end_learning_rate) | 'cosine_restart_cyclic'
  # (BasicSR's CosineAnnealingRestartCyclicLR over the restart_* keys, configs/lol_v2.py).
  config.optim.schedule = 'warmup_cosine'
  config.optim.restart_periods = ()  # cosine_restart_cyclic: length of each cycle (steps)
  config.optim.restart_weights = ()  # cosine_restart_cyclic: scale of each cycle (dimensionless)
  config.optim.restart_eta_mins = ()  # cosine_restart_cyclic: minimum of each cycle (rate)

  config.loss = ml_collections.ConfigDict()
  config.loss.name = 'charbonnier'  # 'charbonnier' | 'l1' | 'mse' | 'rmse'
  config.loss.charbonnier_eps = 1e-3  # epsilon of the Charbonnier loss (image units, [0, 1])
  config.loss.clamp_output = True  # loss on the output clamped to [0, 1] (MIRNet; bool)

  config.eval = ml_collections.ConfigDict()
  config.eval.checkpoint = 'best'  # 'best' | 'latest' | a step | a converted-weights directory
  config.eval.split = 'test'  # split to evaluate
  config.eval.output_dir = ''  # '' = WORKDIR/eval/<split>/
  config.eval.method = 'model'  # 'model' | 'identity' | 'autocontrast' | 'equalize' | 'gamma'
  config.eval.gamma = 0.4  # exponent of the 'gamma' baseline (output = input ** gamma)
  config.eval.save_images = False  # also write the enhanced images
  config.eval.gt_mean = False  # also report GT-mean corrected figures (separate keys)
  config.eval.num_grids = 16  # low | enhanced | high grid PNGs written (images; -1 = all)

  config.predict = ml_collections.ConfigDict()
  config.predict.checkpoint = 'best'  # as eval.checkpoint
  config.predict.tile_size = 1024  # tile side for large images (pixels; 0 = never tile)
  config.predict.tile_overlap = 64  # overlap between tiles (pixels)
  config.predict.bucket = 128  # inputs padded up to multiples of this: fewer compiles (pixels)
  config.predict.max_tile_megapixels = 0.6  # largest tile (megapixels; 0 = tile_size only)
  config.predict.format = 'png'  # 'png' | 'jpeg'
  config.predict.jpeg_quality = 95  # JPEG quality (1-100)

  if arg == 'seed':
    config.train.batch_size = 4
    config.train.num_epochs = 50.0
    config.optim.warmup_steps = 0
  elif arg:
    raise ValueError(f'configs/lol.py: unknown variant {arg!r}; known: "" (paper), "seed"')
  return config
