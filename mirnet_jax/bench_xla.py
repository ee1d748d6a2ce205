"""What XLA says about a compiled step: FLOPs, memory plan, device peak, a GEMM peak to compare.

benchmark.py's ``train_step`` and ``forward`` modes report these next to the timings. Every
figure is ``None`` where the backend does not provide it (JSON ``null``), never a guess.

* ``flops``: ``compiled.cost_analysis()['flops']``. For a program sharded over N devices XLA
  analyses the per-device (SPMD-partitioned) program, so this is the work of ONE device per
  step; the whole step does N times as much. Achieved FLOP/s and the fraction of peak are per
  device accordingly.
* ``memory``: ``compiled.memory_analysis()``, the buffer plan of one device's program.
  ``xla_peak_bytes = argument + output + temp - alias``: inputs and outputs live together with
  the temporaries, except outputs that reuse (alias) a donated input, which count once.
* ``device_peak_bytes``: the allocator's ``peak_bytes_in_use`` (GPU, TPU); CPU has no stats.
* ``gemm_tflops``: a jitted square matrix product timed on one device, the practical peak the
  ``fraction_of_peak`` is measured against when no ``--peak_tflops`` is given.
"""

import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

GIB = 2**30


def flops(compiled: Any) -> float | None:
  """XLA's FLOP count of ``compiled`` (one device's program), or None if not reported.

  ``cost_analysis()`` returns a dict in current JAX, a list with one dict per program in older
  versions, and may be None or lack the key on some backends.
  """
  try:
    analysis = compiled.cost_analysis()
  except Exception:  # noqa: BLE001 - a backend without a cost model raises its own errors
    return None
  if isinstance(analysis, list | tuple):
    analysis = analysis[0] if analysis else None
  if not analysis:
    return None
  value = analysis.get('flops')
  return float(value) if value is not None and value >= 0 else None


# memory_analysis() attribute -> summary key.
_MEMORY_FIELDS = {
  'argument_size_in_bytes': 'argument_bytes',
  'output_size_in_bytes': 'output_bytes',
  'temp_size_in_bytes': 'temp_bytes',
  'alias_size_in_bytes': 'alias_bytes',
  'generated_code_size_in_bytes': 'generated_code_bytes',
}
MEMORY_KEYS = (*_MEMORY_FIELDS.values(), 'xla_peak_bytes', 'xla_peak_gib')


def memory(compiled: Any) -> dict[str, int | float | None]:
  """The compiled buffer plan (``MEMORY_KEYS``), every value None where the backend has none."""
  try:
    stats = compiled.memory_analysis()
  except Exception:  # noqa: BLE001 - not implemented on every backend
    stats = None
  out: dict[str, Any] = {
    key: (
      None if stats is None or getattr(stats, attr, None) is None else int(getattr(stats, attr))
    )
    for attr, key in _MEMORY_FIELDS.items()
  }
  parts = [out['argument_bytes'], out['output_bytes'], out['temp_bytes'], out['alias_bytes']]
  if any(p is None for p in parts):
    out['xla_peak_bytes'] = out['xla_peak_gib'] = None
  else:
    arg, output, temp, alias = parts
    out['xla_peak_bytes'] = arg + output + temp - alias
    out['xla_peak_gib'] = round(out['xla_peak_bytes'] / GIB, 6)
  return out


def device_peak_bytes(device: Any = None) -> int | None:
  """``peak_bytes_in_use`` of ``device`` (default: the first), None where it keeps no stats."""
  device = jax.devices()[0] if device is None else device
  try:
    stats = device.memory_stats()
  except Exception:  # noqa: BLE001 - some backends raise instead of returning None
    return None
  if not stats or 'peak_bytes_in_use' not in stats:
    return None
  return int(stats['peak_bytes_in_use'])


def gemm_tflops(n: int = 2048, repeats: int = 5, dtype: Any = jnp.float32) -> float:
  """TFLOP/s of a jitted n x n @ n x n product on the first device: the best of ``repeats``.

  The first call compiles and warms up and is not timed; the best (not the median) run is the
  figure, as a peak is what the machine can do, not what it did under interference. A product
  does 2 n^3 FLOPs (n^3 multiply-adds).
  """
  device = jax.devices()[0]
  rng = np.random.default_rng(0)
  a, b = (jax.device_put(rng.random((n, n), np.float32).astype(dtype), device) for _ in range(2))
  matmul = jax.jit(jnp.matmul)
  jax.block_until_ready(matmul(a, b))
  best = float('inf')
  for _ in range(repeats):
    start = time.perf_counter()
    jax.block_until_ready(matmul(a, b))
    best = min(best, time.perf_counter() - start)
  return 2 * n**3 / best / 1e12


def throughput(
  flops_per_step: float | None, step_s: float | None, peak_tflops: float | None
) -> dict[str, float | None]:
  """``achieved_tflops`` (per device) and ``fraction_of_peak``; None when a factor is missing."""
  achieved = None
  if flops_per_step is not None and step_s:
    achieved = flops_per_step / step_s / 1e12
  fraction = achieved / peak_tflops if achieved is not None and peak_tflops else None
  return {'achieved_tflops': significant(achieved), 'fraction_of_peak': significant(fraction)}


def significant(x: float | None, digits: int = 6) -> float | None:
  """``x`` to ``digits`` significant figures (a CPU's 1e-5 TFLOP/s keeps its precision)."""
  return None if x is None else float(f'{x:.{digits}g}')
