"""MIRNet-v2 and its converter against the official PyTorch model's own outputs
(../shared/fixtures/mirnetv2_official, swz30/MIRNetv2 commit 9014049)."""

import importlib.util
import json
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util

from mirnet_jax import checkpoints, convert
from mirnet_jax.models import (
  MIRNet,
  MIRNetV2,
  count_params,
  create_model,
  model_config,
  param_shapes,
)

REPO = pathlib.Path(__file__).resolve().parents[1]
FIXTURES = REPO.parent / 'shared' / 'fixtures' / 'mirnetv2_official'
V1_FIXTURES = REPO.parent / 'shared' / 'fixtures' / 'mirnet_official'
PUBLISHED_PARAMS = 5_858_560  # fixtures README and default_keys.json
CASES = ['v2_tiny', 'v2_batch', 'v2_lol_medium']
_FORWARD: dict[str, object] = {}  # one compile per model, shared by the tests of this file


def _forward(model):
  key = json.dumps(model_config(model), sort_keys=True)
  if key not in _FORWARD:
    _FORWARD[key] = jax.jit(model.apply)
  return _FORWARD[key]


def _case(name, root=FIXTURES):
  d = root / name
  if not d.is_dir():
    pytest.fail(f'missing {d}: the tests need ../shared beside the checkout')
  with np.load(d / 'state_dict.npz') as f:
    state_dict = {k: f[k] for k in f.files}
  return json.loads((d / 'config.json').read_text()), state_dict, d


def _nhwc(path):
  return np.load(path).transpose(0, 2, 3, 1)


@pytest.mark.parametrize('name', CASES)
def test_fixture_outputs_match_official(name):
  config, state_dict, d = _case(name)
  c = config['constructor']
  fields = convert.infer_model_config(state_dict)
  assert fields == dict(
    arch='mirnet_v2',
    num_features=c['n_feat'],
    channel_factor=c['chan_factor'],
    num_mrb=c['n_MRB'],
  )
  model = create_model(fields)
  params = convert.params_from_torch(state_dict, model)
  assert count_params(params) == config['unique_parameters']
  got = np.asarray(_forward(model)({'params': params}, _nhwc(d / 'input.npy')))
  want = _nhwc(d / 'output.npy')
  assert got.shape == want.shape
  assert np.max(np.abs(got - want)) <= 1e-4


def test_published_configuration_parameter_count():
  assert count_params(param_shapes(MIRNetV2())) == PUBLISHED_PARAMS
  spec = importlib.util.spec_from_file_location('lol_v2', REPO / 'configs' / 'lol_v2.py')
  lol_v2 = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(lol_v2)
  model = create_model(lol_v2.get_config().model)
  assert isinstance(model, MIRNetV2) and model == MIRNetV2()
  fixed = lol_v2.get_config('fixed')
  assert fixed.model == lol_v2.get_config().model


