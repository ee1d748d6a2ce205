"""The train-step reformulations (ops.py, layers.py) against their literal forms: values and
gradients to float32 rounding, in float32 and bfloat16."""

import flax.linen as nn
import jax
import jax.extend
import jax.numpy as jnp
import numpy as np
import pytest

from mirnet_jax.models import create_model, layers, mirnet, ops


def _x(shape, seed=0, dtype=jnp.float32):
  return jnp.asarray(np.random.default_rng(seed).standard_normal(shape), dtype)


def _grads(f, *args):
  """Value and gradients of sum(f(*args) * probe): a random cotangent, not all ones."""
  out = f(*args)
  probe = _x(out.shape, seed=7, dtype=out.dtype)
  return jax.value_and_grad(lambda *a: jnp.sum(f(*a) * probe), argnums=range(len(args)))(*args)


@pytest.mark.parametrize(
  'shape,size,features', [((2, 9, 7, 5), 3, 6), ((1, 8, 8, 2), 5, 1), ((3, 4, 6, 8), 1, 4)]
)
def test_conv2d_kernel_gradient_equals_jax_rule(shape, size, features):
  x = _x(shape)
  k = _x((size, size, shape[-1], features), seed=1) * 0.3
  (v1, (dx1, dk1)) = _grads(ops.conv2d, x, k)
  (v2, (dx2, dk2)) = _grads(ops.conv2d_literal, x, k)
  np.testing.assert_allclose(v1, v2, rtol=1e-5)
  np.testing.assert_allclose(dx1, dx2, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(dk1, dk2, rtol=1e-5, atol=1e-4)
  assert dk1.dtype == k.dtype


def test_kernel_grad_by_hand():
  # 1x1 image, 3x3 kernel: only the centre tap sees the pixel, dK[1, 1] = x^T dy.
  x = jnp.asarray([[[[2.0, -1.0]]]])
  dy = jnp.asarray([[[[3.0]]]])
  dk = ops.kernel_grad(x, dy, 3)
  want = np.zeros((3, 3, 2, 1), np.float32)
  want[1, 1, :, 0] = [6.0, -3.0]
  np.testing.assert_array_equal(dk, want)


def test_conv2d_bfloat16_gradients_accumulate_in_float32():
  x = _x((2, 16, 16, 8), dtype=jnp.bfloat16)
  k = (_x((3, 3, 8, 8), seed=1) * 0.2).astype(jnp.bfloat16)
  _, (_, dk) = _grads(ops.conv2d, x, k)
  _, (_, want) = _grads(ops.conv2d_literal, x.astype(jnp.float32), k.astype(jnp.float32))
  assert dk.dtype == jnp.bfloat16
  np.testing.assert_allclose(np.asarray(dk, np.float32), want, rtol=0.05, atol=0.3)


@pytest.mark.parametrize('dtype', [jnp.float32, jnp.bfloat16])
def test_prelu_keeping_only_its_input_equals_literal(dtype):
  x = _x((2, 5, 4, 3), dtype=dtype).at[0, 0, 0, 0].set(0.0)  # x == 0 takes the identity side
  slope = jnp.float32(0.25)
  (v1, g1) = _grads(ops.prelu, x, slope)
  (v2, g2) = _grads(ops.prelu_literal, x, slope)
  np.testing.assert_array_equal(np.asarray(v1, np.float32), np.asarray(v2, np.float32))
  for a, b in zip(g1, g2, strict=True):
    assert a.dtype == b.dtype
    np.testing.assert_allclose(np.asarray(a, np.float32), np.asarray(b, np.float32), rtol=1e-6)


@pytest.mark.parametrize(
  'fused,linear,wshape',
  [
    (ops.conv2d_prelu, ops.conv2d_literal, (3, 3, 4, 5)),
    (ops.matmul_prelu, lambda y, w: y @ w, (4, 6)),
    (ops.conv_transpose_up2_prelu, lambda y, w: _literal_deconv(y, w), (3, 3, 4, 5)),
  ],
)
def test_linear_of_prelu_equals_literal(fused, linear, wshape):
  x = _x((2, 7, 6, 4))
  slope = jnp.float32(-0.3)  # a learnt slope may turn negative
  w = _x(wshape, seed=1) * 0.3
  (v1, g1) = _grads(fused, x, slope, w)
  (v2, g2) = _grads(lambda x, a, w: linear(ops.prelu_literal(x, a), w), x, slope, w)
  np.testing.assert_allclose(v1, v2, rtol=1e-5, atol=1e-6)
  for a, b in zip(g1, g2, strict=True):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-4)


