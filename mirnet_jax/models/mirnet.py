"""MIRNet (Zamir et al., ECCV 2020, Sec. 3, Fig. 1): MRB, RRG and the full network.

Identical to the official implementation (swz30/MIRNet, ``networks/MIRNet_model.py``),
including its three weight-sharing quirks (see ../shared/fixtures/mirnet_official/README.md):
1. the DAU of a stream is one module applied in every column (``[DAU(c)] * width``);
2. one PReLU slope is shared by every DAU of the network (``dau_prelu/slope``);
3. the output fusion of each MRB reuses the stream-0 SKFF of the mesh (``skff_0``).
"""

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from mirnet_jax.models import layers, mirnet_v2, ops

Dtype = Any
# config.train.remat: what the backward pass recomputes instead of keeping (nn.remat).
#   'none': nothing; 'mrb': each MRB keeps only its input and is run again in the backward
#   pass (one extra forward); 'rrg': each RRG keeps only its input, and its MRBs are
#   rematerialised inside it (two extra forwards; on XLA:CPU no less memory than 'mrb': the
#   backward pass of one MRB sets the peak either way, README Performance).
REMAT = ('none', 'mrb', 'rrg')
# float16 is left out on purpose: without loss scaling its gradients overflow to Inf while the
# loss stays finite (issue 11); config_checks refuses it by name before anything runs.
_DTYPES = {'float32': jnp.float32, 'bfloat16': jnp.bfloat16}


def stream_features(num_features: int, channel_factor: int, stream: int) -> int:
  """Channels of stream ``stream`` (resolution 1 / 2**stream)."""
  return int(num_features * channel_factor**stream)


class MRB(nn.Module):
  """Multi-scale residual block (Sec. 3.1, Fig. 1): ``height`` parallel streams, ``width``
  columns of DAUs, SKFF fusion between streams, residual. [B, H, W, C] -> same.

  Resampling modules are keyed by (input channels, factor), one module per key reused
  wherever that key is needed, as the official ``down``/``up`` ModuleDicts.
  """

  height: int = 3
  width: int = 2
  channel_factor: int = 2
  reduction: int = 8
  kernel_size: int = 3
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, dau_slope: jax.Array) -> jax.Array:
    c0 = x.shape[-1]
    kw = dict(factor=self.channel_factor, dtype=self.dtype)
    feats = [stream_features(c0, self.channel_factor, j) for j in range(self.height)]
    daus = [
      layers.DAU(self.kernel_size, self.reduction, dtype=self.dtype, name=f'dau_{j}')
      for j in range(self.height)
    ]
    skffs = [
      layers.SKFF(self.reduction, dtype=self.dtype, name=f'skff_{j}') for j in range(self.height)
    ]
    resamplers: dict[str, nn.Module] = {}
    # The mesh resamples column 0's maps with the very modules column 0 used on the same maps
    # (down_C_2 of streams 0 and 1): computed once, so the backward pass also runs once
    # (XLA merges the two forwards anyway, not their two backward passes). Keyed by the map's
    # identity; the map is kept in the entry so that its id cannot be reused.
    done: dict[tuple[int, str], tuple[jax.Array, jax.Array]] = {}

    def resample(t: jax.Array, src: int, dst: int) -> jax.Array:
      """Brings stream ``src``'s map to stream ``dst``'s resolution and channels."""
      if src == dst:
        return t
      kind, scale = ('down', 2 ** (dst - src)) if dst > src else ('up', 2 ** (src - dst))
      key = f'{kind}_{t.shape[-1]}_{scale}'
      if key not in resamplers:
        cls = layers.DownSample if kind == 'down' else layers.UpSample
        resamplers[key] = cls(scale, name=key, **kw)
      if (id(t), key) not in done:
        done[id(t), key] = (t, resamplers[key](t))
      return done[id(t), key][1]

    # Column 0: a cascade from the full-resolution stream downwards.
    streams = [daus[0](x, dau_slope)]
    for j in range(1, self.height):
      streams.append(daus[j](resample(streams[-1], j - 1, j), dau_slope))
    # Columns 1..width-1: every stream fuses all streams (the "mesh"), then its DAU.
    for _ in range(1, self.width):
      fused = [
        skffs[j]([resample(streams[k], k, j) for k in range(self.height)])
        for j in range(self.height)
      ]
      streams = [daus[j](fused[j], dau_slope) for j in range(self.height)]
    # Output: every stream back to full resolution with its own up-sampler, fused by skff_0.
    full = [streams[0]] + [
      layers.UpSample(2**k, name=f'last_up_{k}', **kw)(streams[k]) for k in range(1, self.height)
    ]
    out = layers.Conv(feats[0], 3, dtype=self.dtype, name='conv_out')(skffs[0](full))
    return out + x.astype(self.dtype)


