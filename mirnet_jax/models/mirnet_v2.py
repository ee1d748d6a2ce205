"""MIRNet-v2 (Zamir et al., "Learning Enriched Features for Fast Image Restoration and
Enhancement", TPAMI 2022, Sec. 3, Fig. 2) in Flax Linen, NHWC.

Identical to the official implementation (swz30/MIRNetv2, ``basicsr/models/archs/
mirnet_v2_arch.py``, class ``MIRNet_v2``; see ../shared/fixtures/mirnetv2_official/README.md):
- always four RRGs, whose RCB convolutions use 1, 2, 4 and 4 groups (``RRG_GROUPS``), and
  three streams of two columns in every MRB (the official constructor ignores n_RRG, height
  and width);
- the second column of an MRB reuses the first column's three RCBs and two SKFFs, with fresh
  up-samplers (``up21_2``, ``up32_2``); the lowest stream goes through its RCB twice with no
  fusion in between;
- LeakyReLU(0.2) everywhere, no biases, 2-input SKFFs without a PReLU.

Shared with MIRNet (mirnet_jax/models/layers.py): ``Conv`` (grouped here), ``SKFF``,
``bilinear_up2`` and ``global_avg_pool``. Parameters are float32; every block computes in
``dtype``.
"""

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from mirnet_jax.models import layers, ops

Dtype = Any
RRG_GROUPS = (1, 2, 4, 4)  # convolution groups of the RCBs of RRG 0..3 (fixed by the paper)
SIZE_MULTIPLE = 4  # two x2 down-samplings: inputs must be multiples of 4 (the official test pads)


def stream_channels(num_features: int, channel_factor: float) -> tuple[int, int, int]:
  """Channels of the full-, 1/2- and 1/4-resolution streams, as the official RCBs get them."""
  return tuple(int(num_features * channel_factor**j) for j in range(3))


