"""Convolutions in forms XLA runs fast, each exactly the literal operation (tests/test_ops.py).

``conv2d`` is ``lax.conv_general_dilated`` (stride 1, zero padding k//2, NHWC/HWIO) with a
hand-written gradient for the kernel. jax differentiates a convolution into two
convolutions; the one for the kernel has a window as large as the image (e.g. 128x128 with a
3x3 output), which XLA:CPU runs 5-18x slower than the forward convolution on some CPUs
(64 channels at 4x128x128: 935 ms against 62 ms on the slower 2-core machine of the README).
Written as one matmul per kernel tap, dK[ky, kx] = shifted(x)^T @ dY, the same sums cost a few
plain GEMMs. The input gradient keeps jax's own rule (a convolution with the flipped kernel,
which runs at the forward's rate). Only the order of the float additions differs from the
literal form.

Which kernel gradient is faster depends on the machine, not only the backend: on another
2-core CPU (AMD EPYC, AVX-512) XLA's own rule runs 2x faster than the taps (44 against 87 ms
at 64 channels). ``config.train.conv_kernel_grad`` picks the form ('taps', 'xla', or 'auto':
XLA's rule on GPU and TPU, whose convolution libraries compute kernel gradients at full rate;
on CPU XLA's rule where ``time_kernel_grads`` measures it clearly faster when training starts,
``XLA_MARGIN``, kept with the checkpoints so that a resumed run goes on with the same form).
The model sets it for the trace (``kernel_grad_form``), the way ``jax.default_matmul_precision``
scopes a setting: the choice is made when the forward pass is traced, and each form carries its
own backward rule. ``python -m mirnet_jax.benchmark --mode=kernel_grad`` times both forms on
this machine.

``prelu`` and the linear maps that take a PReLU'd input (``conv2d_prelu``, ``matmul_prelu``)
are memory reformulations: jax's rule for ``where(x >= 0, x, a * x)`` keeps a boolean mask and
``x``, and the following convolution keeps its own input ``prelu(x)``, so every activation is
held three times for the backward pass. These keep only ``x`` and recompute the mask and the
activation (one element-wise pass) in the backward pass: the same values and gradients. What
jax hands XLA to keep per MRB (4 x 128x128) drops from ~1.5 to ~0.97 GiB. XLA:CPU's plan for
the paper step is the same either way (its fusion already recomputes the mask and the
activation from x); the form makes the saving independent of a backend's fusion choices.
"""

import contextlib
import contextvars
import functools
import time
from collections.abc import Iterator

import jax
import jax.numpy as jnp

KERNEL_GRADS = ('auto', 'taps', 'xla')  # config.train.conv_kernel_grad
# 'auto' on CPU takes XLA's rule only when the taps take this many times as long: a choice
# far from the timing noise, so that fresh runs of one config on one machine pick the same form
# (the two round differently). On the AVX-512 2-core CPU the taps take 1.75x as long (4 x
# 128x128, the paper's three streams: 232 against 133 ms); on the other 2-core CPU XLA's rule
# took 935 ms for the first stream alone, and the taps halved the train step.
XLA_MARGIN = 1.25
_KERNEL_GRAD = contextvars.ContextVar('mirnet_conv_kernel_grad', default='taps')


def _conv(x: jax.Array, kernel: jax.Array) -> jax.Array:
  pad = kernel.shape[0] // 2
  return jax.lax.conv_general_dilated(
    x,
    kernel,
    window_strides=(1, 1),
    padding=((pad, pad), (pad, pad)),
    dimension_numbers=('NHWC', 'HWIO', 'NHWC'),
  )


def prelu_literal(x: jax.Array, slope: jax.Array) -> jax.Array:
  """PReLU with one slope for all channels (PyTorch ``nn.PReLU()``), jax's own gradient."""
  return jnp.where(x >= 0, x, slope.astype(x.dtype) * x)


