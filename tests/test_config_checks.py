"""The start-up config checks: a rule for every numeric key, and each rule does what it says."""

import copy
import importlib.util
import math

import pytest
from tiny import REPO

from mirnet_jax import config_checks
from mirnet_jax.config_checks import REFUSED, RULES

CONFIGS = [
  ('lol.py', ''),
  ('lol.py', 'seed'),
  ('demo.py', ''),
  ('sice.py', ''),
  ('sice.py', 'seed'),
  ('lol_v2.py', ''),
  ('lol_v2.py', 'fixed'),
]


def _load(name: str, arg: str = ''):
  spec = importlib.util.spec_from_file_location(f'config_{name[:-3]}', REPO / 'configs' / name)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config(arg)


def _with(config, key: str, value) -> dict:
  """A plain-dict copy of ``config`` with one key set (a dict takes values of any type)."""
  tree = copy.deepcopy(config.to_dict())
  *sections, name = key.split('.')
  node = tree
  for section in sections:
    node = node[section]
  node[name] = value
  return tree


@pytest.mark.parametrize('name, arg', CONFIGS)
def test_every_numeric_key_has_a_rule_and_the_shipped_configs_pass(name, arg):
  config = _load(name, arg)
  missing = config_checks.unchecked_keys(config)
  assert not missing, (
    f'configs/{name}:{arg}: numeric keys without a rule in config_checks.RULES: {missing}. '
    'Add one saying what 0 and negative values mean (or that they are refused).'
  )
  assert config_checks.errors(config) == []


def test_every_rule_names_a_key_of_the_paper_config():
  config = _load('lol.py')
  keys = {key for key, _ in config_checks._leaves(config)}
  assert sorted(set(RULES) - keys) == []


def test_a_new_numeric_key_without_a_rule_is_reported():
  tree = _with(_load('demo.py'), 'data.cache_size', 3)
  tree['train']['stage_repeats'] = (10, 20)
  assert config_checks.unchecked_keys(tree) == ['data.cache_size', 'train.stage_repeats']
  # Strings and booleans need no numeric rule.
  assert config_checks.unchecked_keys(_with(_load('demo.py'), 'data.cache', True)) == []


def _zero_and_negatives(key: str):
  """(value, expected to be accepted) for 0 and two negatives, from the rule's own texts."""
  rule = RULES[key]
  cast = rule.kind
  yield cast(0), rule.zero != REFUSED
  for negative in (-1, -7):
    yield cast(negative), negative in rule.special


@pytest.mark.parametrize('key', sorted(RULES))
def test_zero_and_negative_values_do_what_the_table_says(key):
  """0 and negatives are either accepted (with a meaning in the table) or refused by name."""
  config = _load('demo.py')
  for value, accepted in _zero_and_negatives(key):
    found = config_checks.errors(_with(config, key, value))
    if accepted:
      assert found == [], (key, value)
    else:
      assert len(found) == 1 and found[0].startswith(f'config.{key}={value!r}: must be '), found
  rule = RULES[key]
  assert rule.negative == REFUSED or rule.special, key  # a negative meaning needs its value
  if rule.kind is float:
    for value in (math.nan, math.inf, -math.inf):
      assert config_checks.errors(_with(config, key, value)), (key, value)
  else:  # an integer key refuses a fraction and a bool
    assert config_checks.errors(_with(config, key, 2.5)), key
    assert config_checks.errors(_with(config, key, True)), key


