"""The paper's building blocks (Zamir et al., ECCV 2020, Sec. 3), NHWC, as the official code;
``Conv``, ``SKFF``, ``bilinear_up2`` and ``global_avg_pool`` also serve MIRNet-v2.

Every convolution has no bias, as in the official implementations (`bias=False`).
Parameters are float32; each module casts its inputs and kernels to the compute ``dtype``.

Some blocks are written differently from a literal port, for speed on XLA (the results are
the same to float32 rounding, see tests/test_layers.py):
- 1x1 convolutions are 2-D matmuls: XLA:CPU runs them ~3x faster than a 1x1 `lax.conv`.
- Grouped convolutions are one convolution per group: XLA:CPU's ``feature_group_count``
  path is ~3x slower forward and ~6x slower backward than separate convolutions.
- Blur-pool is reflect padding plus shifted strided slices: the gradient of a depthwise conv
  is ~5x slower than its forward on CPU.
- The stride-2 transposed convolution is four small convolutions, one per output phase,
  followed by depth-to-space, and its gradient two matmuls: the gradient of
  `nn.ConvTranspose` is ~30x slower than its forward on CPU, and the phase form does no
  multiplications by inserted zeros.
"""

from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from mirnet_jax.models import ops

Dtype = Any
# PyTorch's default Conv2d initialisation, U(+-1/sqrt(fan_in)) (kaiming_uniform with a=sqrt(5)).
torch_conv_init = nn.initializers.variance_scaling(1.0 / 3.0, 'fan_in', 'uniform')
PRELU_INIT = 0.25  # PyTorch's nn.PReLU() default slope
LEAKY_SLOPE = 0.2  # negative slope of every LeakyReLU of MIRNet-v2


# PReLU with one slope for all channels (PyTorch ``nn.PReLU()``); its backward pass keeps x only.
prelu = ops.prelu


def leaky_relu(x: jax.Array) -> jax.Array:
  """PyTorch ``nn.LeakyReLU(0.2)``, MIRNet-v2's only activation."""
  return jnp.where(x >= 0, x, LEAKY_SLOPE * x)


matmul_channels = ops.matmul_channels  # [..., C] @ [C, D] as one 2-D matmul


def global_avg_pool(x: jax.Array) -> jax.Array:
  """[B, H, W, C] -> [B, 1, 1, C]; the mean is accumulated in float32."""
  return jnp.mean(x.astype(jnp.float32), axis=(1, 2), keepdims=True).astype(x.dtype)


class Conv(nn.Module):
  """k x k convolution, stride 1, zero padding k//2, no bias; kernel [k, k, in / groups, out].

  With ``groups`` > 1 the channels split into that many independent convolutions (PyTorch
  ``groups``; output channel o sees input group o // (out / groups)), as MIRNet-v2's RCBs use.
  """

  features: int
  kernel_size: int = 3
  groups: int = 1
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, slope: jax.Array | None = None) -> jax.Array:
    """The convolution of ``x``, or of ``prelu(x, slope)`` when a PReLU ``slope`` is given
    (fused so that the backward pass keeps ``x`` alone, ops.conv2d_prelu)."""
    k, g = self.kernel_size, self.groups
    if x.shape[-1] % g or self.features % g:
      raise ValueError(
        f'Conv {self.name}: {x.shape[-1]} -> {self.features} channels do not split into {g} groups'
      )
    kernel = self.param('kernel', torch_conv_init, (k, k, x.shape[-1] // g, self.features))
    kernel = kernel.astype(self.dtype)
    x = x.astype(self.dtype)
    if slope is not None and g == 1:
      if k == 1:
        return ops.matmul_prelu(x, slope, kernel[0, 0])
      return ops.conv2d_prelu(x, slope, kernel)
    if slope is not None:
      x = prelu(x, slope)
    if k == 1 and g == 1:
      return matmul_channels(x, kernel[0, 0])
    if g == 1:
      return ops.conv2d(x, kernel)
    outs = [
      ops.conv2d(xg, kg)
      for xg, kg in zip(jnp.split(x, g, axis=-1), jnp.split(kernel, g, axis=-1), strict=True)
    ]
    return jnp.concatenate(outs, axis=-1)


class PReLU(nn.Module):
  """PyTorch ``nn.PReLU()``: one learnable slope, initialised at 0.25."""

  @nn.compact
  def __call__(self, x: jax.Array | None = None) -> jax.Array:
    """``prelu(x)``; with no ``x``, the slope itself, for a ``Conv`` that fuses the PReLU."""
    slope = self.param('slope', nn.initializers.constant(PRELU_INIT), ())
    return slope if x is None else prelu(x, slope)


def blur_pool(x: jax.Array) -> jax.Array:
  """Anti-aliased stride-2 down-sampling (Zhang, ICML 2019), as the official `downsamp`.

  Reflect-pad 1, depthwise [1, 2, 1] x [1, 2, 1] / 16 filter, stride 2: [B, H, W, C] ->
  [B, ceil(H/2), ceil(W/2), C]. The filter is separable, applied as shifted strided slices.
  """
  x = jnp.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)), mode='reflect')
  h, w = (x.shape[1] - 1) // 2, (x.shape[2] - 1) // 2
  x = (x[:, 0 : 2 * h : 2] + 2 * x[:, 1 : 2 * h + 1 : 2] + x[:, 2 : 2 * h + 2 : 2]) / 4
  return (x[:, :, 0 : 2 * w : 2] + 2 * x[:, :, 1 : 2 * w + 1 : 2] + x[:, :, 2 : 2 * w + 2 : 2]) / 4


