"""Convolutions in forms XLA runs fast, each exactly the literal operation (tests/test_ops.py).

``conv2d`` is ``lax.conv_general_dilated`` (stride 1, zero padding k//2, NHWC/HWIO) with a
hand-written gradient for the kernel. jax differentiates a convolution into two
convolutions; the one for the kernel has a window as large as the image (e.g. 128x128 with a
3x3 output), which XLA:CPU runs 5-18x slower than the forward convolution (64 channels at
4x128x128: 935 ms against 62 ms on the 2-core machine of the README). Written as one matmul
per kernel tap, dK[ky, kx] = shifted(x)^T @ dY, the same sums cost a few plain GEMMs. The
input gradient keeps jax's own rule (a convolution with the flipped kernel, which runs at the
forward's rate). Only the order of the float additions differs from the literal form.
"""

import jax
import jax.numpy as jnp


def _conv(x: jax.Array, kernel: jax.Array) -> jax.Array:
  pad = kernel.shape[0] // 2
  return jax.lax.conv_general_dilated(
    x,
    kernel,
    window_strides=(1, 1),
    padding=((pad, pad), (pad, pad)),
    dimension_numbers=('NHWC', 'HWIO', 'NHWC'),
  )


def conv2d_literal(x: jax.Array, kernel: jax.Array) -> jax.Array:
  """The literal convolution with jax's own gradients (reference for tests and benchmarks)."""
  return _conv(x, kernel)


def kernel_grad(x: jax.Array, dy: jax.Array, size: int) -> jax.Array:
  """dL/dK of a size x size stride-1 'same' convolution: [size, size, C, D], float32 sums.

  One [C, N] @ [N, D] matmul per tap (N = B*H*W) of the zero-padded input shifted by that
  tap; the sums over N accumulate in float32 whatever the compute dtype.
  """
  p = size // 2
  _, h, w, c = x.shape
  xp = jnp.pad(x, ((0, 0), (p, p), (p, p), (0, 0)))
  dy2 = dy.reshape(-1, dy.shape[-1])
  taps = [
    jax.lax.dot_general(
      xp[:, ky : ky + h, kx : kx + w, :].reshape(-1, c),
      dy2,
      (((0,), (0,)), ((), ())),
      preferred_element_type=jnp.float32,
    )
    for ky in range(size)
    for kx in range(size)
  ]
  return jnp.stack(taps).reshape(size, size, c, dy.shape[-1])


@jax.custom_vjp
def conv2d(x: jax.Array, kernel: jax.Array) -> jax.Array:
  """k x k convolution (odd k), stride 1, zero padding k//2: [B, H, W, C] x [k, k, C, D]."""
  return _conv(x, kernel)


def _conv2d_fwd(x: jax.Array, kernel: jax.Array):
  return _conv(x, kernel), (x, kernel)


def _conv2d_bwd(residuals, dy):
  x, kernel = residuals
  dx = jax.vjp(lambda t: _conv(t, kernel), x)[1](dy)[0]
  dk = kernel_grad(x, dy, kernel.shape[0]).astype(kernel.dtype)
  return dx, dk


conv2d.defvjp(_conv2d_fwd, _conv2d_bwd)
