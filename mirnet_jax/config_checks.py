"""Start-up checks of the config: every numeric key has a rule, bad values stop before compiling.

A value that the trainer would only trip over later (``log_every_steps=0`` divides by zero at
step 1, after the whole compile) is refused here, in one line naming the key. ``RULES`` is the
table of every numeric key of configs/lol.py (and its variants, demo.py, sice.py, lol_v2.py): its
type, its bounds, and what 0 and negative values mean (``REFUSED`` when they are errors); a
tuple key (the progressive stages, the restart cycles) applies its rule to every element.
``V2_MODEL_RULES`` replaces the model rows for ``model.arch='mirnet_v2'``. ``check`` applies
them, plus the rules that tie keys together (``_CROSS_CHECKS``: stage and cycle tables, crop
multiples), the names of the non-numeric choices (``CHOICES``) and the booleans.

A numeric key without a rule is not an error at run time (``unchecked_keys`` lists it and
main.py logs a warning), but tests/test_config_checks.py fails on it, so a new key cannot land
without saying what 0 and negative values do.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Iterator, Mapping
from typing import Any

REFUSED = 'refused'
SUPPORTED_DTYPES = ('float32', 'bfloat16')
V2_SIZE_MULTIPLE = 4  # MIRNet-v2's two x2 down-samplings (models/mirnet_v2.py SIZE_MULTIPLE)
# models/mirnet.py REMAT, spelled out so that checking a config imports neither jax nor flax
# (main.py checks before jax.distributed starts); tests/test_config_checks.py keeps them equal.
REMAT = ('none', 'mrb', 'rrg')
KERNEL_GRADS = ('auto', 'taps', 'xla')  # models/ops.py KERNEL_GRADS, likewise

# Non-numeric keys with a closed set of values (model.dtype has its own messages below).
CHOICES: dict[str, tuple[str, ...]] = {
  'model.arch': ('mirnet', 'mirnet_v2'),
  'optim.schedule': ('warmup_cosine', 'cosine_restart_cyclic'),
  'data.mixup_mode': ('per_image', 'batch_or_identity'),
  'train.remat': REMAT,
  'train.conv_kernel_grad': KERNEL_GRADS,
}
BOOLEANS = ('data.mixup', 'data.cache', 'loss.clamp_output', 'eval.save_images', 'eval.gt_mean')


class ConfigError(ValueError):
  """A config value is out of range; the message names every bad key, on one line."""


@dataclasses.dataclass(frozen=True)
class Rule:
  """The allowed values of one numeric key.

  Attributes:
    kind: int (integers only) or float (any finite number; integers accepted).
    minimum: inclusive lower bound, or None.
    above: exclusive lower bound, or None.
    below: exclusive upper bound, or None.
    maximum: inclusive upper bound, or None.
    special: values allowed outside the bounds (e.g. -1 meaning 'all').
    zero: what 0 means, or REFUSED.
    negative: what negative values mean, or REFUSED.
  """

  kind: type
  minimum: float | None = None
  above: float | None = None
  below: float | None = None
  maximum: float | None = None
  special: tuple[float, ...] = ()
  zero: str = REFUSED
  negative: str = REFUSED

  def requirement(self) -> str:
    """'an integer >= 1', 'a number in [0, 1)', ...: what the error message asks for."""
    what = 'an integer' if self.kind is int else 'a finite number'
    low = (
      f'[{_num(self.minimum)}'
      if self.minimum is not None
      else f'({_num(self.above)}'
      if self.above is not None
      else None
    )
    high = (
      f'{_num(self.maximum)}]'
      if self.maximum is not None
      else f'{_num(self.below)})'
      if self.below is not None
      else None
    )
    if low and high:
      text = f'{what} in {low}, {high}'
    elif low:
      text = f'{what} {">=" if low[0] == "[" else ">"} {low[1:]}'
    elif high:
      text = f'{what} {"<=" if high[-1] == "]" else "<"} {high[:-1]}'
    else:
      text = what
    return text + ''.join(f', or {_num(s)}' for s in self.special)

  def accepts(self, value: Any) -> bool:
    """Whether ``value`` (a scalar) is of the right type and within the bounds."""
    if isinstance(value, bool) or not isinstance(value, int | float):
      return False
    if self.kind is int and not isinstance(value, int):
      return False
    if not math.isfinite(value):
      return False
    if value in self.special:
      return True
    return (
      (self.minimum is None or value >= self.minimum)
      and (self.above is None or value > self.above)
      and (self.below is None or value < self.below)
      and (self.maximum is None or value <= self.maximum)
    )


def _num(x: float | None) -> str:
  return f'{x:g}' if isinstance(x, float) else str(x)


def _int(minimum: int, zero: str = REFUSED, **kw) -> Rule:
  return Rule(int, minimum=minimum, zero=zero, **kw)


def _positive(kind: type = float) -> Rule:
  return Rule(kind, above=0)


def _non_negative(zero: str, kind: type = float) -> Rule:
  return Rule(kind, minimum=0, zero=zero)


_SEED = _int(0, 'an ordinary seed')

# key (without 'config.') -> rule. The texts are the 'what 0 / negative means' of the README's
# table; tests/test_config_checks.py checks each against the bounds.
RULES: dict[str, Rule] = {
  'seed': _SEED,
  'model.num_features': _int(1),
  'model.num_rrg': _int(1),
  'model.num_mrb': _int(1),
  'model.height': _int(1),
  'model.width': _int(1),
  'model.channel_factor': _int(1),
  'model.reduction': _int(1),
  'model.kernel_size': _int(1),
  'data.validation_percent': Rule(
    float,
    minimum=0,
    below=100,
    zero='hold none out (name=folder then needs data.validation_folder)',
  ),
  'data.synthetic_pairs': _int(1),
  'data.synthetic_size': _int(1),
  'data.synthetic_eval_pairs': _int(1),
  'data.synthetic_seed': _SEED,
  'data.crop_size': _int(1),
  'data.mixup_alpha': _positive(),
  'data.mixup_start_step': _int(0, 'MixUp from the first step'),
  'data.num_workers': _int(0, 'batches made in-process'),
  'data.eval_batch_size': _int(1),
  'train.batch_size': _int(1),
  'train.num_epochs': _non_negative('train for num_steps instead'),
  'train.num_steps': _int(1),
  'train.log_every_steps': _int(1),
  'train.eval_every_steps': _int(0, 'validate only at the end'),
  'train.checkpoint_every_steps': _int(1),
  'train.keep_checkpoints': _int(1),
  'train.num_grid_images': _int(0, 'no validation grids'),
  'train.stage_steps': _int(1),
  'train.profile_steps': _int(0, 'no trace'),
  'train.profile_start_step': _int(0, 'trace from the first step of the run, compile included'),
  'train.stage_crop_sizes': _int(1),
  'train.stage_batch_sizes': _int(1),
  'optim.learning_rate': _positive(),
  'optim.end_learning_rate': _non_negative('decay to 0'),
  'optim.warmup_steps': _int(0, 'no warm-up'),
  'optim.beta1': Rule(float, minimum=0, below=1, zero='no first-moment averaging'),
  'optim.beta2': Rule(float, minimum=0, below=1, zero='no second-moment averaging'),
  'optim.weight_decay': _non_negative('plain Adam'),
  'optim.grad_clip_norm': _non_negative('no clipping'),
  'optim.restart_periods': _int(1),
  'optim.restart_weights': _non_negative('that cycle stays at its minimum'),
  'optim.restart_eta_mins': _non_negative('that cycle decays to 0'),
  'loss.charbonnier_eps': _positive(),
  'eval.gamma': _positive(),
  'eval.num_grids': _int(0, 'no grids', special=(-1,), negative='-1: all images; others refused'),
  'predict.tile_size': _int(0, 'never tile'),
  'predict.tile_overlap': _int(0, 'no mirrored context; tiles abut, no blending'),
  'predict.bucket': _int(1),  # 1 = pad only to the model's size multiple
  'predict.max_tile_megapixels': _non_negative('tile_size alone bounds the tiles'),
  'predict.jpeg_quality': Rule(int, minimum=1, maximum=100),
}


# model.arch='mirnet_v2' (configs/lol_v2.py): its model keys, in place of MIRNet's.
V2_MODEL_RULES: dict[str, Rule] = {
  'model.num_features': _int(1),
  'model.channel_factor': _positive(),
  'model.num_mrb': _int(1),
  'model.reduction': _int(1),
}


def _arch(config: Mapping[str, Any]) -> str:
  model = config.get('model', {})
  return model.get('arch', 'mirnet') if hasattr(model, 'get') else 'mirnet'


def rules_for(config: Mapping[str, Any]) -> dict[str, Rule]:
  """``RULES`` with the model rows of ``config``'s architecture."""
  if _arch(config) != 'mirnet_v2':
    return RULES
  rules = {k: v for k, v in RULES.items() if not k.startswith('model.')}
  return {**rules, **V2_MODEL_RULES}