def matmul_channels(x: jax.Array, w: jax.Array) -> jax.Array:
  """[..., C] @ [C, D] as one 2-D matmul: its gradients are plain matmuls, which XLA:CPU runs
  ~1.5x faster than those of a 4-D einsum."""
  return (x.reshape(-1, x.shape[-1]) @ w).reshape(*x.shape[:-1], w.shape[-1])


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
def conv2d_taps(x: jax.Array, kernel: jax.Array) -> jax.Array:
  """k x k convolution (odd k), stride 1, zero padding k//2: [B, H, W, C] x [k, k, C, D];
  its kernel gradient is ``kernel_grad``'s tap GEMMs."""
  return _conv(x, kernel)


def _conv2d_fwd(x: jax.Array, kernel: jax.Array):
  return _conv(x, kernel), (x, kernel)


def _conv2d_bwd(residuals, dy):
  x, kernel = residuals
  dx = jax.vjp(lambda t: _conv(t, kernel), x)[1](dy)[0]
  dk = kernel_grad(x, dy, kernel.shape[0]).astype(kernel.dtype)
  # No ``after`` here: the plain conv's kernel gradient is best left where XLA puts it (waiting
  # on it raised MIRNet-v2's plan from 3.69 to 4.58 GiB and the paper step's by 0.08 GiB).
  return dx, dk


conv2d_taps.defvjp(_conv2d_fwd, _conv2d_bwd)


@jax.custom_vjp
def prelu(x: jax.Array, slope: jax.Array) -> jax.Array:
  """``prelu_literal`` whose backward pass keeps ``x`` only (no mask)."""
  return prelu_literal(x, slope)


def _prelu_fwd(x: jax.Array, slope: jax.Array):
  return prelu_literal(x, slope), (x, slope)


def _prelu_bwd(residuals, g):
  x, slope = residuals
  return jax.vjp(prelu_literal, x, slope)[1](g)


prelu.defvjp(_prelu_fwd, _prelu_bwd)


def after(x: jax.Array, *scalars: jax.Array) -> jax.Array:
  """``x``, available only once every scalar is: ``x + min(sum |scalar|, 0)``.

  Bit for bit ``x`` unless a scalar is NaN (then all NaN), except that -0.0 entries become
  +0.0. Why: a weight gradient (a PReLU's slope, a kernel) is needed only by the optimiser's
  update at the end of the step, and XLA:CPU's scheduler computes it there, keeping its
  full-size operands alive until then (those of every DAU's PReLU, whose slope all DAUs
  share, and of every PReLU-fed convolution and deconvolution tap). The input gradient waits
  for the weight gradients instead (one element each), which frees them at once: the paper
  step's plan (4 x 128x128, 'mrb') drops from 2.23 to 1.68 GiB. Only the PReLU-fed forms
  wait: for the plain 3x3 convolution the wait raised the plans (``_conv2d_bwd``). An
  ``optimization_barrier`` cannot order them: XLA:CPU removes the barriers before it schedules.
  """
  wait = sum(jnp.abs(jnp.asarray(s, jnp.float32)) for s in scalars)
  return x + jnp.minimum(wait, 0).astype(x.dtype)


def _with_prelu_input(linear):
  """``f(x, slope, w) = linear(prelu(x, slope), w)`` keeping only ``x``, ``slope`` and ``w``
  for the backward pass, which recomputes ``prelu(x)`` for ``linear``'s weight gradient."""

  @jax.custom_vjp
  def f(x: jax.Array, slope: jax.Array, w: jax.Array) -> jax.Array:
    return linear(prelu_literal(x, slope), w)

  def fwd(x, slope, w):
    return f(x, slope, w), (x, slope, w)

  def bwd(residuals, g):
    x, slope, w = residuals
    y, act_vjp = jax.vjp(prelu_literal, x, slope)
    dy, dw = jax.vjp(linear, y, w)[1](g)
    dx, dslope = act_vjp(dy)
    return after(dx, dslope, jnp.ravel(dw)[0]), dslope, dw

  f.defvjp(fwd, bwd)
  f.__doc__ = f'``{linear.__name__}(prelu(x, slope), w)``, keeping only the inputs.'
  return f


conv2d_prelu_taps = _with_prelu_input(conv2d_taps)
conv2d_prelu_literal = _with_prelu_input(conv2d_literal)
matmul_prelu = _with_prelu_input(matmul_channels)