def repeat_blocks(
  parent: nn.Module,
  cls: type[nn.Module],
  kwargs: dict[str, Any],
  prefix: str,
  count: int,
  x: jax.Array,
  dau_slope: jax.Array,
  remat: bool,
) -> jax.Array:
  """``count`` blocks ``cls(**kwargs, name=f'{prefix}_{i}')`` of ``parent``, one after another.

  The blocks differ only in their parameters, so with ``parent.scan_blocks`` they run as one
  ``jax.lax.scan`` over their stacked parameters and XLA compiles the block once, not
  ``count`` times: the paper train step compiles in 62-71 s instead of 109-140 s. It is off
  by default because on XLA:CPU the scanned step runs slower (64 s against 43 s without
  remat, 67 s against 46 s with 'mrb', README Performance): the scan copies its stacked
  activations. Initialisation creates every block under its own name either way, so the
  parameters keep the official layout and checkpoints do not change. ``remat``: each block
  keeps only its input and runs again in the backward pass (``nn.remat``, ``jax.checkpoint``).
  """
  x = x.astype(parent.dtype)  # a scan carry keeps one dtype
  if parent.is_initializing() or not parent.scan_blocks or count == 1:
    make = nn.remat(cls) if remat else cls
    for i in range(count):
      x = make(**kwargs, name=f'{prefix}_{i}')(x, dau_slope)
    return x
  params = parent.variables['params']
  stacked = jax.tree.map(lambda *p: jnp.stack(p), *(params[f'{prefix}_{i}'] for i in range(count)))
  block = cls(**kwargs, parent=None)

  def body(y: jax.Array, p: Any) -> tuple[jax.Array, None]:
    return block.apply({'params': p}, y, dau_slope), None

  if remat:
    body = jax.checkpoint(body, prevent_cse=False)  # a scan's iterations cannot be merged
  return jax.lax.scan(body, x, stacked)[0]


class RRG(nn.Module):
  """Recursive residual group (Sec. 3, Fig. 1): ``num_mrb`` MRBs, a 3x3 conv, residual."""

  num_mrb: int = 2
  height: int = 3
  width: int = 2
  channel_factor: int = 2
  reduction: int = 8
  kernel_size: int = 3
  dtype: Dtype = jnp.float32
  remat_mrb: bool = False  # rematerialise each MRB in the backward pass (config.train.remat)
  scan_blocks: bool = False  # see repeat_blocks

  @nn.compact
  def __call__(self, x: jax.Array, dau_slope: jax.Array) -> jax.Array:
    kwargs = dict(
      height=self.height,
      width=self.width,
      channel_factor=self.channel_factor,
      reduction=self.reduction,
      kernel_size=self.kernel_size,
      dtype=self.dtype,
    )
    y = repeat_blocks(self, MRB, kwargs, 'mrb', self.num_mrb, x, dau_slope, self.remat_mrb)
    y = layers.Conv(x.shape[-1], self.kernel_size, dtype=self.dtype, name='conv')(y)
    return y + x.astype(self.dtype)