def test_after_passes_its_input_through():
  x = jnp.asarray([1.5, -2.0, 0.0, 3e38], jnp.float32)
  for scalar in (0.0, -7.25, 1e30, np.inf, -np.inf):
    np.testing.assert_array_equal(ops.after(x, jnp.float32(scalar)), x)
  assert ops.after(x.astype(jnp.bfloat16), jnp.float32(2.0)).dtype == jnp.bfloat16
  assert np.isnan(ops.after(x, jnp.float32(np.nan))).all()


@pytest.mark.parametrize('form', ['conv2d_taps', 'conv2d_prelu_literal'])
def test_only_the_prelu_forms_make_the_input_gradient_wait(form):
  # The one difference from the literal forms, the price of the order (ops.after): in the
  # PReLU-fed forms a NaN weight gradient makes the input gradient NaN too, where jax's rule
  # keeps it finite (the step is non-finite either way). The plain conv does not wait.
  x = _x((1, 4, 4, 2)).at[0, 0, 0, 0].set(np.nan)  # NaN kernel and slope gradients
  w = _x((3, 3, 2, 2), seed=1)
  g = _x((1, 4, 4, 2), seed=2)
  slope = jnp.float32(0.25)
  if form == 'conv2d_taps':
    f, literal, args = ops.conv2d_taps, ops.conv2d_literal, (x, w)
  else:
    f, args = ops.conv2d_prelu_literal, (x, slope, w)
    literal = lambda x, a, w: ops.conv2d_literal(ops.prelu_literal(x, a), w)
  got, want = jax.vjp(f, *args)[1](g), jax.vjp(literal, *args)[1](g)
  for a, b in zip(got[1:], want[1:], strict=True):  # the weight gradients: the same
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)
    assert np.isnan(a).any()
  assert np.isfinite(want[0]).all()
  if form == 'conv2d_taps':
    np.testing.assert_allclose(got[0], want[0], rtol=1e-5, atol=1e-5)
  else:
    assert np.isnan(got[0]).all()


def test_mrb_resamples_each_map_once():
  # Column 0 and the mesh bring the same maps down with the same modules: one call each.
  calls = []

  def count(next_fun, args, kwargs, context):
    if context.method_name == '__call__' and isinstance(context.module, layers.DownSample):
      calls.append(context.module.name)
    return next_fun(*args, **kwargs)

  x = _x((1, 8, 8, 16))
  mrb = mirnet.MRB()
  with nn.intercept_methods(count):
    params = mrb.init(jax.random.key(0), x, jnp.float32(0.25))
    mrb.apply(params, x, jnp.float32(0.25))
  assert sorted(calls) == sorted(['down_16_2', 'down_32_2', 'down_16_4'] * 2)


@pytest.mark.parametrize('remat', ['none', 'rrg'])  # 'rrg' checkpoints both scan bodies
def test_scanned_blocks_equal_the_unrolled_network(remat):
  # One stream: the scan is over RRGs and MRBs, whatever an MRB holds; half the compile time.
  fields = dict(num_features=8, num_rrg=2, num_mrb=2, height=1, remat=remat)
  x = jax.nn.sigmoid(_x((2, 16, 16, 3)))
  scanned, unrolled = mirnet.MIRNet(**fields), mirnet.MIRNet(**fields, scan_blocks=False)
  params = unrolled.init(jax.random.key(0), x)['params']
  # Same parameter tree (the official layout) either way.
  assert jax.tree.structure(scanned.init(jax.random.key(0), x)['params']) == jax.tree.structure(
    params
  )
  results = []
  for model in (scanned, unrolled):
    loss = lambda p, m=model: jnp.mean(jnp.abs(m.apply({'params': p}, x) - 0.5))
    results.append(jax.jit(jax.value_and_grad(loss))(params))
  np.testing.assert_allclose(results[0][0], results[1][0], rtol=1e-6)
  for a, b in zip(jax.tree.leaves(results[0][1]), jax.tree.leaves(results[1][1]), strict=True):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)