@pytest.mark.parametrize(
  'key, value, needle',
  [
    ('train.log_every_steps', 0, 'config.train.log_every_steps=0: must be an integer >= 1'),
    ('train.checkpoint_every_steps', 0, 'config.train.checkpoint_every_steps=0: must be'),
    ('optim.beta2', 1.0, 'config.optim.beta2=1.0: must be a finite number in [0, 1)'),
    ('data.validation_percent', 100.0, 'validation_percent=100.0: must be a finite number in'),
    (
      'predict.jpeg_quality',
      101,
      'config.predict.jpeg_quality=101: must be an integer in [1, 100]',
    ),
    ('eval.num_grids', -2, 'config.eval.num_grids=-2: must be an integer >= 0, or -1'),
    ('model.dtype', 'float16', "config.model.dtype='float16': not supported (float16 needs loss"),
    ('model.dtype', 'float64', "config.model.dtype='float64': must be one of float32, bfloat16"),
    ('model.kernel_size', 4, 'config.model.kernel_size=4: must be odd'),
    ('model.reduction', 32, 'config.model.reduction=32: must be <= config.model.num_features'),
    ('data.crop_size', 31, 'config.data.crop_size=31: must be a multiple of 2'),
    ('optim.end_learning_rate', 1e-3, 'config.optim.end_learning_rate=0.001: must be <='),
    ('predict.tile_overlap', 1024, 'config.predict.tile_overlap=1024: must be smaller than'),
  ],
)
def test_bad_values_are_named(key, value, needle):
  with pytest.raises(config_checks.ConfigError) as e:
    config_checks.check(_with(_load('demo.py'), key, value))
  assert needle in str(e.value)


def test_boundaries_that_are_allowed():
  config = _load('demo.py')
  for key, value in [
    ('optim.beta1', 0.0),
    ('optim.end_learning_rate', 5e-4),  # = learning_rate: a constant after warm-up
    ('predict.tile_size', 0),  # never tile: the overlap is then unused
    ('predict.jpeg_quality', 100),
    ('data.crop_size', 2),
    ('model.dtype', 'bfloat16'),
  ]:
    assert config_checks.errors(_with(config, key, value)) == [], (key, value)


def test_every_bad_key_is_named_on_one_line():
  tree = _with(_load('demo.py'), 'train.log_every_steps', 0)
  tree['optim']['learning_rate'] = -1.0
  with pytest.raises(config_checks.ConfigError) as e:
    config_checks.check(tree)
  message = str(e.value)
  assert '\n' not in message
  assert (
    'config.train.log_every_steps=0' in message and 'config.optim.learning_rate=-1.0' in message
  )


def test_table_has_a_row_per_rule():
  rows = config_checks.table().splitlines()[2:]
  assert len(rows) == len(RULES)
  assert (
    '| `train.eval_every_steps` | an integer >= 0 | validate only at the end | refused |' in rows
  )


def test_another_model_section_still_gets_its_dtype_checked():
  """A model section of another shape (no kernel_size, ...) skips the MIRNet size rules only."""
  model = {'arch': 'mirnet_v2', 'dtype': 'float16', 'num_features': 8}
  tree = _with(_load('demo.py'), 'model', model)
  found = config_checks.errors(tree)
  assert len(found) == 1 and found[0].startswith("config.model.dtype='float16'"), found


@pytest.mark.parametrize(
  'key, value, needle',
  [
    ('model.arch', 'mirnet_v3', "config.model.arch='mirnet_v3': unknown; must be one of mirnet, "),
    ('optim.schedule', 'step', "config.optim.schedule='step': unknown; must be one of warmup_"),
    ('data.mixup_mode', 'cutmix', "config.data.mixup_mode='cutmix': unknown; must be one of per_"),
    ('data.cache', 1, 'config.data.cache=1: must be True or False'),
    ('train.stage_batch_sizes', (8, 0), 'config.train.stage_batch_sizes=(8, 0): must be an int'),
    ('train.stage_steps', (5, 2.5), 'config.train.stage_steps=(5, 2.5): must be an integer >= 1'),
    ('optim.restart_periods', (10, 0), 'config.optim.restart_periods=(10, 0): must be an integer'),
    ('optim.restart_eta_mins', (-1e-6,), 'config.optim.restart_eta_mins=(-1e-06,): must be a fin'),
    ('optim.restart_weights', (1.0, -0.5), 'config.optim.restart_weights=(1.0, -0.5): must be'),
  ],
)
def test_new_keys_bad_values_are_named(key, value, needle):
  with pytest.raises(config_checks.ConfigError) as e:
    config_checks.check(_with(_load('lol_v2.py'), key, value))
  assert needle in str(e.value)