def _leaves(tree: Mapping[str, Any], prefix: str = '') -> Iterator[tuple[str, Any]]:
  for key, value in tree.items():
    name = f'{prefix}{key}'
    if isinstance(value, Mapping) or hasattr(value, 'items') and not isinstance(value, str):
      yield from _leaves(value, name + '.')
    else:
      yield name, value


def _is_numeric(value: Any) -> bool:
  if isinstance(value, list | tuple):
    return bool(value) and all(_is_numeric(v) for v in value)
  return isinstance(value, int | float) and not isinstance(value, bool)


def unchecked_keys(config: Mapping[str, Any]) -> list[str]:
  """Numeric keys of ``config`` that have no rule in ``RULES`` (a test keeps this empty)."""
  rules = rules_for(config)
  return [key for key, value in _leaves(config) if _is_numeric(value) and key not in rules]


def _dtype_errors(config: Mapping[str, Any]) -> Iterator[str]:
  dtype = config['model']['dtype']
  if dtype == 'float16':
    yield (
      "config.model.dtype='float16': not supported (float16 needs loss scaling, which the "
      "trainer does not do); use 'bfloat16' (same memory, float32's range) or 'float32'"
    )
  elif dtype not in SUPPORTED_DTYPES:
    yield f'config.model.dtype={dtype!r}: must be one of {", ".join(SUPPORTED_DTYPES)}'