def _literal_deconv(x, kernel):
  # PyTorch ConvTranspose2d(k3, s2, p1, output_padding=1): a dilated conv with the flipped kernel.
  return jax.lax.conv_general_dilated(
    x, kernel[::-1, ::-1], (1, 1), ((1, 2), (1, 2)), lhs_dilation=(2, 2),
    dimension_numbers=('NHWC', 'HWIO', 'NHWC'),
  )  # fmt: skip


def test_transposed_conv_gradients_equal_literal():
  x = _x((2, 5, 6, 4))
  mod = layers.TransposedConvUp(3)
  params = mod.init(jax.random.key(0), x)['params']
  deconv = lambda x, k: mod.apply({'params': {'kernel': k}}, x)
  (_, (dx1, dk1)) = _grads(deconv, x, params['kernel'])
  (_, (dx2, dk2)) = _grads(_literal_deconv, x, params['kernel'])
  np.testing.assert_allclose(dx1, dx2, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(dk1, dk2, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize('dtype,tol', [(jnp.float32, 1e-5), (jnp.bfloat16, 5e-2)])
def test_conv_transpose_up2_is_computed_by_phases_and_differentiated_by_taps(dtype, tol):
  # Odd sizes and C != D: the borders of every phase, and the kernel's in/out order.
  x = _x((2, 5, 7, 3), dtype=dtype)
  k = (_x((3, 3, 3, 4), seed=1) * 0.3).astype(dtype)
  f32 = lambda v: np.asarray(v, np.float32)
  y1, y2 = ops.conv_transpose_up2(x, k), _literal_deconv(x, k)
  assert y1.shape == (2, 10, 14, 4) and y1.dtype == dtype
  np.testing.assert_allclose(f32(y1), f32(y2), rtol=tol, atol=tol)
  (_, g1), (_, g2) = _grads(ops.conv_transpose_up2, x, k), _grads(_literal_deconv, x, k)
  for a, b in zip(g1, g2, strict=True):
    assert a.dtype == dtype
    np.testing.assert_allclose(f32(a), f32(b), rtol=tol, atol=10 * tol)
  # Which form does what: three phase convolutions and a matmul forward, two GEMMs backward.
  pullback = jax.vjp(ops.conv_transpose_up2, x, k)[1]
  fwd = _primitives(jax.make_jaxpr(ops.conv_transpose_up2)(x, k).jaxpr)
  bwd = jax.jit(pullback).lower(y1).as_text()  # lowered: the primal product jax.vjp traces is gone
  assert fwd.count('conv_general_dilated') == 3 and fwd.count('dot_general') == 1, fwd
  assert 'convolution' not in bwd and bwd.count('dot_general') == 2, bwd


def _primitives(jaxpr) -> list[str]:
  """Every primitive of ``jaxpr``, sub-jaxprs (pjit, custom_vjp_call) included."""
  names = []
  for e in jaxpr.eqns:
    names.append(e.primitive.name)
    for v in e.params.values():
      for sub in v if isinstance(v, tuple | list) else [v]:
        inner = getattr(sub, 'jaxpr', sub)
        if hasattr(inner, 'eqns'):
          names += _primitives(inner)
  return names


def test_attention_fusion_equals_conv_of_the_concatenation():
  r = _x((2, 6, 5, 8))
  spatial = jax.nn.sigmoid(_x((2, 6, 5, 1), seed=1))
  channel = jax.nn.sigmoid(_x((2, 1, 1, 8), seed=2))
  mod = layers.AttentionFusion()
  params = mod.init(jax.random.key(0), r, spatial, channel)['params']
  assert params['kernel'].shape == (1, 1, 16, 8)  # the official conv1x1 weight, permuted

  def literal(r, s, c, k):
    cat = jnp.concatenate([r * s, r * c], axis=-1)
    return jax.lax.conv_general_dilated(
      cat, k, (1, 1), 'VALID', dimension_numbers=('NHWC', 'HWIO', 'NHWC')
    )

  fused = lambda r, s, c, k: mod.apply({'params': {'kernel': k}}, r, s, c)
  (v1, g1) = _grads(fused, r, spatial, channel, params['kernel'])
  (v2, g2) = _grads(literal, r, spatial, channel, params['kernel'])
  np.testing.assert_allclose(v1, v2, rtol=1e-5)
  for a, b in zip(g1, g2, strict=True):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)


def test_residual_up_sample_bottom_commutes_with_bilinear():
  x = _x((2, 4, 6, 8))
  mod = layers.ResidualUpSample()
  params = mod.init(jax.random.key(0), x)['params']
  w = params['bot_conv']['kernel'][0, 0]
  got = mod.apply({'params': params}, x)
  # The literal official order: up-sample first, then the 1x1 conv; the top path unchanged.
  zero_bot = jax.tree.map(jnp.zeros_like, params['bot_conv'])
  top = mod.apply({'params': {**params, 'bot_conv': zero_bot}}, x)
  want = top + layers.bilinear_up2(x) @ w
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize('arch', ['mirnet', 'mirnet_v2'])
def test_remat_gives_the_same_loss_and_gradients(arch):
  # Two RRGs of two MRBs (MIRNet), v2's four RRGs of one: every remat boundary occurs more than
  # once. Two streams and 8 channels keep the three compiles of each architecture short.
  fields = {
    'mirnet': dict(arch='mirnet', num_features=8, num_rrg=2, num_mrb=2, height=2),
    'mirnet_v2': dict(arch='mirnet_v2', num_features=8, channel_factor=2.0, num_mrb=1),
  }[arch]
  x = jax.nn.sigmoid(_x((2, 16, 16, 3)))
  base = create_model(fields)
  params = base.init(jax.random.key(0), x)['params']
  results = {}
  for remat in ('none', 'mrb', 'rrg'):
    model = create_model(fields, remat=remat)
    loss = lambda p, m=model: jnp.mean(jnp.abs(m.apply({'params': p}, x) - 0.5))
    results[remat] = jax.jit(jax.value_and_grad(loss))(params)
  for remat in ('mrb', 'rrg'):
    np.testing.assert_allclose(results[remat][0], results['none'][0], rtol=1e-6)
    got, want = jax.tree.leaves(results[remat][1]), jax.tree.leaves(results['none'][1])
    for a, b in zip(got, want, strict=True):
      np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)
  with pytest.raises(ValueError, match='config.train.remat'):
    create_model(fields, remat='everything')