@pytest.mark.parametrize(
  'changes, needle',
  [
    (
      {'train.stage_crop_sizes': (128, 160)},
      'config.train.stage_steps/stage_crop_sizes/stage_batch_sizes: must have the same length '
      '(one entry per stage); got 6, 2, 6',
    ),
    (
      {'train.stage_crop_sizes': (128, 160, 192, 256, 320, 382)},
      'config.train.stage_crop_sizes=(128, 160, 192, 256, 320, 382): each must be a multiple '
      "of 4 (MIRNet-v2's two x2 down-samplings)",
    ),
    ({'data.crop_size': 126}, 'config.data.crop_size=126: must be a multiple of 4'),
    (
      {'optim.restart_eta_mins': (3e-4,)},
      'config.optim.restart_periods/restart_weights/restart_eta_mins: must have the same length '
      '>= 1 (one entry per cycle) for cosine_restart_cyclic; got 2, 2, 1',
    ),
    (
      {'train.num_epochs': 10.0},
      'config.train.num_epochs=10: progressive stages count steps; set config.train.num_epochs=0',
    ),
    ({'model.channel_factor': 0.0}, 'config.model.channel_factor=0.0: must be a finite number > 0'),
  ],
)
def test_stage_and_cycle_tables_are_checked_together(changes, needle):
  tree = _load('lol_v2.py').to_dict()
  for key, value in changes.items():
    tree = _with(_DictConfig(tree), key, value)
  found = config_checks.errors(tree)
  assert any(needle in message for message in found), found


class _DictConfig(dict):
  """A dict with ConfigDict's ``to_dict`` (``_with`` copies through it)."""

  def to_dict(self):
    return dict(self)


def test_new_keys_defaults_and_v2_values_pass():
  lol = _load('lol.py')
  assert (lol.optim.schedule, lol.data.mixup_mode, lol.loss.clamp_output) == (
    'warmup_cosine',
    'per_image',
    True,
  )
  assert lol.train.stage_steps == lol.train.stage_crop_sizes == lol.train.stage_batch_sizes == ()
  # The restart tables are unused (and may stay empty) under warmup_cosine; v2's float channel
  # factor and its end_learning_rate above the base rate are fine under its own rules.
  v2 = _with(_load('lol_v2.py'), 'optim.end_learning_rate', 1.0)
  assert config_checks.errors(v2) == []
  assert config_checks.errors(_with(lol, 'train.stage_steps', ())) == []


def test_remat_choices_are_the_models():
  from mirnet_jax.models import mirnet

  assert config_checks.REMAT == mirnet.REMAT
  assert config_checks.CHOICES['train.remat'] == mirnet.REMAT


def test_kernel_grad_choices_are_the_models():
  from mirnet_jax.models import ops

  assert config_checks.KERNEL_GRADS == ops.KERNEL_GRADS
  assert config_checks.CHOICES['train.conv_kernel_grad'] == ops.KERNEL_GRADS
  for form in ops.KERNEL_GRADS:
    assert config_checks.errors(_with(_load('lol.py'), 'train.conv_kernel_grad', form)) == []


@pytest.mark.parametrize(
  'key, value, needle',
  [
    ('train.remat', 'foo', "config.train.remat='foo': unknown; must be one of none, mrb, rrg"),
    (
      'train.conv_kernel_grad',
      'gemm',
      "config.train.conv_kernel_grad='gemm': unknown; must be one of auto, taps, xla",
    ),
    ('train.profile_steps', -1, 'config.train.profile_steps=-1: must be an integer >= 0'),
    ('train.profile_steps', 2.5, 'config.train.profile_steps=2.5: must be an integer >= 0'),
    ('train.profile_start_step', -3, 'config.train.profile_start_step=-3: must be an integer >='),
  ],
)
def test_remat_and_profile_keys_bad_values_are_named(key, value, needle):
  with pytest.raises(config_checks.ConfigError) as e:
    config_checks.check(_with(_load('lol.py'), key, value))
  assert needle in str(e.value)


@pytest.mark.parametrize('remat', ['none', 'mrb', 'rrg'])
def test_remat_values_pass(remat):
  assert config_checks.errors(_with(_load('lol_v2.py'), 'train.remat', remat)) == []
