"""Official PyTorch MIRNet weights (swz30/MIRNet) -> Flax parameters for ``mirnet_jax.models``.

    python -m mirnet_jax.convert --source model_best.pth --output DIR

``--source`` is a PyTorch checkpoint (needs the ``convert`` extra, i.e. torch) or a ``.npz``
of the ``state_dict``. The model's shape is read off the weights. ``DIR`` receives the
parameters (orbax) and ``model.json``; ``--mode=eval``/``--mode=predict`` load it directly.

Every Flax parameter is filled from the official key(s) it stands for; where the official
model shares a tensor under several keys (see mirnet_jax/models/mirnet.py), all of them
must hold the same values. The fixed blur-pool buffers (``*.filt``) are not parameters.
"""

import json
import pathlib
import re
import sys
from collections.abc import Iterator, Mapping
from typing import Any

import numpy as np

from mirnet_jax.models import MIRNet, param_shapes
from mirnet_jax.models.mirnet import stream_features

# How an official tensor becomes a Flax one: conv weights are [out, in, kh, kw] -> HWIO,
# transposed-conv weights [in, out, kh, kw] -> [kh, kw, in, out], PReLU weights [1] -> ().
_TO_FLAX = {
  'conv': lambda a: np.transpose(a, (2, 3, 1, 0)),
  'deconv': lambda a: np.transpose(a, (2, 3, 0, 1)),
  'prelu': lambda a: np.reshape(a, ()),
}
_TO_TORCH_SHAPE = {
  'conv': lambda s: (s[3], s[2], s[0], s[1]),
  'deconv': lambda s: (s[2], s[3], s[0], s[1]),
  'prelu': lambda s: (1,),
}


class ConversionError(ValueError):
  """The state_dict does not fit the model; the message lists every problem."""


def _resampler_keys(model: MIRNet) -> Iterator[tuple[str, str, int]]:
  """(Flax name, official name, number of stages) of an MRB's down/up/last_up modules."""
  f = model.channel_factor
  feats = [stream_features(model.num_features, f, j) for j in range(model.height)]
  for j in range(model.height):
    for i in range(1, model.height - j):  # stream j down to every lower-resolution stream
      s = 2**i
      yield f'down_{feats[j]}_{s}', f'down.{feats[j]}_{s}', i
    for i in range(1, j + 1):  # stream j up to every higher-resolution stream
      s = 2**i
      yield f'up_{feats[j]}_{s}', f'up.{feats[j]}_{s}', i
  for k in range(1, model.height):
    yield f'last_up_{k}', f'last_up.{k}', k


def _down_stage() -> list[tuple[str, str, str]]:
  return [
    ('top_conv_0/kernel', 'top.0.weight', 'conv'),
    ('top_prelu_0/slope', 'top.1.weight', 'prelu'),
    ('top_conv_1/kernel', 'top.2.weight', 'conv'),
    ('top_prelu_1/slope', 'top.3.weight', 'prelu'),
    ('top_conv_2/kernel', 'top.5.weight', 'conv'),
    ('bot_conv/kernel', 'bot.1.weight', 'conv'),
  ]


def _up_stage() -> list[tuple[str, str, str]]:
  return [
    ('top_conv_0/kernel', 'top.0.weight', 'conv'),
    ('top_prelu_0/slope', 'top.1.weight', 'prelu'),
    ('top_deconv/kernel', 'top.2.weight', 'deconv'),
    ('top_prelu_1/slope', 'top.3.weight', 'prelu'),
    ('top_conv_1/kernel', 'top.4.weight', 'conv'),
    ('bot_conv/kernel', 'bot.1.weight', 'conv'),
  ]