def _primitive_counts(f, *args):
  """How often each primitive occurs in the jaxpr of f's gradients (nested jaxprs included)."""
  counts = {}

  def walk(jaxpr):
    for eqn in jaxpr.eqns:
      counts[eqn.primitive.name] = counts.get(eqn.primitive.name, 0) + 1
      for sub in jax.extend.core.jaxprs_in_params(eqn.params):
        walk(sub)

  walk(jax.make_jaxpr(lambda *a: _grads(f, *a))(*args).jaxpr)
  return counts


@pytest.mark.parametrize('form', ['taps', 'xla'])
def test_kernel_grad_form_picks_the_rule_and_keeps_the_gradients(form):
  x, slope = _x((2, 9, 7, 5)), jnp.float32(0.3)
  k = _x((3, 3, 5, 6), seed=1) * 0.3
  literal = _grads(lambda x, a, k: ops.conv2d_literal(ops.prelu_literal(x, a), k), x, slope, k)
  with ops.kernel_grad_form(form):
    plain = _grads(ops.conv2d, x, k)
    fused = _grads(ops.conv2d_prelu, x, slope, k)
    counts = _primitive_counts(ops.conv2d, x, k)
  np.testing.assert_allclose(
    plain[1][1], _grads(ops.conv2d_literal, x, k)[1][1], rtol=1e-5, atol=1e-5
  )
  for a, b in zip(jax.tree.leaves(fused), jax.tree.leaves(literal), strict=True):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)
  # 'xla': the kernel gradient is XLA's own convolution, no matmul; 'taps': nine tap GEMMs.
  assert counts.get('dot_general', 0) == {'taps': 9, 'xla': 0}[form]