def bilinear_up2(x: jax.Array) -> jax.Array:
  """x2 bilinear up-sampling with align_corners=False (PyTorch ``nn.Upsample``), [B, 2H, 2W, C].

  Output pixel 2m samples input position m - 1/4 and 2m+1 samples m + 1/4, with the
  border clamped; written as fixed-weight sums so its gradient stays cheap.
  """

  def up_axis(v: jax.Array, axis: int) -> jax.Array:
    n = v.shape[axis]
    sl = lambda a, b: jax.lax.slice_in_dim(v, a, b, axis=axis)
    # Neighbours with the border clamped, by concatenation: the gradient of an edge-mode pad
    # is ~3x slower on XLA:CPU.
    prev = jnp.concatenate([sl(0, 1), sl(0, n - 1)], axis)
    nxt = jnp.concatenate([sl(1, n), sl(n - 1, n)], axis)
    even, odd = 0.25 * prev + 0.75 * v, 0.75 * v + 0.25 * nxt
    out = jnp.stack([even, odd], axis=axis + 1)
    shape = list(v.shape)
    shape[axis] = 2 * n
    return out.reshape(shape)

  return up_axis(up_axis(x, 1), 2)


class TransposedConvUp(nn.Module):
  """PyTorch ``ConvTranspose2d(C, C, 3, stride=2, padding=1, output_padding=1, bias=False)``.

  The kernel is stored as [3, 3, in, out] (the PyTorch weight [in, out, kh, kw] permuted).
  ``ops.conv_transpose_up2``: the four output phases (1, 2, 2 and 4 taps, no multiplications
  by inserted zeros) computed as small convolutions and interleaved by depth-to-space, with
  the gradients of the same sums written as two matmuls.
  """

  features: int
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, slope: jax.Array | None = None) -> jax.Array:
    """The transposed conv of ``x``, or of ``prelu(x, slope)`` (fused as in ``Conv``)."""
    k = self.param('kernel', torch_conv_init, (3, 3, x.shape[-1], self.features))
    k = k.astype(self.dtype)
    x = x.astype(self.dtype)
    if slope is None:
      return ops.conv_transpose_up2(x, k)
    return ops.conv_transpose_up2_prelu(x, slope, k)


class SpatialAttention(nn.Module):
  """Spatial attention gate of the DAU (Sec. 3.2): channel max and mean -> 5x5 conv ->
  sigmoid, [B, H, W, C] -> [B, H, W, 1]; the DAU scales its features by it."""

  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    pooled = jnp.concatenate(
      [jnp.max(x, axis=-1, keepdims=True), jnp.mean(x, axis=-1, keepdims=True)], axis=-1
    )
    return nn.sigmoid(Conv(1, 5, dtype=self.dtype, name='conv')(pooled))


class ChannelAttention(nn.Module):
  """Channel attention gate of the DAU (Sec. 3.2): squeeze (GAP) and excitation (1x1 convs),
  [B, H, W, C] -> [B, 1, 1, C]; the DAU scales its features by it."""

  reduction: int = 8
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    c = x.shape[-1]
    z = global_avg_pool(x)
    z = nn.relu(Conv(c // self.reduction, 1, dtype=self.dtype, name='squeeze')(z))
    return nn.sigmoid(Conv(c, 1, dtype=self.dtype, name='excite')(z))


class AttentionFusion(nn.Module):
  """The DAU's 1x1 conv of [x * spatial gate, x * channel gate] (kernel [1, 1, 2C, C]).

  Computed as ``s * (x @ K_top) + x @ (g * K_bottom)`` with the channel gate ``g`` folded into
  a per-image kernel: the same sums as the conv of the concatenation, but the backward pass
  keeps ``x`` and one product instead of two gated copies of the features.
  """

  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, spatial: jax.Array, channel: jax.Array) -> jax.Array:
    b, h, w, c = x.shape
    kernel = self.param('kernel', torch_conv_init, (1, 1, 2 * c, c))[0, 0].astype(self.dtype)
    per_image = channel.reshape(b, c, 1) * kernel[c:]  # [B, C, C]: gate folded into K_bottom
    gated = jnp.matmul(x.reshape(b, h * w, c), per_image).reshape(b, h, w, c)
    return spatial * matmul_channels(x, kernel[:c]) + gated


class DAU(nn.Module):
  """Dual attention unit (Sec. 3.2, Fig. 3): conv-PReLU-conv, spatial and channel attention
  in parallel, concatenated, fused by a 1x1 conv, plus the input. [B, H, W, C] -> same.

  The PReLU slope is passed in: the official code shares one slope across every DAU of the
  network (a default argument `act=nn.PReLU()` evaluated once), so MIRNet owns it.
  """

  kernel_size: int = 3
  reduction: int = 8
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, slope: jax.Array) -> jax.Array:
    c = x.shape[-1]
    r = Conv(c, self.kernel_size, dtype=self.dtype, name='conv_0')(x)
    r = Conv(c, self.kernel_size, dtype=self.dtype, name='conv_1')(r, slope)
    sa = SpatialAttention(dtype=self.dtype, name='spatial_attention')(r)
    ca = ChannelAttention(self.reduction, dtype=self.dtype, name='channel_attention')(r)
    fused = AttentionFusion(dtype=self.dtype, name='conv1x1')(r, sa, ca)
    return fused + x.astype(self.dtype)