def key_map(model: MIRNet) -> dict[str, tuple[list[str], str]]:
  """Flax parameter path ('a/b/kernel') -> (official keys holding it, kind of tensor)."""
  out: dict[str, tuple[list[str], str]] = {}

  def add(path: str, keys: list[str], kind: str) -> None:
    out.setdefault(path, ([], kind))[0].extend(keys)

  add('conv_in/kernel', ['conv_in.weight'], 'conv')
  add('conv_out/kernel', ['conv_out.weight'], 'conv')
  for r in range(model.num_rrg):
    add(f'rrg_{r}/conv/kernel', [f'body.{r}.body.{model.num_mrb}.weight'], 'conv')
    for m in range(model.num_mrb):
      fp, tp = f'rrg_{r}/mrb_{m}/', f'body.{r}.body.{m}.'
      add(fp + 'conv_out/kernel', [tp + 'conv_out.weight'], 'conv')
      for j in range(model.height):
        columns = [f'{tp}blocks.{j}.{i}.' for i in range(model.width)]  # shared DAU
        add('dau_prelu', [c + 'body.1.weight' for c in columns], 'prelu')  # network-wide
        for flax_name, torch_name in [
          ('conv_0', 'body.0'),
          ('conv_1', 'body.2'),
          ('spatial_attention/conv', 'SA.spatial.conv'),
          ('channel_attention/squeeze', 'CA.conv_du.0'),
          ('channel_attention/excite', 'CA.conv_du.2'),
          ('conv1x1', 'conv1x1'),
        ]:
          add(
            f'{fp}dau_{j}/{flax_name}/kernel', [f'{c}{torch_name}.weight' for c in columns], 'conv'
          )
        sk, tk = f'{fp}skff_{j}/', f'{tp}selective_kernel.{j}.'
        add(sk + 'conv_du/kernel', [tk + 'conv_du.0.weight'], 'conv')
        add(sk + 'prelu/slope', [tk + 'conv_du.1.weight'], 'prelu')
        for i in range(model.height):
          add(f'{sk}fc_{i}/kernel', [f'{tk}fcs.{i}.weight'], 'conv')
      for flax_name, torch_name, stages in _resampler_keys(model):
        is_down = flax_name.startswith('down')
        for s in range(stages):
          for fsub, tsub, kind in _down_stage() if is_down else _up_stage():
            add(f'{fp}{flax_name}/stage_{s}/{fsub}', [f'{tp}{torch_name}.body.{s}.{tsub}'], kind)
  return out


def _flatten(tree: Mapping[str, Any], prefix: str = '') -> dict[str, Any]:
  flat = {}
  for k, v in tree.items():
    if isinstance(v, Mapping):
      flat.update(_flatten(v, f'{prefix}{k}/'))
    else:
      flat[f'{prefix}{k}'] = v
  return flat


def _unflatten(flat: Mapping[str, Any]) -> dict[str, Any]:
  tree: dict[str, Any] = {}
  for path, v in flat.items():
    *parents, leaf = path.split('/')
    node = tree
    for p in parents:
      node = node.setdefault(p, {})
    node[leaf] = v
  return tree


def _strip(state_dict: Mapping[str, Any]) -> dict[str, np.ndarray]:
  """Unwraps ``{'state_dict': ...}`` and DataParallel ``module.`` prefixes."""
  if 'state_dict' in state_dict and isinstance(state_dict['state_dict'], Mapping):
    state_dict = state_dict['state_dict']
  return {
    (k[len('module.') :] if k.startswith('module.') else k): np.asarray(v, np.float32)
    for k, v in state_dict.items()
  }


def params_from_torch(state_dict: Mapping[str, Any], model: MIRNet) -> dict[str, Any]:
  """Converts an official MIRNet ``state_dict`` (official key -> array) to Flax params.

  Args:
    state_dict: official key -> numpy array (or anything ``np.asarray`` takes), possibly
      with ``module.`` prefixes or wrapped as ``{'state_dict': ...}``.
    model: the MIRNet whose parameters to fill (only its structure is used).

  Returns:
    The parameter pytree that goes under ``'params'``.

  Raises:
    ConversionError: listing every missing key, unexpected key, shape mismatch and
      inconsistent shared tensor at once.
  """
  sd = _strip(state_dict)
  targets = _flatten(param_shapes(model))
  mapping = key_map(model)
  problems: list[str] = []
  if set(mapping) != set(targets):  # a bug in key_map, not in the user's file
    raise AssertionError(f'key_map out of sync with the model: {set(mapping) ^ set(targets)}')
  expected = {k for keys, _ in mapping.values() for k in keys}
  missing = sorted(expected - set(sd))
  unexpected = sorted(k for k in set(sd) - expected if not k.endswith('.filt'))
  problems += [f'missing key: {k}' for k in missing]
  problems += [f'unexpected key: {k}' for k in unexpected]
  params = {}
  for path, (keys, kind) in sorted(mapping.items()):
    want = tuple(_TO_TORCH_SHAPE[kind](targets[path].shape))
    present = [k for k in keys if k in sd]
    bad = [k for k in present if sd[k].shape != want]
    problems += [f'shape mismatch: {k} is {list(sd[k].shape)}, expected {list(want)}' for k in bad]
    present = [k for k in present if k not in bad]
    if not present:
      continue
    first = sd[present[0]]
    for k in present[1:]:
      if not np.array_equal(sd[k], first):
        problems.append(
          f'inconsistent shared tensor: {k} differs from {present[0]} (the official model '
          f'shares them, max abs difference {np.max(np.abs(sd[k] - first)):.3g})'
        )
    params[path] = _TO_FLAX[kind](first)
  if problems:
    raise ConversionError(
      f'state_dict does not fit {model_summary(model)}: {len(problems)} problem(s):\n  '
      + '\n  '.join(problems)
    )
  return _unflatten(params)


