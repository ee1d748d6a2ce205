"""The fast rewrites in layers.py against their literal definitions (ecosystem.md item 9)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mirnet_jax.models import layers


def _x(shape, seed=0):
  return jnp.asarray(np.random.default_rng(seed).standard_normal(shape), jnp.float32)


@pytest.mark.parametrize('hw', [(8, 12), (7, 9), (2, 3)])
def test_blur_pool_equals_reflect_pad_depthwise_conv(hw):
  x = _x((2, *hw, 3))
  f = np.outer([1, 2, 1], [1, 2, 1]).astype(np.float32) / 16
  kernel = jnp.tile(jnp.asarray(f)[:, :, None, None], (1, 1, 1, 3))
  padded = jnp.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)), mode='reflect')
  want = jax.lax.conv_general_dilated(
    padded,
    kernel,
    (2, 2),
    'VALID',
    dimension_numbers=('NHWC', 'HWIO', 'NHWC'),
    feature_group_count=3,
  )
  got = layers.blur_pool(x)
  assert got.shape == (2, -(-hw[0] // 2), -(-hw[1] // 2), 3)
  np.testing.assert_allclose(got, want, atol=1e-6)


def test_bilinear_up2_equals_resize_align_corners_false():
  x = _x((2, 5, 7, 3))
  want = jax.image.resize(x, (2, 10, 14, 3), 'bilinear')
  np.testing.assert_allclose(layers.bilinear_up2(x), want, atol=1e-6)


def test_bilinear_up2_by_hand():
  # 1-D row [0, 4]: positions -0.25, 0.25, 0.75, 1.25 clamp to [0, 1] -> 0, 1, 3, 4.
  x = jnp.asarray([0.0, 4.0]).reshape(1, 1, 2, 1)
  np.testing.assert_allclose(layers.bilinear_up2(x)[0, 0, :, 0], [0, 1, 3, 4])


def test_transposed_conv_equals_lax_conv_transpose():
  # PyTorch ConvTranspose2d(k3, s2, p1, output_padding=1) is a dilated conv of the
  # input with the spatially flipped kernel and padding (k-1-p, k-1-p+output_padding).
  x = _x((2, 5, 6, 4))
  mod = layers.TransposedConvUp(3)
  params = mod.init(jax.random.key(0), x)
  kernel = params['params']['kernel']  # [kh, kw, in, out]
  want = jax.lax.conv_general_dilated(
    x,
    kernel[::-1, ::-1],
    (1, 1),
    ((1, 2), (1, 2)),
    lhs_dilation=(2, 2),
    dimension_numbers=('NHWC', 'HWIO', 'NHWC'),
  )
  got = mod.apply(params, x)
  assert got.shape == (2, 10, 12, 3)
  np.testing.assert_allclose(got, want, atol=1e-5)


def test_conv1x1_einsum_equals_conv():
  x = _x((1, 4, 5, 6))
  mod = layers.Conv(3, 1)
  params = mod.init(jax.random.key(1), x)
  want = jax.lax.conv_general_dilated(
    x, params['params']['kernel'], (1, 1), 'VALID', dimension_numbers=('NHWC', 'HWIO', 'NHWC')
  )
  np.testing.assert_allclose(mod.apply(params, x), want, atol=1e-5)


def test_skff_weights_are_a_softmax_across_inputs():
  # Identical inputs: whatever the attention weights, they sum to one per channel.
  x = _x((1, 4, 4, 8))
  mod = layers.SKFF()
  params = mod.init(jax.random.key(2), [x, x, x])
  np.testing.assert_allclose(mod.apply(params, [x, x, x]), x, atol=1e-5)


def test_prelu_is_pytorch_default():
  mod = layers.PReLU()
  params = mod.init(jax.random.key(0), jnp.zeros(()))
  assert float(params['params']['slope']) == 0.25
  np.testing.assert_allclose(mod.apply(params, jnp.asarray([-2.0, 3.0])), [-0.5, 3.0])


@pytest.mark.parametrize('k', [3, 5])
def test_conv2d_gradient_equals_the_convolutions(k):
  # On CPU the backward pass is the shifted-matmul form; it must be the convolution's own.
  x, kernel, g = _x((2, 9, 7, 6)), _x((k, k, 6, 5), seed=1), _x((2, 9, 7, 5), seed=2)
  want_y, want_vjp = jax.vjp(layers._lax_conv, x, kernel)
  got_y, got_vjp = jax.vjp(layers.conv2d, x, kernel)
  np.testing.assert_array_equal(got_y, want_y)
  for got, want in zip(jax.jit(got_vjp)(g), want_vjp(g), strict=True):
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(layers._tap_conv(x, kernel), want_y, rtol=1e-5, atol=1e-5)


def test_grouped_conv_equals_feature_group_count():
  x = _x((2, 6, 8, 8))
  conv = layers.Conv(12, 3, groups=4)
  params = conv.init(jax.random.key(0), x)
  kernel = params['params']['kernel']
  assert kernel.shape == (3, 3, 2, 12)  # [k, k, in / groups, out], PyTorch's grouping
  want = jax.lax.conv_general_dilated(
    x,
    kernel,
    (1, 1),
    ((1, 1), (1, 1)),
    dimension_numbers=('NHWC', 'HWIO', 'NHWC'),
    feature_group_count=4,
  )
  np.testing.assert_allclose(conv.apply(params, x), want, rtol=1e-5, atol=1e-5)
  with pytest.raises(ValueError, match='do not split into 4 groups'):
    layers.Conv(12, 3, groups=4).init(jax.random.key(0), _x((1, 4, 4, 6)))