def _choice_errors(config: Mapping[str, Any]) -> Iterator[str]:
  leaves = dict(_leaves(config))
  for key, known in CHOICES.items():
    if key in leaves and leaves[key] not in known:
      yield f'config.{key}={leaves[key]!r}: unknown; must be one of {", ".join(known)}'
  for key in BOOLEANS:
    if key in leaves and not isinstance(leaves[key], bool):
      yield f'config.{key}={leaves[key]!r}: must be True or False'


def _size_multiple(model: Mapping[str, Any]) -> tuple[int, str]:
  """What training crops must be multiples of, and why."""
  if model.get('arch', 'mirnet') == 'mirnet_v2':
    return V2_SIZE_MULTIPLE, "MIRNet-v2's two x2 down-samplings"
  return 2 ** (model['height'] - 1), '2**(config.model.height - 1), the coarsest stream'


def _crop_errors(config: Mapping[str, Any]) -> Iterator[str]:
  multiple, why = _size_multiple(config['model'])
  crop = config['data']['crop_size']
  if crop % multiple:
    yield f'config.data.crop_size={crop}: must be a multiple of {multiple} ({why})'
  crops = tuple(config['train'].get('stage_crop_sizes', ()))
  if any(c % multiple for c in crops):
    yield f'config.train.stage_crop_sizes={crops}: each must be a multiple of {multiple} ({why})'


def _stage_errors(config: Mapping[str, Any]) -> Iterator[str]:
  train = config['train']
  steps, crops, batches = (
    tuple(train.get(k, ())) for k in ('stage_steps', 'stage_crop_sizes', 'stage_batch_sizes')
  )
  if not len(steps) == len(crops) == len(batches):
    yield (
      f'config.train.stage_steps/stage_crop_sizes/stage_batch_sizes: must have the same length '
      f'(one entry per stage); got {len(steps)}, {len(crops)}, {len(batches)}'
    )
  elif steps and train['num_epochs'] > 0:
    # The recipe counts iterations: stages of different batches have no common epoch length.
    yield (
      f'config.train.num_epochs={train["num_epochs"]:g}: progressive stages count steps; set '
      'config.train.num_epochs=0 and config.train.num_steps (the stages run to num_steps)'
    )


