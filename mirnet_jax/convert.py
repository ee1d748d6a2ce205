"""Official PyTorch weights -> Flax parameters for ``mirnet_jax.models``: MIRNet
(swz30/MIRNet) and MIRNet-v2 (swz30/MIRNetv2).

    python -m mirnet_jax.convert --source model_best.pth --output DIR
    python -m mirnet_jax.convert --source enhancement_lol.pth --output DIR

``--source`` is a PyTorch checkpoint (needs the ``convert`` extra, i.e. torch) or a ``.npz``
of the ``state_dict``; local or ``gs://``. The architecture and its shape are read off the
keys. ``DIR`` receives the parameters (orbax) and ``model.json`` (with ``arch``);
``--mode=eval``/``--mode=predict`` load it directly.

Every Flax parameter is filled from the official key(s) it stands for; where the official
model shares a tensor under several keys (see mirnet_jax/models/mirnet.py), all of them
must hold the same values. The fixed blur-pool buffers (``*.filt``) are not parameters.
"""

import json
import re
import sys
from collections.abc import Iterator, Mapping
from typing import Any

import numpy as np
from etils import epath
from flax import traverse_util

from mirnet_jax.models import MIRNet, MIRNetV2, architecture, model_config, param_shapes
from mirnet_jax.models.mirnet import stream_features
from mirnet_jax.models.mirnet_v2 import RRG_GROUPS, stream_channels

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


def key_map(model: MIRNet | MIRNetV2) -> dict[str, tuple[list[str], str]]:
  """Flax parameter path ('a/b/kernel') -> (official keys holding it, kind of tensor)."""
  if isinstance(model, MIRNetV2):
    return _key_map_v2(model)
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


def _key_map_v2(model: MIRNetV2) -> dict[str, tuple[list[str], str]]:
  """``key_map`` of MIRNet-v2: every tensor has exactly one official key (the MRB's reuse of
  its RCBs and SKFFs is one module in both codes)."""
  out: dict[str, tuple[list[str], str]] = {
    'conv_in/kernel': (['conv_in.weight'], 'conv'),
    'conv_out/kernel': (['conv_out.weight'], 'conv'),
  }
  resamplers = [
    ('down2/conv', 'down2.body.0.bot.1'),
    ('down4_0/conv', 'down4.0.body.0.bot.1'),
    ('down4_1/conv', 'down4.1.body.0.bot.1'),
  ] + [(f'up{s}_{c}/conv', f'up{s}_{c}.body.0.bot.0') for s in (21, 32) for c in (1, 2)]
  rcb = [
    ('conv_0', 'body.0'),
    ('conv_1', 'body.2'),
    ('context/mask', 'gcnet.conv_mask'),
    ('context/add_0', 'gcnet.channel_add_conv.0'),
    ('context/add_1', 'gcnet.channel_add_conv.2'),
  ]
  for r in range(len(RRG_GROUPS)):
    out[f'rrg_{r}/conv/kernel'] = ([f'body.{r}.body.{model.num_mrb}.weight'], 'conv')
    for m in range(model.num_mrb):
      fp, tp = f'rrg_{r}/mrb_{m}/', f'body.{r}.body.{m}.'
      names = [('conv_out', 'conv_out')] + resamplers
      names += [(f'rcb_{s}/{f}', f'dau_{s}.{t}') for s in ('top', 'mid', 'bot') for f, t in rcb]
      for s in ('top', 'mid'):
        names += [(f'skff_{s}/conv_du', f'skff_{s}.conv_du.0')]
        names += [(f'skff_{s}/fc_{i}', f'skff_{s}.fcs.{i}') for i in range(2)]
      for flax_name, torch_name in names:
        out[f'{fp}{flax_name}/kernel'] = ([f'{tp}{torch_name}.weight'], 'conv')
  return out


def _unwrap(obj: Mapping[str, Any]) -> Mapping[str, Any]:
  """The state dict inside a checkpoint: BasicSR's ``{'params': ...}`` (MIRNet-v2 releases),
  ``{'state_dict': ...}`` (MIRNet), or the state dict itself."""
  for key in ('params', 'state_dict'):
    if key in obj and isinstance(obj[key], Mapping):
      return obj[key]
  return obj


def _strip(state_dict: Mapping[str, Any]) -> dict[str, np.ndarray]:
  """Unwraps ``{'params': ...}``/``{'state_dict': ...}`` and DataParallel ``module.`` prefixes."""
  state_dict = _unwrap(state_dict)
  return {
    (k[len('module.') :] if k.startswith('module.') else k): np.asarray(v, np.float32)
    for k, v in state_dict.items()
  }


def params_from_torch(state_dict: Mapping[str, Any], model: MIRNet | MIRNetV2) -> dict[str, Any]:
  """Converts an official MIRNet or MIRNet-v2 ``state_dict`` (official key -> array) to Flax
  params.

  Args:
    state_dict: official key -> numpy array (or anything ``np.asarray`` takes), possibly
      with ``module.`` prefixes or wrapped as ``{'state_dict': ...}`` or ``{'params': ...}``.
    model: the MIRNet or MIRNetV2 whose parameters to fill (only its structure is used).

  Returns:
    The parameter pytree that goes under ``'params'``.

  Raises:
    ConversionError: listing every missing key, unexpected key, shape mismatch and
      inconsistent shared tensor at once; or naming both architectures when the file is of
      the other one.
  """
  sd = _strip(state_dict)
  found, wanted = detect_architecture(sd), architecture(model)
  if found is not None and found != wanted:
    raise ConversionError(
      f'the state_dict is an official {_NAMES[found]} one (arch {found!r}) but the model is '
      f'{model_summary(model)} (arch {wanted!r}); convert it with config.model.arch={found!r}'
    )
  targets = traverse_util.flatten_dict(param_shapes(model), sep='/')
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
  return traverse_util.unflatten_dict(params, sep='/')