# The stride-2 3x3 transposed convolution (PyTorch ConvTranspose2d(k=3, s=2, p=1,
# output_padding=1)), kernel [3, 3, C, D]. Output row 2m gets tap ky=1 from input row m, row
# 2m+1 gets ky=2 from row m and ky=0 from row m+1 (zero beyond the border), likewise for the
# columns: four output phases with 1, 2, 2 and 4 taps, 9 in all, interleaved by depth-to-space.


def _interleave(p00, p01, p10, p11):
  b, h, w, d = p00.shape
  rows = jnp.stack([jnp.stack([p00, p01], 3), jnp.stack([p10, p11], 3)], 2)  # b h 2 w 2 d
  return rows.reshape(b, 2 * h, 2 * w, d)


def _up2_phases(x: jax.Array, kernel: jax.Array) -> jax.Array:
  """The forward: each phase is one small stride-1 convolution of ``x`` (1x1, 1x2, 2x1, 2x2,
  padded after), which XLA:CPU runs 1.1-1.5x faster than ``_up2_taps`` (600x400, README)."""
  k = kernel
  conv = lambda w, pad: jax.lax.conv_general_dilated(
    x, w, (1, 1), pad, dimension_numbers=('NHWC', 'HWIO', 'NHWC')
  )
  # A phase's window [dy, dx] holds the tap that reads input [m + dy, n + dx] (dy, dx: 0 or 1),
  # zero-padded after the last row or column.
  k_p11 = jnp.stack([jnp.stack([k[2, 2], k[2, 0]]), jnp.stack([k[0, 2], k[0, 0]])])
  return _interleave(
    matmul_channels(x, k[1, 1]),
    conv(jnp.stack([k[1, 2], k[1, 0]])[None], ((0, 0), (0, 1))),
    conv(jnp.stack([k[2, 1], k[0, 1]])[:, None], ((0, 1), (0, 0))),
    conv(k_p11, ((0, 1), (0, 1))),
  )


def _up2_taps(x: jax.Array, kernel: jax.Array) -> jax.Array:
  """The backward's form: every tap's product with ``x`` in one matmul, taps[..., 3 ky + kx, :]
  = x @ k[ky, kx]; the phases' shifted inputs become shifted products (a shift commutes with a
  per-pixel matmul). Its gradients are two plain GEMMs over ``x`` and the shifted-back
  output gradient, where those of the phase convolutions are small-window convolutions."""
  b, h, w, _ = x.shape
  d = kernel.shape[-1]
  taps = matmul_channels(x, kernel.reshape(9, -1, d).transpose(1, 0, 2).reshape(-1, 9 * d))
  taps = taps.reshape(b, h, w, 9, d)
  t = lambda ky, kx: taps[..., 3 * ky + kx, :]
  down = lambda v: jnp.pad(v[:, 1:], ((0, 0), (0, 1), (0, 0), (0, 0)))  # v[m + 1, n]
  right = lambda v: jnp.pad(v[:, :, 1:], ((0, 0), (0, 0), (0, 1), (0, 0)))  # v[m, n + 1]
  return _interleave(
    t(1, 1),
    t(1, 2) + right(t(1, 0)),
    t(2, 1) + down(t(0, 1)),
    t(2, 2) + right(t(2, 0)) + down(t(0, 2) + right(t(0, 0))),
  )


@jax.custom_vjp
def conv_transpose_up2(x: jax.Array, kernel: jax.Array) -> jax.Array:
  """[B, H, W, C] x [3, 3, C, D] -> [B, 2H, 2W, D]: computed as ``_up2_phases``,
  differentiated as ``_up2_taps`` (the same function: only the float rounding differs)."""
  return _up2_phases(x, kernel)


def _up2_fwd(x, kernel):
  return _up2_phases(x, kernel), (x, kernel)


def _up2_bwd(residuals, g):
  # The primal matmul jax.vjp traces here has no use; jit removes it.
  return jax.vjp(_up2_taps, *residuals)[1](g)


conv_transpose_up2.defvjp(_up2_fwd, _up2_bwd)
conv_transpose_up2_prelu = _with_prelu_input(conv_transpose_up2)