def avg_pool2(x: jax.Array) -> jax.Array:
  """``nn.AvgPool2d(2, ceil_mode=True, count_include_pad=False)`` on even sizes: 2x2 means.

  MIRNetV2 only pools maps whose sides are even (inputs are multiples of 4), where the
  official ceil mode never forms a partial window.
  """
  b, h, w, c = x.shape
  return x.reshape(b, h // 2, 2, w // 2, 2, c).mean(axis=(2, 4))


class ContextBlock(nn.Module):
  """Global context block (GCNet, Cao et al. 2019) of the RCB (Sec. 3.1, Fig. 3).

  mask = 1x1 conv C->1, softmax over all H*W positions; context = the mask-weighted sum of
  the map (a C-vector); transform = 1x1 conv, LeakyReLU(0.2), 1x1 conv; added to every
  position. [B, H, W, C] -> same.
  """

  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    b, h, w, c = x.shape
    logits = layers.Conv(1, 1, dtype=self.dtype, name='mask')(x).reshape(b, h * w)
    # The softmax over up to 10^5 positions and the weighted sum are taken in float32 so that
    # bfloat16 compute keeps the attention weights exact enough to sum to one.
    weights = jax.nn.softmax(logits.astype(jnp.float32), axis=-1)
    context = jnp.einsum(
      'bpc,bp->bc',
      x.reshape(b, h * w, c),
      weights.astype(x.dtype),
      preferred_element_type=jnp.float32,
    ).reshape(b, 1, 1, c)
    t = layers.Conv(c, 1, dtype=self.dtype, name='add_0')(context)
    t = layers.Conv(c, 1, dtype=self.dtype, name='add_1')(layers.leaky_relu(t))
    return x + t


class RCB(nn.Module):
  """Residual contextual block (Sec. 3.1, Fig. 3): two grouped 3x3 convs with a LeakyReLU
  between, the context block, LeakyReLU, plus the input. [B, H, W, C] -> same."""

  groups: int = 1
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    c = x.shape[-1]
    conv = lambda name: layers.Conv(c, 3, groups=self.groups, dtype=self.dtype, name=name)
    r = conv('conv_1')(layers.leaky_relu(conv('conv_0')(x)))
    r = layers.leaky_relu(ContextBlock(dtype=self.dtype, name='context')(r))
    return r + x.astype(self.dtype)


class Down(nn.Module):
  """Down-sampling (Sec. 3.2): 2x2 average pooling, then a 1x1 conv to ``features``."""

  features: int
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    return layers.Conv(self.features, 1, dtype=self.dtype, name='conv')(avg_pool2(x))


class Up(nn.Module):
  """Up-sampling (Sec. 3.2): a 1x1 conv to ``features``, then x2 bilinear (align_corners
  False). The conv runs at the low resolution, as in the official code."""

  features: int
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    return layers.bilinear_up2(layers.Conv(self.features, 1, dtype=self.dtype, name='conv')(x))


class MRB(nn.Module):
  """Multi-scale residual block of MIRNet-v2 (Sec. 3, Fig. 2): three streams, two columns of
  RCBs, top-down 2-input SKFF fusion after each column, a 1x1 conv, residual.

  The RCBs and SKFFs of the second column are those of the first (shared weights); each
  column has its own up-samplers. [B, H, W, C0] -> same.
  """

  channel_factor: float = 1.5
  groups: int = 1
  reduction: int = 8
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    c0, c1, c2 = stream_channels(x.shape[-1], self.channel_factor)
    kw = dict(dtype=self.dtype)
    rcbs = [RCB(self.groups, name=f'rcb_{s}', **kw) for s in ('top', 'mid', 'bot')]
    skff_mid = layers.SKFF(self.reduction, activation='leaky_relu', name='skff_mid', **kw)
    skff_top = layers.SKFF(self.reduction, activation='leaky_relu', name='skff_top', **kw)

    top = x
    mid = Down(c1, name='down2', **kw)(x)
    bot = Down(c2, name='down4_1', **kw)(Down(c1, name='down4_0', **kw)(x))
    for column in (1, 2):
      top, mid, bot = (rcb(t) for rcb, t in zip(rcbs, (top, mid, bot), strict=True))
      mid = skff_mid([mid, Up(c1, name=f'up32_{column}', **kw)(bot)])
      top = skff_top([top, Up(c0, name=f'up21_{column}', **kw)(mid)])
    return layers.Conv(c0, 1, name='conv_out', **kw)(top) + x.astype(self.dtype)


class RRG(nn.Module):
  """Recursive residual group: ``num_mrb`` MRBs, a 3x3 conv, residual."""

  num_mrb: int = 2
  channel_factor: float = 1.5
  groups: int = 1
  reduction: int = 8
  dtype: Dtype = jnp.float32
  remat_mrb: bool = False  # rematerialise each MRB in the backward pass (config.train.remat)

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    mrb_cls = nn.remat(MRB) if self.remat_mrb else MRB
    y = x
    for m in range(self.num_mrb):
      y = mrb_cls(self.channel_factor, self.groups, self.reduction, self.dtype, name=f'mrb_{m}')(y)
    return layers.Conv(x.shape[-1], 3, dtype=self.dtype, name='conv')(y) + x.astype(self.dtype)


class MIRNetV2(nn.Module):
  """MIRNet-v2 for image enhancement (Zamir et al., TPAMI 2022).

  Input ``x``: float [B, H, W, 3] in [0, 1] with H and W multiples of 4 (use
  ``pad_to_multiple``/``crop`` for other sizes). Output: ``x`` + the predicted residual,
  [B, H, W, 3], unclamped, in the compute ``dtype``. Parameters are float32.

  The published configuration (the defaults) has 5,858,560 parameters.
  """

  num_features: int = 80
  channel_factor: float = 1.5
  num_mrb: int = 2
  reduction: int = 8
  dtype: Dtype = jnp.float32
  # Training memory, not architecture (mirnet.REMAT, config.train.remat): 'none' | 'mrb' |
  # 'rrg'; left out of model_config.
  remat: str = 'none'
  # 'taps' | 'xla' (ops.py, config.train.conv_kernel_grad); left out of model_config.
  conv_kernel_grad: str = 'taps'

  @property
  def size_multiple(self) -> int:
    """Input height and width must be multiples of this."""
    return SIZE_MULTIPLE

  def check_config(self) -> None:
    """Raises a ValueError when the channel arithmetic of the official model does not close."""
    c0, c1, c2 = stream_channels(self.num_features, self.channel_factor)
    f = self.channel_factor
    # The official model derives the same channel counts in two ways (down-samplers by
    # int(C * f) per step, up-samplers by int(C // f), RCBs by int(C0 * f**j)); it only runs
    # where they agree, and the grouped convs need every stream divisible by 4.
    if self.num_mrb < 1 or min(c0, c1, c2) < 1:
      raise ValueError('MIRNetV2 needs num_mrb >= 1 and positive channel counts')
    if int(c1 * f) != c2 or int(c2 // f) != c1 or int(c1 // f) != c0:
      raise ValueError(
        f'MIRNetV2(num_features={self.num_features}, channel_factor={f}): streams of '
        f'{c0}/{c1}/{c2} channels do not match the resampling channel counts'
      )
    if any(c % max(RRG_GROUPS) for c in (c0, c1, c2)):
      raise ValueError(
        f'MIRNetV2(num_features={self.num_features}, channel_factor={f}): stream channels '
        f'{c0}/{c1}/{c2} must be multiples of {max(RRG_GROUPS)} (grouped convolutions)'
      )

  def check_input(self, shape: tuple[int, ...]) -> None:
    """Raises a ValueError explaining what is wrong with an input shape."""
    if len(shape) != 4 or shape[-1] != 3:
      raise ValueError(f'MIRNetV2 expects images [batch, height, width, 3]; got shape {shape}')
    m = self.size_multiple
    if shape[1] % m or shape[2] % m:
      raise ValueError(
        f'MIRNetV2 needs image height and width that are multiples of {m}; got '
        f'{shape[1]}x{shape[2]}. Pad with mirnet_jax.models.pad_to_multiple (reflect) and '
        f'crop the output back with mirnet_jax.models.crop.'
      )

  @nn.compact
  @ops.traced_with_kernel_grad  # the kernel gradients' form, chosen at trace time
  def __call__(self, x: jax.Array) -> jax.Array:
    self.check_input(x.shape)
    self.check_config()
    conv = lambda c, name: layers.Conv(c, 3, dtype=self.dtype, name=name)
    rrg_cls = nn.remat(RRG) if self.remat == 'rrg' else RRG
    y = conv(self.num_features, 'conv_in')(x)
    for r, groups in enumerate(RRG_GROUPS):
      y = rrg_cls(
        self.num_mrb,
        self.channel_factor,
        groups,
        self.reduction,
        self.dtype,
        remat_mrb=self.remat != 'none',
        name=f'rrg_{r}',
      )(y)
    return conv(3, 'conv_out')(y) + x.astype(self.dtype)