_NAMES = {'mirnet': 'MIRNet', 'mirnet_v2': 'MIRNet-v2'}
# Key patterns only one architecture has: MIRNet's DAU columns, MIRNet-v2's RCBs.
_V1_MRB_KEY = re.compile(r'body\.(\d+)\.body\.(\d+)\.blocks\.(\d+)\.(\d+)\.')
_V2_MRB_KEY = re.compile(r'body\.(\d+)\.body\.(\d+)\.dau_top\.')


def detect_architecture(state_dict: Mapping[str, Any]) -> str | None:
  """'mirnet' or 'mirnet_v2' from official key names (after unwrapping), None if neither."""
  keys = [k.removeprefix('module.') for k in _unwrap(state_dict)]
  if any(_V2_MRB_KEY.match(k) for k in keys):
    return 'mirnet_v2'
  if any(_V1_MRB_KEY.match(k) for k in keys):
    return 'mirnet'
  return None


def model_summary(model: MIRNet | MIRNetV2) -> str:
  fields = {k: v for k, v in model_config(model).items() if k not in ('arch', 'dtype')}
  return f'{type(model).__name__}({", ".join(f"{k}={v}" for k, v in fields.items())})'


def infer_model_config(state_dict: Mapping[str, Any]) -> dict[str, Any]:
  """Reads the architecture and its shape off official key names (and conv_in's shape).

  Returns ``config.model`` fields with ``arch``: for MIRNet num_features, num_rrg, num_mrb,
  height and width; for MIRNet-v2 num_features, num_mrb and channel_factor.
  """
  sd = _strip(state_dict)
  arch = detect_architecture(sd)
  if 'conv_in.weight' not in sd or arch is None:
    raise ConversionError(
      'not an official MIRNet or MIRNet-v2 state_dict: needs conv_in.weight and '
      'body.R.body.M.blocks.* (MIRNet) or body.R.body.M.dau_top.* (MIRNet-v2) keys'
    )
  c0 = int(sd['conv_in.weight'].shape[0])
  if arch == 'mirnet_v2':
    found = [_V2_MRB_KEY.match(k) for k in sd]
    num_mrb = max(int(m.group(2)) for m in found if m) + 1
    mid = sd.get('body.0.body.0.dau_mid.body.0.weight')
    # The published factor when it gives these channels, else the ratio of the streams.
    factor = 1.5
    if mid is not None and stream_channels(c0, factor)[1] != mid.shape[0]:
      factor = float(mid.shape[0]) / c0
    return dict(arch=arch, num_features=c0, channel_factor=factor, num_mrb=num_mrb)
  idx = np.array([[int(g) for g in m.groups()] for m in map(_V1_MRB_KEY.match, sd) if m])
  return dict(
    arch=arch,
    num_features=c0,
    num_rrg=int(idx[:, 0].max() + 1),
    num_mrb=int(idx[:, 1].max() + 1),
    height=int(idx[:, 2].max() + 1),
    width=int(idx[:, 3].max() + 1),
  )


def load_state_dict(source: str | epath.PathLike) -> dict[str, np.ndarray]:
  """Reads a ``.npz`` state_dict, or a PyTorch ``.pth``/``.pt`` (needs torch); local or gs://."""
  source = epath.Path(source)
  if not source.is_file():
    raise FileNotFoundError(f'{source}: no such file')
  if source.suffix == '.npz':
    with source.open('rb') as f, np.load(f) as npz:
      return {k: npz[k] for k in npz.files}
  try:
    import torch  # only this loader needs torch: pip install 'mirnet-jax[convert]'
  except ImportError as e:
    raise ImportError(
      f'{source}: reading PyTorch checkpoints needs torch; pip install "mirnet-jax[convert]"'
    ) from e
  with source.open('rb') as f:
    try:
      obj = torch.load(f, map_location='cpu', weights_only=True)
    except Exception as e:  # torch raises assorted types for corrupt or foreign files
      raise ValueError(f'{source}: not a readable PyTorch checkpoint ({e})') from e
  if not isinstance(obj, Mapping):
    raise ValueError(f'{source}: holds a {type(obj).__name__}, not a state_dict')
  obj = _unwrap(obj)
  return {k: v.detach().cpu().numpy() for k, v in obj.items() if hasattr(v, 'detach')}


def main(argv: list[str] | None = None) -> int:
  import argparse

  from mirnet_jax import checkpoints
  from mirnet_jax.models import create_model

  parser = argparse.ArgumentParser(
    prog='python -m mirnet_jax.convert', description=__doc__.split('\n\n')[0]
  )
  parser.add_argument('--source', required=True, help='official .pth/.pt or state_dict .npz')
  parser.add_argument('--output', required=True, help='directory to write (must not exist)')
  args = parser.parse_args(argv)
  output = epath.Path(args.output)
  try:
    if output.exists():  # before the (slow) conversion; export_params checks again
      raise FileExistsError(f'{output}: already exists; choose a new --output directory')
    sd = load_state_dict(args.source)
    model = create_model(infer_model_config(sd))
    params = params_from_torch(sd, model)
    fields = model_config(model)
    checkpoints.export_params(output, params, fields)
  except (OSError, ImportError, ValueError) as e:
    print(f'convert: error: {e}', file=sys.stderr)
    return 1
  print(f'convert: wrote {output} ({json.dumps(fields)})')
  return 0


if __name__ == '__main__':
  sys.exit(main())