def _model_errors(config: Mapping[str, Any]) -> Iterator[str]:
  model = config['model']
  if model.get('arch', 'mirnet') == 'mirnet_v2':
    return  # MIRNetV2.check_config checks its channel arithmetic when the model is made
  if model['kernel_size'] % 2 == 0:
    yield f'config.model.kernel_size={model["kernel_size"]}: must be odd (same-size convolutions)'
  if model['reduction'] > model['num_features']:
    yield (
      f'config.model.reduction={model["reduction"]}: must be <= config.model.num_features '
      f'({model["num_features"]}), or attention has no channels'
    )


def _optim_errors(config: Mapping[str, Any]) -> Iterator[str]:
  optim = config['optim']
  if optim.get('schedule', 'warmup_cosine') == 'cosine_restart_cyclic':
    cycles = tuple(
      tuple(optim[k]) for k in ('restart_periods', 'restart_weights', 'restart_eta_mins')
    )
    if not len(cycles[0]) == len(cycles[1]) == len(cycles[2]) >= 1:
      yield (
        'config.optim.restart_periods/restart_weights/restart_eta_mins: must have the same '
        f'length >= 1 (one entry per cycle) for cosine_restart_cyclic; got '
        f'{", ".join(str(len(c)) for c in cycles)}'
      )
    return  # end_learning_rate belongs to warmup_cosine
  if optim['end_learning_rate'] > optim['learning_rate']:
    yield (
      f'config.optim.end_learning_rate={optim["end_learning_rate"]:g}: must be <= '
      f'config.optim.learning_rate ({optim["learning_rate"]:g}), the peak it decays from'
    )


def _predict_errors(config: Mapping[str, Any]) -> Iterator[str]:
  predict = config['predict']
  if predict['tile_size'] and predict['tile_overlap'] >= predict['tile_size']:
    yield (
      f'config.predict.tile_overlap={predict["tile_overlap"]}: must be smaller than '
      f'config.predict.tile_size ({predict["tile_size"]})'
    )


_CROSS_CHECKS: tuple[Callable[[Mapping[str, Any]], Iterator[str]], ...] = (
  _dtype_errors,
  _model_errors,
  _crop_errors,
  _stage_errors,
  _optim_errors,
  _predict_errors,
)


def errors(config: Mapping[str, Any]) -> list[str]:
  """Every problem of ``config``, one message per bad key (empty when all is well)."""
  found = list(_choice_errors(config))
  rules = rules_for(config)
  for key, value in _leaves(config):
    rule = rules.get(key)
    if rule is None:
      continue
    values = value if isinstance(value, list | tuple) else [value]
    if not all(rule.accepts(v) for v in values):
      found.append(f'config.{key}={value!r}: must be {rule.requirement()}')
  if found:
    return found  # the cross-key rules assume values of the right type and range
  for cross_check in _CROSS_CHECKS:
    try:
      found.extend(cross_check(config))
    except (KeyError, AttributeError):
      # A config without those keys (another architecture's model section, a reduced test
      # config) has nothing to relate there.
      continue
  return found


def check(config: Mapping[str, Any]) -> None:
  """Raises ConfigError naming every bad key of ``config``, on one line.

  Args:
    config: the full config (a ConfigDict or a mapping of the same shape).

  Raises:
    ConfigError: a value is of the wrong type, out of range, or inconsistent with another.
  """
  found = errors(config)
  if found:
    raise ConfigError('; '.join(found))


def table() -> str:
  """The markdown table 'key | what 0 means | what negative means' of every rule."""
  lines = ['| key | allowed | what 0 means | what negative means |', '|---|---|---|---|']
  for key, rule in RULES.items():
    lines.append(f'| `{key}` | {rule.requirement()} | {rule.zero} | {rule.negative} |')
  return '\n'.join(lines)