def resolve_kernel_grad(
  form: str, backend: str | None = None, times_ms: dict[str, float] | None = None
) -> str:
  """'taps' or 'xla' for a ``config.train.conv_kernel_grad`` value.

  'auto': XLA's rule on GPU and TPU. On CPU, given ``times_ms`` (``time_kernel_grads`` on this
  machine; training measures them, train_state.measured_kernel_grad), XLA's rule where it is
  clearly faster (``XLA_MARGIN``), else the taps; without them the taps (the forward passes of
  eval and predict, where the form does not matter).
  """
  if form not in KERNEL_GRADS:
    raise ValueError(
      f'config.train.conv_kernel_grad: unknown value {form!r}; known: {list(KERNEL_GRADS)}'
    )
  if form != 'auto':
    return form
  if (backend or jax.default_backend()) != 'cpu':
    return 'xla'
  return 'xla' if times_ms and times_ms['taps'] > XLA_MARGIN * times_ms['xla'] else 'taps'


def _xla_kernel_grad(x: jax.Array, dy: jax.Array) -> jax.Array:
  kernel = jnp.zeros((3, 3, x.shape[-1], dy.shape[-1]), x.dtype)
  return jax.vjp(lambda k: conv2d_literal(x, k), kernel)[1](dy)[0]


def time_kernel_grads(shapes: list[tuple[int, ...]], repeats: int = 3) -> dict[str, float]:
  """Milliseconds one 3x3 kernel gradient of each [B, H, W, C] shape takes in each form
  (median of ``repeats`` calls after a compiling one), summed over the shapes.

  Which form is faster depends on the CPU, not only the backend (module docstring): the taps
  halved the train step on one 2-core CPU, XLA's rule is about 2x faster per gradient on another.
  Random inputs: the time does not depend on the values.
  """
  forms = {'taps': jax.jit(lambda x, dy: kernel_grad(x, dy, 3)), 'xla': jax.jit(_xla_kernel_grad)}
  totals = dict.fromkeys(forms, 0.0)
  for i, shape in enumerate(shapes):
    x, dy = jax.random.normal(jax.random.key(i), (2, *shape), jnp.float32)
    for form, fn in forms.items():
      jax.block_until_ready(fn(x, dy))  # compiles
      times = []
      for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(fn(x, dy))
        times.append(time.perf_counter() - start)
      totals[form] += sorted(times)[len(times) // 2] * 1e3
  return totals


@contextlib.contextmanager
def kernel_grad_form(form: str) -> Iterator[None]:
  """Within this context, ``conv2d`` and ``conv2d_prelu`` trace with the ``form`` ('taps' or
  'xla') of the kernel gradient; outside any, with the taps."""
  if form not in ('taps', 'xla'):
    raise ValueError(f'kernel_grad_form: {form!r} is not one of taps, xla (resolve "auto" first)')
  token = _KERNEL_GRAD.set(form)
  try:
    yield
  finally:
    _KERNEL_GRAD.reset(token)


def traced_with_kernel_grad(call):
  """Decorates a model's ``__call__`` (under ``nn.compact``) to trace inside
  ``kernel_grad_form(self.conv_kernel_grad)``."""

  @functools.wraps(call)
  def wrapped(self, *args, **kwargs):
    with kernel_grad_form(self.conv_kernel_grad):
      return call(self, *args, **kwargs)

  return wrapped


def conv2d(x: jax.Array, kernel: jax.Array) -> jax.Array:
  """k x k convolution (odd k), stride 1, zero padding k//2, with the kernel gradient of the
  current ``kernel_grad_form``: [B, H, W, C] x [k, k, C, D]."""
  if _KERNEL_GRAD.get() == 'xla':
    return conv2d_literal(x, kernel)
  return conv2d_taps(x, kernel)


def conv2d_prelu(x: jax.Array, slope: jax.Array, kernel: jax.Array) -> jax.Array:
  """``conv2d(prelu(x, slope), kernel)`` keeping only the inputs for the backward pass."""
  if _KERNEL_GRAD.get() == 'xla':
    return conv2d_prelu_literal(x, slope, kernel)
  return conv2d_prelu_taps(x, slope, kernel)