class SKFF(nn.Module):
  """Selective kernel feature fusion (Sec. 3.1, Fig. 2) of ``len(inputs)`` same-shape maps.

  U = sum of inputs -> GAP -> 1x1 conv to d = max(C / reduction, 4) -> activation -> one 1x1
  conv back to C per input -> softmax across the inputs, per channel -> weighted sum.
  The activation is a learnable PReLU in MIRNet and a fixed LeakyReLU(0.2) in MIRNet-v2
  (Zamir et al., TPAMI 2022), which therefore has no ``prelu`` parameter.
  """

  reduction: int = 8
  activation: str = 'prelu'  # 'prelu' (MIRNet) | 'leaky_relu' (MIRNet-v2, slope 0.2)
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, inputs: Sequence[jax.Array]) -> jax.Array:
    c = inputs[0].shape[-1]
    d = max(int(c / self.reduction), 4)
    z = global_avg_pool(sum(inputs[1:], inputs[0]))
    z = Conv(d, 1, dtype=self.dtype, name='conv_du')(z)
    z = PReLU(name='prelu')(z) if self.activation == 'prelu' else leaky_relu(z)
    logits = jnp.stack(
      [Conv(c, 1, dtype=self.dtype, name=f'fc_{i}')(z) for i in range(len(inputs))], axis=0
    )
    weights = jax.nn.softmax(logits.astype(jnp.float32), axis=0).astype(self.dtype)
    return sum(w * v.astype(self.dtype) for w, v in zip(weights, inputs, strict=True))


class ResidualDownSample(nn.Module):
  """Residual down-sampling (Sec. 3.3, Fig. 4a): [B, H, W, C] -> [B, H/2, W/2, factor * C].

  Top: 1x1 conv, PReLU, 3x3 conv, PReLU, blur-pool, 1x1 conv; bottom: blur-pool, 1x1 conv.
  """

  factor: int = 2
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    c = x.shape[-1]
    top = Conv(c, 1, dtype=self.dtype, name='top_conv_0')(x)
    top = Conv(c, 3, dtype=self.dtype, name='top_conv_1')(top, PReLU(name='top_prelu_0')())
    top = PReLU(name='top_prelu_1')(top)
    top = Conv(self.factor * c, 1, dtype=self.dtype, name='top_conv_2')(blur_pool(top))
    bot = Conv(self.factor * c, 1, dtype=self.dtype, name='bot_conv')(blur_pool(x))
    return top + bot


class ResidualUpSample(nn.Module):
  """Residual up-sampling (Sec. 3.3, Fig. 4b): [B, H, W, C] -> [B, 2H, 2W, C / factor].

  Top: 1x1 conv, PReLU, 3x3 stride-2 transposed conv, PReLU, 1x1 conv; bottom: bilinear x2
  (align_corners=False), 1x1 conv. The bottom runs the 1x1 conv first: a per-pixel linear map
  commutes with the fixed-weight bilinear sums, so it is the same result at a quarter of the
  multiplications, and the backward pass keeps the small input instead of the up-sampled one.
  """

  factor: int = 2
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    c = x.shape[-1]
    out = c // self.factor
    top = Conv(c, 1, dtype=self.dtype, name='top_conv_0')(x)
    top = TransposedConvUp(c, dtype=self.dtype, name='top_deconv')(top, PReLU(name='top_prelu_0')())
    top = Conv(out, 1, dtype=self.dtype, name='top_conv_1')(top, PReLU(name='top_prelu_1')())
    bot = bilinear_up2(Conv(out, 1, dtype=self.dtype, name='bot_conv')(x))
    return top + bot


class DownSample(nn.Module):
  """``log2(scale)`` chained residual down-samplings (the official `DownSample`)."""

  scale: int
  factor: int = 2
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    for i in range(self.scale.bit_length() - 1):
      x = ResidualDownSample(self.factor, dtype=self.dtype, name=f'stage_{i}')(x)
    return x


class UpSample(nn.Module):
  """``log2(scale)`` chained residual up-samplings (the official `UpSample`)."""

  scale: int
  factor: int = 2
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    for i in range(self.scale.bit_length() - 1):
      x = ResidualUpSample(self.factor, dtype=self.dtype, name=f'stage_{i}')(x)
    return x