def model_summary(model: MIRNet) -> str:
  return (
    f'MIRNet(num_features={model.num_features}, num_rrg={model.num_rrg}, '
    f'num_mrb={model.num_mrb}, height={model.height}, width={model.width})'
  )


def infer_model_config(state_dict: Mapping[str, Any]) -> dict[str, int]:
  """Reads num_features, num_rrg, num_mrb, height and width off official key names."""
  sd = _strip(state_dict)
  if 'conv_in.weight' not in sd:
    raise ConversionError('not an official MIRNet state_dict: no key conv_in.weight')
  found = [re.match(r'body\.(\d+)\.body\.(\d+)\.blocks\.(\d+)\.(\d+)\.', k) for k in sd]
  idx = np.array([[int(g) for g in m.groups()] for m in found if m])
  if not len(idx):
    raise ConversionError('not an official MIRNet state_dict: no body.R.body.M.blocks.* keys')
  return dict(
    num_features=int(sd['conv_in.weight'].shape[0]),
    num_rrg=int(idx[:, 0].max() + 1),
    num_mrb=int(idx[:, 1].max() + 1),
    height=int(idx[:, 2].max() + 1),
    width=int(idx[:, 3].max() + 1),
  )


def load_state_dict(source: str | pathlib.Path) -> dict[str, np.ndarray]:
  """Reads a ``.npz`` state_dict, or a PyTorch ``.pth``/``.pt`` (needs torch)."""
  source = pathlib.Path(source)
  if not source.is_file():
    raise FileNotFoundError(f'{source}: no such file')
  if source.suffix == '.npz':
    with np.load(source) as f:
      return {k: f[k] for k in f.files}
  try:
    import torch  # only this loader needs torch: pip install 'mirnet-jax[convert]'
  except ImportError as e:
    raise ImportError(
      f'{source}: reading PyTorch checkpoints needs torch; pip install "mirnet-jax[convert]"'
    ) from e
  obj = torch.load(source, map_location='cpu', weights_only=True)
  if 'state_dict' in obj and isinstance(obj['state_dict'], Mapping):
    obj = obj['state_dict']
  return {k: v.detach().cpu().numpy() for k, v in obj.items() if hasattr(v, 'detach')}


def main(argv: list[str] | None = None) -> int:
  import argparse

  from mirnet_jax import checkpoints

  parser = argparse.ArgumentParser(
    prog='python -m mirnet_jax.convert', description=__doc__.split('\n\n')[0]
  )
  parser.add_argument('--source', required=True, help='official .pth/.pt or state_dict .npz')
  parser.add_argument('--output', required=True, help='directory to write (must not exist)')
  args = parser.parse_args(argv)
  try:
    sd = load_state_dict(args.source)
    model_config = infer_model_config(sd)
    params = params_from_torch(sd, MIRNet(**model_config))
    checkpoints.export_params(args.output, params, model_config)
  except (OSError, ImportError, ValueError) as e:
    print(f'convert: error: {e}', file=sys.stderr)
    return 1
  print(f'convert: wrote {args.output} ({json.dumps(model_config)})')
  return 0


if __name__ == '__main__':
  sys.exit(main())
