"""MIRNet's structure: parameter counts, paths, the paper's knobs, input checks."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mirnet_jax.models import (
  MIRNet,
  count_params,
  create_model,
  crop,
  pad_to_multiple,
  param_shapes,
)

PAPER_PARAMS = 31_787_419  # fixtures/mirnet_official/README.md, default_keys.json


def test_paper_configuration_parameter_count():
  assert count_params(param_shapes(MIRNet())) == PAPER_PARAMS


def test_paper_configuration_from_config():
  import configs.lol as lol  # configs is a namespace package at the repo root

  model = create_model(lol.get_config().model)
  assert count_params(param_shapes(model)) == PAPER_PARAMS
  assert model.dtype == jnp.float32


def test_parameter_paths_are_readable_and_shared_once():
  params = param_shapes(MIRNet(num_features=8, num_rrg=2, num_mrb=2))
  assert set(params) == {'conv_in', 'conv_out', 'dau_prelu', 'rrg_0', 'rrg_1'}
  mrb = params['rrg_1']['mrb_1']
  assert {'dau_0', 'dau_1', 'dau_2', 'skff_0', 'skff_1', 'skff_2', 'conv_out'} <= set(mrb)
  assert set(mrb['dau_2']) == {
    'conv_0',
    'conv_1',
    'spatial_attention',
    'channel_attention',
    'conv1x1',
  }
  assert params['dau_prelu'].shape == ()  # one slope for every DAU of the network
  assert mrb['up_32_4']['stage_1']['top_deconv']['kernel'].shape == (3, 3, 16, 16)


@pytest.mark.parametrize('num_rrg', [1, 2, 3, 4])
@pytest.mark.parametrize('num_mrb', [1, 2, 3])
def test_seed_paper_depths(num_rrg, num_mrb):
  # The seed paper's ablations: 1-4 RRGs of 1-3 MRBs each, every one with its own weights.
  params = param_shapes(MIRNet(num_features=8, num_rrg=num_rrg, num_mrb=num_mrb))
  assert sorted(k for k in params if k.startswith('rrg_')) == [f'rrg_{r}' for r in range(num_rrg)]
  mrb = count_params(params['rrg_0']['mrb_0'])
  assert mrb == 83_888 - 3 * 3 * 3 * 8 * 2 - 3 * 3 * 8 * 8 - 1  # the tiny fixture, one MRB
  for r in range(num_rrg):
    assert sorted(params[f'rrg_{r}']) == ['conv'] + [f'mrb_{m}' for m in range(num_mrb)]
  conv = 3 * 3 * 8 * 8
  assert count_params(params) == 2 * 3 * 3 * 3 * 8 + 1 + num_rrg * (conv + num_mrb * mrb)


@pytest.mark.parametrize('features', [32, 64, 96])
@pytest.mark.parametrize('height', [3, 4])
def test_seed_paper_widths_and_streams(features, height):
  model = MIRNet(num_features=features, num_rrg=1, num_mrb=1, height=height)
  params = param_shapes(model)
  top = params['rrg_0']['mrb_0'][f'dau_{height - 1}']['conv_0']['kernel']
  assert top.shape == (3, 3, features * 2 ** (height - 1), features * 2 ** (height - 1))
  out = jax.eval_shape(
    model.apply, {'params': params}, jax.ShapeDtypeStruct((2, 16, 24, 3), jnp.float32)
  )
  assert out.shape == (2, 16, 24, 3)


def test_bfloat16_compute_keeps_float32_params():
  model = create_model({'num_features': 8, 'num_rrg': 1, 'num_mrb': 1, 'dtype': 'bfloat16'})
  params = param_shapes(model)
  assert {p.dtype for p in jax.tree.leaves(params)} == {jnp.dtype('float32')}
  out = jax.eval_shape(
    model.apply, {'params': params}, jax.ShapeDtypeStruct((1, 8, 8, 3), jnp.float32)
  )
  assert out.dtype == jnp.bfloat16


def test_wrong_sizes_give_a_clear_error():
  model = MIRNet(num_features=8, num_rrg=1, num_mrb=1, height=3)
  with pytest.raises(ValueError, match=r'multiples of 4; got 18x24.*pad_to_multiple'):
    param_shapes(model, (18, 24))
  with pytest.raises(ValueError, match=r'\[batch, height, width, 3\]'):
    jax.eval_shape(model.init, jax.random.key(0), jax.ShapeDtypeStruct((8, 8, 3), jnp.float32))


def test_create_model_rejects_unknown_keys_and_dtypes():
  with pytest.raises(ValueError, match='config.model: unknown keys'):
    create_model({'num_featurez': 8})
  with pytest.raises(ValueError, match='config.model.dtype'):
    create_model({'dtype': 'float8'})


@pytest.mark.parametrize('hw', [(17, 23), (1, 1), (8, 8), (601, 399)])
def test_pad_to_multiple_and_crop(hw):
  x = np.random.default_rng(0).random((2, *hw, 3), np.float32)
  padded, size = pad_to_multiple(x, 8)
  assert padded.shape[1] % 8 == 0 and padded.shape[2] % 8 == 0
  assert size == hw
  np.testing.assert_array_equal(crop(padded, size), x)
  if hw[0] > 8:  # reflect: the first padded row mirrors the row before the last
    np.testing.assert_array_equal(padded[:, hw[0], : hw[1]], x[:, hw[0] - 2])
  jpadded, _ = pad_to_multiple(jnp.asarray(x), 8)
  np.testing.assert_array_equal(jpadded, padded)


@pytest.mark.parametrize('dtype', ['float16', 'float64'])
def test_create_model_refuses_unsupported_compute_dtypes(dtype):
  # float16 gives finite losses with Inf gradients (no loss scaling): refused by name.
  with pytest.raises(ValueError, match=f"config.model.dtype: unknown dtype '{dtype}'"):
    create_model({'dtype': dtype, 'num_features': 8})