def test_every_default_key_maps():
  default = json.loads((FIXTURES / 'default_keys.json').read_text())
  model = MIRNetV2()
  mapping = convert.key_map(model)
  shapes = default['state_dict_shapes']
  assert {k for keys, _ in mapping.values() for k in keys} == set(shapes)
  assert all(len(keys) == 1 for keys, _ in mapping.values())  # nothing shared across keys
  flat = traverse_util.flatten_dict(param_shapes(model), sep='/')
  for path, (keys, kind) in mapping.items():
    assert list(convert._TO_TORCH_SHAPE[kind](flat[path].shape)) == shapes[keys[0]], keys[0]
  # Grouped convolutions: RRG r's RCB kernels hold in/groups input channels (groups 1, 2, 4, 4).
  for r, groups in enumerate((1, 2, 4, 4)):
    assert shapes[f'body.{r}.body.1.dau_bot.body.2.weight'] == [180, 180 // groups, 3, 3]
  assert count_params(flat) == default['unique_parameters'] == PUBLISHED_PARAMS


def test_release_layout_and_prefixes_are_accepted():
  _, sd, _ = _case('v2_tiny')
  release = {'params': {f'module.{k}': v for k, v in sd.items()}}  # BasicSR save_network
  assert convert.infer_model_config(release) == convert.infer_model_config(sd)
  model = create_model(convert.infer_model_config(sd))
  jax.tree.map(
    np.testing.assert_array_equal,
    convert.params_from_torch(sd, model),
    convert.params_from_torch(release, model),
  )


def test_errors_name_every_problem():
  _, sd, _ = _case('v2_tiny')
  model = create_model(convert.infer_model_config(sd))
  bad = dict(sd)
  del bad['body.2.body.0.skff_mid.fcs.1.weight']
  key = 'body.1.body.0.dau_mid.body.0.weight'  # groups 2: [24, 12, 3, 3]
  bad[key] = np.zeros((24, 24, 3, 3), np.float32)
  bad['body.0.body.0.extra.weight'] = np.zeros(1, np.float32)
  with pytest.raises(convert.ConversionError) as e:
    convert.params_from_torch(bad, model)
  msg = str(e.value)
  assert 'MIRNetV2(channel_factor=1.5, num_features=16, num_mrb=1, reduction=8)' in msg
  assert 'missing key: body.2.body.0.skff_mid.fcs.1.weight' in msg
  assert f'shape mismatch: {key} is [24, 24, 3, 3], expected [24, 12, 3, 3]' in msg
  assert 'unexpected key: body.0.body.0.extra.weight' in msg
  assert '3 problem(s)' in msg


def test_the_other_architecture_is_rejected_by_name():
  _, v2_sd, _ = _case('v2_tiny')
  _, v1_sd, _ = _case('tiny', V1_FIXTURES)
  with pytest.raises(
    convert.ConversionError,
    match=r"official MIRNet one \(arch 'mirnet'\).*"
    r"MIRNetV2\(.*\(arch 'mirnet_v2'\)",
  ):
    convert.params_from_torch(v1_sd, MIRNetV2(num_features=16, num_mrb=1))
  with pytest.raises(
    convert.ConversionError,
    match=r'official MIRNet-v2 one \(arch '
    r"'mirnet_v2'\).*MIRNet\(.*\(arch 'mirnet'\)",
  ):
    convert.params_from_torch(v2_sd, MIRNet(num_features=16, num_rrg=1, num_mrb=1))
  assert convert.detect_architecture({'conv_in.weight': np.zeros(1)}) is None
  with pytest.raises(convert.ConversionError, match='not an official MIRNet or MIRNet-v2'):
    convert.infer_model_config({'conv_in.weight': np.zeros((8, 3, 3, 3))})


def test_cli_writes_a_v2_export_that_loads(tmp_path, capsys):
  _, _, d = _case('v2_tiny')
  out = tmp_path / 'v2_tiny'
  assert convert.main(['--source', str(d / 'state_dict.npz'), '--output', str(out)]) == 0
  assert '"arch": "mirnet_v2"' in capsys.readouterr().out
  written = json.loads((out / 'model.json').read_text())
  assert written == dict(
    arch='mirnet_v2', channel_factor=1.5, num_features=16, num_mrb=1, reduction=8, dtype='float32'
  )
  fields, params = checkpoints.load_export(out)
  params = jax.device_get(params)  # host arrays, as in the test above: the same compiled forward
  model = create_model(fields)
  assert isinstance(model, MIRNetV2)
  got = np.asarray(_forward(model)({'params': params}, _nhwc(d / 'input.npy')))
  assert np.max(np.abs(got - _nhwc(d / 'output.npy'))) <= 1e-4


def test_create_model_picks_the_architecture():
  assert isinstance(create_model({'num_features': 8}), MIRNet)  # pre-v2 model.json: no arch
  assert isinstance(create_model({'arch': 'mirnet', 'num_features': 8}), MIRNet)
  v2 = create_model({'arch': 'mirnet_v2', 'num_features': 16, 'dtype': 'bfloat16'})
  assert isinstance(v2, MIRNetV2) and v2.dtype == jnp.bfloat16
  assert create_model(model_config(v2)) == v2  # model_config round-trips
  with pytest.raises(ValueError, match=r"^config.model.arch: unknown architecture 'mirnet3'"):
    create_model({'arch': 'mirnet3'})
  with pytest.raises(
    ValueError,
    match=r"unknown keys \['height', 'num_rrg'\] for "
    r"config.model.arch='mirnet_v2'",
  ):
    create_model({'arch': 'mirnet_v2', 'num_rrg': 3, 'height': 3})
  with pytest.raises(ValueError, match=r'stream channels 8/12/18 must be multiples of 4'):
    create_model({'arch': 'mirnet_v2', 'num_features': 8})


def test_bfloat16_compute_and_input_checks():
  model = MIRNetV2(num_features=16, num_mrb=1, dtype=jnp.bfloat16)
  params = param_shapes(model)
  assert {p.dtype for p in jax.tree.leaves(params)} == {jnp.dtype('float32')}
  x = jax.ShapeDtypeStruct((2, 12, 20, 3), jnp.float32)
  out = jax.eval_shape(model.apply, {'params': params}, x)
  assert (out.shape, out.dtype) == ((2, 12, 20, 3), jnp.bfloat16)
  with pytest.raises(ValueError, match=r'multiples of 4; got 18x24.*pad_to_multiple'):
    param_shapes(model, (18, 24))
  # Readable paths: the second column's reuse of the RCBs and SKFFs leaves one set of each.
  mrb = params['rrg_3']['mrb_0']
  assert set(mrb) == {
    'rcb_top', 'rcb_mid', 'rcb_bot', 'skff_top', 'skff_mid', 'conv_out',
    'down2', 'down4_0', 'down4_1', 'up21_1', 'up21_2', 'up32_1', 'up32_2',
  }  # fmt: skip
  assert mrb['rcb_bot']['conv_0']['kernel'].shape == (3, 3, 9, 36)  # 36 channels in 4 groups