class MIRNet(nn.Module):
  """MIRNet for image enhancement (Sec. 3, Fig. 1).

  Input ``x``: float [B, H, W, 3] in [0, 1] with H and W multiples of ``2**(height-1)``
  (use ``pad_to_multiple``/``crop`` for other sizes). Output: ``x`` + the predicted residual,
  [B, H, W, 3], unclamped, in the compute ``dtype``. Parameters are float32.

  The paper configuration (the defaults) has 31,787,419 parameters.
  """

  num_features: int = 64
  num_rrg: int = 3
  num_mrb: int = 2
  height: int = 3
  width: int = 2
  channel_factor: int = 2
  reduction: int = 8
  kernel_size: int = 3
  dtype: Dtype = jnp.float32
  # Training memory, not architecture (REMAT; config.train.remat): left out of model_config.
  remat: str = 'none'
  # How the blocks run, not architecture (repeat_blocks): left out of model_config.
  scan_blocks: bool = False
  # How the train step differentiates 3x3 kernels, 'taps' | 'xla' (ops.py,
  # config.train.conv_kernel_grad): same gradients to float32 rounding; left out of model_config.
  conv_kernel_grad: str = 'taps'

  @property
  def size_multiple(self) -> int:
    """Input height and width must be multiples of this."""
    return 2 ** (self.height - 1)

  def check_input(self, shape: tuple[int, ...]) -> None:
    """Raises a ValueError explaining what is wrong with an input shape."""
    if len(shape) != 4 or shape[-1] != 3:
      raise ValueError(f'MIRNet expects images [batch, height, width, 3]; got shape {shape}')
    m = self.size_multiple
    if shape[1] % m or shape[2] % m:
      raise ValueError(
        f'MIRNet with height={self.height} needs image height and width that are multiples '
        f'of {m}; got {shape[1]}x{shape[2]}. Pad with mirnet_jax.models.pad_to_multiple '
        f'(reflect) and crop the output back with mirnet_jax.models.crop.'
      )

  @nn.compact
  @ops.traced_with_kernel_grad  # the kernel gradients' form, chosen at trace time
  def __call__(self, x: jax.Array) -> jax.Array:
    self.check_input(x.shape)
    if self.height < 1 or self.width < 1 or self.num_rrg < 1 or self.num_mrb < 1:
      raise ValueError('MIRNet needs num_rrg, num_mrb, height and width of at least 1')
    dau_slope = self.param('dau_prelu', nn.initializers.constant(layers.PRELU_INIT), ())
    conv = lambda c, name: layers.Conv(c, self.kernel_size, dtype=self.dtype, name=name)
    kwargs = dict(
      num_mrb=self.num_mrb,
      height=self.height,
      width=self.width,
      channel_factor=self.channel_factor,
      reduction=self.reduction,
      kernel_size=self.kernel_size,
      dtype=self.dtype,
      remat_mrb=self.remat != 'none',
      scan_blocks=self.scan_blocks,
    )
    y = conv(self.num_features, 'conv_in')(x)
    y = repeat_blocks(self, RRG, kwargs, 'rrg', self.num_rrg, y, dau_slope, self.remat == 'rrg')
    return conv(3, 'conv_out')(y) + x.astype(self.dtype)


# config.model.arch -> the Linen class it builds. A config or model.json without ``arch``
# predates MIRNet-v2 and means MIRNet, so old exports and checkpoints keep loading.
ARCHITECTURES = {'mirnet': MIRNet, 'mirnet_v2': mirnet_v2.MIRNetV2}
DEFAULT_ARCH = 'mirnet'
Model = MIRNet | mirnet_v2.MIRNetV2


# How a model trains or runs, not what it computes: never part of model_config.
_NOT_ARCHITECTURE = {'parent', 'name', 'remat', 'scan_blocks', 'conv_kernel_grad'}


def _fields(cls: type) -> set[str]:
  return set(cls.__dataclass_fields__) - _NOT_ARCHITECTURE