def test_kernel_grad_form_is_scoped_and_checked():
  x, k = _x((1, 6, 6, 2)), _x((3, 3, 2, 2), seed=1)
  with ops.kernel_grad_form('xla'):
    pass
  assert _primitive_counts(ops.conv2d, x, k).get('dot_general') == 9  # back to the default taps
  with pytest.raises(ValueError, match='resolve "auto" first'):
    with ops.kernel_grad_form('auto'):
      pass


def test_auto_kernel_grad_takes_xla_on_cpu_only_where_clearly_faster():
  assert ops.resolve_kernel_grad('auto', 'cpu') == 'taps'  # nothing measured: eval, predict
  assert ops.resolve_kernel_grad('auto', 'cpu', {'taps': 232.3, 'xla': 133.0}) == 'xla'
  assert ops.resolve_kernel_grad('auto', 'cpu', {'taps': 1.2, 'xla': 1.0}) == 'taps'  # margin
  assert ops.resolve_kernel_grad('auto', 'cpu', {'taps': 1.0, 'xla': 5.0}) == 'taps'
  assert ops.resolve_kernel_grad('auto', 'gpu', {'taps': 1.0, 'xla': 5.0}) == 'xla'
  assert ops.resolve_kernel_grad('auto', 'gpu') == 'xla'
  assert ops.resolve_kernel_grad('auto', 'tpu') == 'xla'
  assert ops.resolve_kernel_grad('taps', 'gpu') == 'taps'
  assert ops.resolve_kernel_grad('xla', 'cpu', {'taps': 1.0, 'xla': 5.0}) == 'xla'
  assert ops.resolve_kernel_grad('auto') == 'taps'  # this suite runs on the CPU
  with pytest.raises(ValueError, match="config.train.conv_kernel_grad: unknown value 'gemm'"):
    ops.resolve_kernel_grad('gemm')


def test_time_kernel_grads_sums_both_forms_over_the_shapes(monkeypatch):
  times = ops.time_kernel_grads([(1, 8, 8, 4), (1, 4, 4, 8)], repeats=1)
  assert set(times) == {'taps', 'xla'} and all(t > 0 for t in times.values()), times
  # Each form's time is that of its own computation: slow the taps down and they are slower.
  slow = ops.kernel_grad

  def kernel_grad(x, dy, size):  # the same gradient 20 times over
    return sum(slow(x + i, dy, size) for i in range(20))

  monkeypatch.setattr(ops, 'kernel_grad', kernel_grad)
  slowed = ops.time_kernel_grads([(2, 64, 64, 8)], repeats=3)
  assert slowed['taps'] > slowed['xla'], slowed


@pytest.mark.parametrize('arch', ['mirnet', 'mirnet_v2'])
def test_model_kernel_grad_forms_give_the_same_loss_and_gradients(arch):
  small = {
    'mirnet': dict(num_features=8, num_rrg=1, num_mrb=1, height=2, width=2),
    'mirnet_v2': dict(arch='mirnet_v2', num_features=8, channel_factor=2.0, num_mrb=1),
  }[arch]
  x = jax.nn.sigmoid(_x((1, 16, 16, 3)))
  models = {f: create_model(small, conv_kernel_grad=f) for f in ('taps', 'xla')}
  assert models['taps'].conv_kernel_grad == 'taps' and models['xla'].conv_kernel_grad == 'xla'
  assert mirnet.model_config(models['taps']) == mirnet.model_config(models['xla'])
  params = models['taps'].init(jax.random.key(0), x)['params']
  results, dots = [], []
  for model in models.values():
    loss = lambda p, m=model: jnp.mean(jnp.abs(m.apply({'params': p}, x) - 0.5))
    results.append(jax.jit(jax.value_and_grad(loss))(params))
    dots.append(_primitive_counts(loss, params).get('dot_general', 0))
  # The 'xla' step has no tap GEMMs (k*k per k x k convolution; the 1x1s stay matmuls).
  assert dots[0] - dots[1] >= 9 * 4
  np.testing.assert_allclose(results[0][0], results[1][0], rtol=1e-6)
  for a, b in zip(jax.tree.leaves(results[0][1]), jax.tree.leaves(results[1][1]), strict=True):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)
