"""benchmark.py's ``ops`` mode: where one compiled step's time goes, per XLA operation.

One step, after a warm-up one, runs under ``jax.profiler``'s trace. XLA records each operation
it runs (on CPU each thunk: a fusion, a convolution, a matmul) as a trace event named by its
HLO instruction, and the compiled module's metadata names the jax operation each instruction
came from, e.g. ``jvp(MIRNet)/rrg_0/mrb_1/dau_0/conv_0/conv_general_dilated``, with
``transpose(...)`` around the backward pass's. The events are summed by pass (forward,
backward, other: the loss and the optimiser's update), by layer (the module path with the
block indices folded: ``rrg_*/mrb_*/dau_0/conv_0``), by the jax primitive and by XLA's kind of
operation (``ynn_fusion``, ``dot``, a loop fusion). TensorBoard's profile plugin shows the same
trace (``config.train.profile_steps``); this mode gives the table in one command, as JSON.

Written by hand because no library sums a trace by the model's layers: the profile plugin's
tables are per HLO instruction, in its UI. Event times are summed over the threads that run
them, so on a multi-core CPU ``thunk_s`` can exceed the wall-clock ``step_s``.
"""

import collections
import glob
import gzip
import json
import os
import re
import tempfile
import time
from collections.abc import Callable
from typing import Any

import jax

from mirnet_jax import bench_model

OF = ('train_step', 'forward')  # --ops_of
_INSTRUCTION = re.compile(r'\s*(?:ROOT )?%?([\w.\-]+) = .*?metadata=\{[^}]*op_name="([^"]*)"')
_BLOCK = re.compile(r'^(rrg|mrb)_\d+$')


def op_names(hlo_text: str) -> dict[str, str]:
  """HLO instruction name -> the jax op_name of its metadata, from ``compiled.as_text()``."""
  names = {}
  for line in hlo_text.splitlines():
    m = _INSTRUCTION.match(line)
    if m:
      names[m.group(1)] = m.group(2)
  return names


def classify(op_name: str, of: str) -> tuple[str, str, str]:
  """(pass, layer, primitive) of an op_name: 'forward' | 'backward' | 'other', the module path
  with block indices folded ('rrg_*/mrb_*/dau_0/conv_0'; '' outside the model), and the last
  component (the jax primitive)."""
  if of == 'forward':
    kind = 'forward'
  elif 'transpose(' in op_name:
    kind = 'backward'
  elif 'jvp(' in op_name:
    kind = 'forward'
  else:
    kind = 'other'
  parts = [p for p in op_name.split('/') if p]
  primitive = parts[-1] if parts else ''
  layer: list[str] = []
  for part in parts[:-1]:
    if '(' in part or ')' in part:  # jit(...), jvp(...), transpose(...): wrappers, not modules
      if layer:
        break  # a custom_vjp's backward repeats the module path after its wrapper
      continue
    layer.append(_BLOCK.sub(lambda m: f'{m.group(1)}_*', part))
  return kind, '/'.join(layer), primitive


def summarise(events: list[tuple[str, float]], names: dict[str, str], of: str, top: int) -> dict:
  """Sums ``(instruction, seconds)`` trace events by pass, layer, primitive and HLO kind."""
  by_pass: collections.Counter = collections.Counter()
  by_kind: collections.Counter = collections.Counter()
  by_primitive: collections.Counter = collections.Counter()
  rows: collections.Counter = collections.Counter()
  counts: collections.Counter = collections.Counter()
  for instruction, seconds in events:
    kind, layer, primitive = classify(names[instruction], of)
    hlo_kind = instruction.split('.')[0]  # 'ynn_fusion.12' -> 'ynn_fusion'
    by_pass[kind] += seconds
    by_kind[hlo_kind] += seconds
    by_primitive[primitive] += seconds
    key = (kind, layer, primitive, hlo_kind)
    rows[key] += seconds
    counts[key] += 1
  total = sum(by_pass.values())
  rounded = lambda c, n=None: {k: round(v, 4) for k, v in c.most_common(n)}
  ops = [
    {
      'event': 'op',
      'pass': k[0],
      'layer': k[1],
      'primitive': k[2],
      'hlo_kind': k[3],
      'thunk_s': round(s, 4),
      'share': round(s / total, 4) if total else None,
      'calls': counts[k],
    }
    for k, s in rows.most_common(top)
  ]
  return {
    'ops': ops,
    'thunk_s': round(total, 4),
    'by_pass': rounded(by_pass),
    'by_hlo_kind': rounded(by_kind, 12),
    'by_primitive': rounded(by_primitive, 12),
  }


def trace_events(trace_dir: str, names: dict[str, str]) -> list[tuple[str, float]]:
  """``(instruction, seconds)`` of every complete event in the trace named by an instruction."""
  paths = glob.glob(os.path.join(trace_dir, '**', '*.trace.json.gz'), recursive=True)
  if not paths:
    raise RuntimeError(f'jax.profiler wrote no perfetto trace under {trace_dir}')
  with gzip.open(paths[0]) as f:
    trace = json.load(f)
  return [
    (e['name'], e.get('dur', 0) / 1e6)
    for e in trace.get('traceEvents', [])
    if e.get('ph') == 'X' and e.get('name') in names
  ]


def bench_ops(
  config: Any,
  *,
  of: str,
  batch: int,
  height: int,
  width: int,
  remat: str = 'none',
  top: int = 40,
  emit: Callable[[dict], None] = bench_model.emit,
) -> dict:
  """``ops``: compiles ``of`` (train_step | forward), runs it once to warm up, traces one more
  run, and emits the ``top`` rows (``op`` lines) and a ``summary`` (returned too)."""
  if of not in OF:
    raise ValueError(f'--ops_of: unknown value {of!r}; known: {list(OF)}')
  step = bench_model.compile_step(config, of, batch, height, width, remat)
  compiled = step.compiled
  emit({'event': 'compile', 'mode': 'ops', 'compile_s': round(step.compile_s, 3)})
  names = op_names(compiled.as_text())
  args = step.args()
  out = compiled(*args)  # the warm-up run: first-call allocations stay out of the trace
  jax.block_until_ready(out)
  if of == 'train_step':
    args = (out[0], args[1])  # the state was donated
  with tempfile.TemporaryDirectory(prefix='mirnet_ops_') as trace_dir:
    jax.profiler.start_trace(trace_dir, create_perfetto_trace=True)
    start = time.perf_counter()
    jax.block_until_ready(compiled(*args))
    step_s = time.perf_counter() - start
    jax.profiler.stop_trace()
    events = trace_events(trace_dir, names)
  table = summarise(events, names, of, top)
  for row in table.pop('ops'):
    emit(row)
  summary = {
    'event': 'summary',
    'mode': 'ops',
    'of': of,
    **step.fields(config, batch, height, width, remat),
    'compile_s': round(step.compile_s, 3),
    'step_s': round(step_s, 4),
    'events': len(events),
    **table,
    'devices': bench_model.devices(),
    'jax': jax.__version__,
  }
  emit(summary)
  return summary