def create_model(model_config: Any, remat: str = 'none', conv_kernel_grad: str = 'auto') -> Model:
  """Builds the network from the ``config.model`` section (a mapping; dtype given by name).

  ``arch`` picks the architecture ('mirnet' when absent); the other keys are the
  constructor's attributes of that architecture. ``remat`` (``config.train.remat``, one of
  ``REMAT``) only changes what training keeps in memory, and ``conv_kernel_grad``
  (``config.train.conv_kernel_grad``, one of ``ops.KERNEL_GRADS``; 'auto' is resolved here, by
  the default backend) only how the kernel gradients are computed: never the outputs or the
  parameters.
  """
  if remat not in REMAT:
    raise ValueError(f'config.train.remat: unknown value {remat!r}; known: {list(REMAT)}')
  kernel_grad = ops.resolve_kernel_grad(conv_kernel_grad)
  fields = dict(model_config)
  arch = fields.pop('arch', DEFAULT_ARCH)
  if arch not in ARCHITECTURES:
    raise ValueError(
      f'config.model.arch: unknown architecture {arch!r}; known: {sorted(ARCHITECTURES)}'
    )
  cls = ARCHITECTURES[arch]
  dtype = fields.pop('dtype', 'float32')
  if isinstance(dtype, str):
    if dtype not in _DTYPES:
      raise ValueError(f'config.model.dtype: unknown dtype {dtype!r}; known: {sorted(_DTYPES)}')
    dtype = _DTYPES[dtype]
  known = _fields(cls) - {'dtype'}
  unknown = sorted(set(fields) - known)
  if unknown:
    raise ValueError(
      f'config.model: unknown keys {unknown} for config.model.arch={arch!r}; '
      f'known: {sorted(known | {"arch", "dtype"})}'
    )
  model = cls(dtype=dtype, remat=remat, conv_kernel_grad=kernel_grad, **fields)
  if isinstance(model, mirnet_v2.MIRNetV2):
    model.check_config()
  return model


def architecture(model: Model) -> str:
  """The ``config.model.arch`` name of a model."""
  return next(name for name, cls in ARCHITECTURES.items() if type(model) is cls)


def model_config(model: Model) -> dict[str, Any]:
  """The complete ``config.model`` fields of ``model`` (``arch`` and dtype by name included):
  what ``create_model`` rebuilds it from, and a canonical form for comparing configs."""
  names = {v: k for k, v in _DTYPES.items()}
  fields = {f: getattr(model, f) for f in sorted(_fields(type(model)) - {'dtype'})}
  return {'arch': architecture(model), **fields, 'dtype': names[jnp.dtype(model.dtype).type]}


def param_shapes(model: Model, image_size: tuple[int, int] | None = None) -> Any:
  """The parameter pytree as ShapeDtypeStructs, without running an initialisation."""
  m = model.size_multiple
  h, w = image_size or (m, m)
  x = jax.ShapeDtypeStruct((1, h, w, 3), jnp.float32)
  return jax.eval_shape(model.init, jax.random.key(0), x)['params']


def stream_shapes(model: Model, batch: int, height: int, width: int) -> list[tuple[int, ...]]:
  """[B, H, W, C] of each stream of ``model`` for a batch x height x width input: the inputs
  of the 3x3 convolutions, which dominate the step (the kernel gradients' timing shapes)."""
  if isinstance(model, mirnet_v2.MIRNetV2):
    channels = mirnet_v2.stream_channels(model.num_features, model.channel_factor)
  else:
    channels = [
      stream_features(model.num_features, model.channel_factor, j) for j in range(model.height)
    ]
  return [(batch, height // 2**j, width // 2**j, c) for j, c in enumerate(channels)]


def count_params(params: Any) -> int:
  """Number of scalars in a parameter pytree (arrays or ShapeDtypeStructs)."""
  return int(sum(np.prod(p.shape, dtype=np.int64) for p in jax.tree.leaves(params)))


def pad_to_multiple(x: Any, multiple: int) -> tuple[Any, tuple[int, int]]:
  """Reflect-pads [B, H, W, C] (or [H, W, C]) at the bottom/right to multiples of ``multiple``.

  Returns the padded array and the original (H, W), for ``crop``. Works on numpy and jax
  arrays alike; images smaller than the padding fall back to symmetric padding.
  """
  xp = jnp if isinstance(x, jax.Array) else np
  h, w = x.shape[-3], x.shape[-2]
  ph, pw = -h % multiple, -w % multiple
  if not ph and not pw:
    return x, (h, w)
  pad = [(0, 0)] * (x.ndim - 3) + [(0, ph), (0, pw), (0, 0)]
  mode = 'reflect' if ph < h and pw < w else 'symmetric'
  return xp.pad(x, pad, mode=mode), (h, w)


def crop(x: Any, size: tuple[int, int]) -> Any:
  """Crops [..., H, W, C] back to ``size`` = (H, W), undoing ``pad_to_multiple``."""
  return x[..., : size[0], : size[1], :]
