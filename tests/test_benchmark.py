"""benchmark.py on tiny configs: what each mode reports and that the figures hang together
(XLA's FLOPs and memory plan, the peak, the overrides), never how fast anything is."""

import functools
import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import pytest

from mirnet_jax import bench_model, bench_xla, train_state
from mirnet_jax.models import count_params, create_model, ops, param_shapes
from tests import tiny

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MICRO = {
  'model.num_features': 4,
  'model.num_rrg': 1,
  'model.num_mrb': 1,
  'model.height': 2,
  'model.width': 1,
  'model.reduction': 2,
}
# The model modes' micro model: one stream (height 1) halves the train step's compile time.
STEP_MICRO = {**MICRO, 'model.height': 1}
MICRO_FLAGS = [f'--config.{k}={v}' for k, v in STEP_MICRO.items()]
BATCH, SIZE = 4, 16  # one 16x16 image per fake device
STEP_KEYS = ('step_s_median', 'steps_per_s', 'images_per_s', 'achieved_tflops', 'fraction_of_peak')
MEMORY_KEYS = (
  'argument_bytes',
  'output_bytes',
  'temp_bytes',
  'alias_bytes',
  'generated_code_bytes',
  'xla_peak_bytes',
  'xla_peak_gib',
)
MODEL_SUMMARY_KEYS = {
  'event',
  'mode',
  'compile_only',
  'batch',
  'height',
  'width',
  'dtype',
  'remat',
  'conv_kernel_grad',
  'params',
  'compile_s',
  *STEP_KEYS,
  'flops_per_step',
  'peak_tflops',
  'peak_source',
  *MEMORY_KEYS,
  'peak_bytes_in_use',
  'peak_rss_gib',
  'host_allocator',
  'devices',
  'jax',
}


def _micro_config(**extra):
  return tiny.config(**{**{k.replace('.', '__'): v for k, v in STEP_MICRO.items()}, **extra})


@functools.cache
def _run_model(mode: str, remat: str = 'none', compile_only: bool = False, peak: float = 2.5):
  """In-process bench_model on the micro config: (emitted records, summary). Cached: each
  compile takes seconds, and several tests read the same run."""
  records = []
  summary = bench_model.bench_model(
    _micro_config(),
    mode,
    batch=BATCH,
    height=SIZE,
    width=SIZE,
    steps=2,
    remat=remat,
    compile_only=compile_only,
    peak_tflops=peak,
    emit=records.append,
  )
  assert records[-1] is summary
  return records, summary


def _cli(*args: str) -> subprocess.CompletedProcess:
  return subprocess.run(
    [sys.executable, '-m', 'mirnet_jax.benchmark', '--config=configs/demo.py', *args],
    cwd=REPO,
    capture_output=True,
    text=True,
    timeout=300,
  )


def _bench(*args: str) -> list[dict]:
  done = _cli(*args)
  assert done.returncode == 0, done.stderr[-3000:]
  return [json.loads(line) for line in done.stdout.splitlines() if line.startswith('{')]


def _forward_flops_of_one_device(model, dtype=jnp.float32) -> float:
  """XLA's FLOPs of the unsharded forward of one device's share (BATCH / 4 images)."""
  x = jax.ShapeDtypeStruct((BATCH // jax.device_count(), SIZE, SIZE, 3), jnp.float32)
  fn = jax.jit(lambda p, x: model.apply({'params': p}, x))
  return fn.lower(param_shapes(model), x).compile().cost_analysis()['flops']


def test_forward_reports_the_flops_xla_counts_and_a_measured_peak():
  records, summary = _run_model('forward', peak=0.0)
  assert [r['event'] for r in records] == ['compile', 'buffers', 'step', 'step', 'summary']
  # Every progress event tells the memory now and the peak so far, which only grows.
  peaks = [r['peak_rss_gib'] for r in records[:-1]]
  assert all(0 < r['rss_gib'] <= r['peak_rss_gib'] + 1e-3 for r in records[:-1])
  assert peaks == sorted(peaks) and peaks[-1] <= summary['peak_rss_gib']
  # The summary's peak is that of the compile and the steps, read before the GEMM is measured.
  assert summary['peak_rss_gib'] == pytest.approx(peaks[-1], abs=2e-3)
  assert summary['host_allocator'] in ('glibc', 'tcmalloc', 'jemalloc', 'mimalloc', 'unknown')
  assert set(summary) == MODEL_SUMMARY_KEYS
  model = create_model(_micro_config().model)
  assert summary['params'] == count_params(param_shapes(model))
  # Per device: the sharded program of 4 images on 4 devices does one image's work.
  assert summary['flops_per_step'] > 0
  assert summary['flops_per_step'] == _forward_flops_of_one_device(model)
  assert summary['peak_source'] == 'measured_f32_gemm' and summary['peak_tflops'] > 0
  # step_s_median is rounded to 0.1 ms (a micro step takes about 1 ms), achieved_tflops to six
  # significant figures of the unrounded median: the median it implies is within 0.05 ms.
  implied_median = summary['flops_per_step'] / summary['achieved_tflops'] / 1e12
  assert implied_median == pytest.approx(summary['step_s_median'], rel=1e-5, abs=6e-5)
  assert summary['fraction_of_peak'] == pytest.approx(
    summary['achieved_tflops'] / summary['peak_tflops'], rel=1e-3
  )
  assert summary['alias_bytes'] == 0  # nothing donated
  assert summary['output_bytes'] == SIZE * SIZE * 3 * 4  # one f32 image per device


def test_train_step_reports_the_memory_plan_and_a_given_peak():
  records, summary = _run_model('train_step')
  assert [r['event'] for r in records] == ['compile', 'buffers', 'step', 'step', 'summary']
  assert set(summary) == MODEL_SUMMARY_KEYS
  assert summary['conv_kernel_grad'] == 'taps'  # tests/tiny.py pins it
  assert summary['peak_tflops'] == 2.5 and summary['peak_source'] == 'flag'
  assert summary['fraction_of_peak'] == pytest.approx(summary['achieved_tflops'] / 2.5, rel=1e-3)
  for key in MEMORY_KEYS[:-1]:
    assert isinstance(summary[key], int), key
  for key in ('argument_bytes', 'output_bytes', 'temp_bytes', 'alias_bytes'):
    assert summary[key] > 0, key  # alias: the donated state is updated in place
  assert summary['xla_peak_bytes'] == (
    summary['argument_bytes']
    + summary['output_bytes']
    + summary['temp_bytes']
    - summary['alias_bytes']
  )
  assert summary['xla_peak_gib'] == pytest.approx(summary['xla_peak_bytes'] / 2**30, abs=1e-6)
  assert summary['peak_bytes_in_use'] is None  # CPU keeps no allocator statistics
  # Forward + backward + Adam: more than twice the forward's work.
  assert summary['flops_per_step'] > 2 * _run_model('forward', peak=0.0)[1]['flops_per_step']


def test_compile_only_train_step_with_remat_recomputes_the_blocks():
  records, summary = _run_model('train_step', remat='mrb', compile_only=True)
  assert [r['event'] for r in records] == ['compile', 'summary']
  assert set(summary) == MODEL_SUMMARY_KEYS
  assert summary['compile_only'] is True and summary['remat'] == 'mrb'
  assert all(summary[key] is None for key in STEP_KEYS)
  assert summary['peak_tflops'] == 2.5 and summary['fraction_of_peak'] is None
  plain = _run_model('train_step')[1]
  assert summary['argument_bytes'] == plain['argument_bytes']  # the same state and batch
  # The MRB's forward runs again in the backward pass: more FLOPs than without remat (+3.6%
  # here). XLA:CPU keeps the same temp_bytes either way, so memory cannot show it on CPU.
  assert summary['flops_per_step'] > plain['flops_per_step'] * 1.02


def test_compile_only_forward_cli_takes_dtype_remat_and_config_overrides():
  lines = _bench(
    '--mode=forward',
    '--compile_only',
    '--dtype=bfloat16',
    '--remat=rrg',
    f'--batch={BATCH}',
    f'--size={SIZE}',
    '--peak_tflops=2.5',
    *MICRO_FLAGS,
    '--config.model.num_features=8',
    '--config.train.conv_kernel_grad=xla',
  )
  assert [line['event'] for line in lines] == ['compile', 'summary']
  summary = lines[-1]
  assert set(summary) == MODEL_SUMMARY_KEYS
  assert summary['dtype'] == 'bfloat16' and summary['remat'] == 'rrg'
  assert summary['conv_kernel_grad'] == 'xla'
  cfg = _micro_config(model__num_features=8)
  assert summary['params'] == count_params(param_shapes(create_model(cfg.model)))
  assert summary['output_bytes'] == SIZE * SIZE * 3 * 2  # a bfloat16 image per device
  assert all(summary[key] is None for key in STEP_KEYS)
  assert summary['flops_per_step'] > 0 and summary['xla_peak_bytes'] > 0


def test_bad_remat_is_one_line_naming_the_flag():
  done = _cli('--mode=train_step', '--remat=foo', *MICRO_FLAGS)
  assert done.returncode != 0
  lines = [line for line in done.stderr.splitlines() if line.strip() and 'Warning' not in line]
  assert lines == [lines[-1]] and '--remat' in lines[-1] and 'foo' in lines[-1], done.stderr
  assert 'Traceback' not in done.stderr


def test_kernel_grad_mode_times_both_forms_per_stream():
  lines = _bench('--mode=kernel_grad', '--batch=2', '--size=16', '--steps=2', *MICRO_FLAGS,
                 '--config.model.height=2')  # fmt: skip
  assert [line['event'] for line in lines] == ['kernel_grad', 'kernel_grad', 'summary']
  # Stream j: the micro model's 4 * 2**j channels at 16 / 2**j pixels.
  assert [line['shape'] for line in lines[:2]] == [[2, 16, 16, 4], [2, 8, 8, 8]]
  summary = lines[-1]
  for form in ('taps', 'xla'):
    assert all(line[f'{form}_ms'] > 0 for line in lines[:2])
    assert summary[f'{form}_ms'] == pytest.approx(
      sum(line[f'{form}_ms'] for line in lines[:2]), abs=2e-3
    )
  assert summary['faster'] == min(('taps', 'xla'), key=lambda f: summary[f'{f}_ms'])
  want = ops.resolve_kernel_grad('auto', 'cpu', {f: summary[f'{f}_ms'] for f in ('taps', 'xla')})
  assert summary['auto'] == want and summary['mode'] == 'kernel_grad'


def test_bad_conv_kernel_grad_is_one_line_naming_the_key():
  done = _cli(
    '--mode=train_step', '--compile_only', *MICRO_FLAGS, '--config.train.conv_kernel_grad=gemm'
  )
  assert done.returncode != 0
  lines = [line for line in done.stderr.splitlines() if line.strip() and 'Warning' not in line]
  assert lines == [lines[-1]] and 'config.train.conv_kernel_grad' in lines[-1], done.stderr
  assert 'gemm' in lines[-1] and 'Traceback' not in done.stderr


def test_resolve_options_flags_override_the_config():
  cfg = _micro_config()
  assert 'remat' not in cfg.train or cfg.train.remat == 'none'
  assert bench_model.resolve_options(cfg) == 'none'
  assert bench_model.resolve_options(cfg, 'bfloat16', 'rrg') == 'rrg'
  assert cfg.model.dtype == 'bfloat16'
  cfg.train.remat = 'mrb'
  assert bench_model.resolve_options(cfg) == 'mrb'
  assert bench_model.resolve_options(cfg, remat='none') == 'none'
  cfg.train.remat = 'all'
  with pytest.raises(ValueError, match=r"^config\.train\.remat='all'"):
    bench_model.resolve_options(cfg)
  with pytest.raises(ValueError, match=r'^--dtype=.*config\.model\.dtype'):
    bench_model.resolve_options(cfg, 'float16', 'none')


def test_xla_analysis_is_null_safe():
  class NoAnalysis:
    def cost_analysis(self):
      return None

    def memory_analysis(self):
      return None

  class ListAnalysis:
    def cost_analysis(self):
      return [{'flops': 12.0}]

  assert bench_xla.flops(NoAnalysis()) is None and bench_xla.flops(ListAnalysis()) == 12.0
  assert set(bench_xla.memory(NoAnalysis()).values()) == {None}
  assert bench_xla.throughput(None, 0.5, 2.5) == {'achieved_tflops': None, 'fraction_of_peak': None}
  assert bench_xla.throughput(1e12, 0.5, 4.0) == {'achieved_tflops': 2.0, 'fraction_of_peak': 0.5}


def test_data_mode_reports_crops_per_second_of_the_cached_pipeline():
  lines = _bench(
    '--mode=data',
    '--steps=5',
    '--config.data.synthetic_pairs=16',
    '--config.data.synthetic_size=48',
    '--config.data.crop_size=32',
    '--config.data.cache=True',
    '--config.train.batch_size=8',
  )
  assert [line['event'] for line in lines] == ['ready', 'summary']
  summary = lines[-1]
  assert set(summary) == {
    'event', 'mode', 'source', 'records', 'cache', 'num_workers', 'batch', 'crop_size', 'mixup',
    'batches', 'ready_s', 'batches_per_s', 'images_per_s', 'images_per_cpu_s',
    'load_average_1min', 'peak_rss_gib', 'cpus',
  }  # fmt: skip
  assert summary['records'] == 16 and summary['cache'] is True
  assert summary['batch'] == 8 and summary['crop_size'] == 32 and summary['batches'] == 5
  assert summary['images_per_s'] == pytest.approx(8 * summary['batches_per_s'], rel=0.01)
  assert summary['images_per_s'] > 0 and summary['peak_rss_gib'] > 0


def test_predict_mode_spreads_the_tiles_over_the_devices():
  overrides = {
    **MICRO,
    'predict.tile_size': 96,
    'predict.tile_overlap': 32,
    'predict.bucket': 64,
  }
  flags = [f'--config.{k}={v}' for k, v in overrides.items()]
  lines = _bench('--mode=predict', '--batch=4', '--size=128,192', *flags)
  assert [line['event'] for line in lines] == ['compile', 'summary']
  summary = lines[-1]
  assert set(summary) == {
    'event', 'mode', 'images', 'height', 'width', 'dtype', 'params', 'tile_shape',
    'tiles_per_image', 'processed_over_image_pixels', 'tiles_per_device', 'compile_s', 'seconds',
    'megapixels_per_s', 'peak_rss_gib', 'reference_forward', 'devices', 'jax',
  }  # fmt: skip
  assert summary['devices'].startswith('4 x ')  # conftest's 4 fake CPU devices
  assert summary['tiles_per_image'] == 6 and summary['tile_shape'] == [96, 96]
  # 4 images x 6 tiles, one tile per device per call: a quarter each.
  assert summary['tiles_per_device'] == [6, 6, 6, 6]
  assert summary['processed_over_image_pixels'] == pytest.approx(6 * 96 * 96 / (128 * 192))
  assert summary['megapixels_per_s'] > 0 and summary['peak_rss_gib'] > 0


def test_ops_mode_sums_the_traced_step_by_pass_and_layer():
  from mirnet_jax import bench_ops

  lines = []
  summary = bench_ops.bench_ops(
    tiny.config(), of='train_step', batch=4, height=32, width=32, top=5, emit=lines.append
  )
  rows = [r for r in lines if r['event'] == 'op']
  assert 0 < len(rows) <= 5 and lines[-1] is summary and summary['events'] > 0
  assert summary['by_pass']['forward'] > 0 and summary['by_pass']['backward'] > 0
  assert abs(sum(summary['by_pass'].values()) - summary['thunk_s']) < 1e-3
  assert all(r['thunk_s'] <= summary['thunk_s'] and r['calls'] >= 1 for r in rows)
  # The module path with block indices folded, and the custom_vjp's repeated path dropped.
  name = 'transpose(jvp(MIRNet))/rrg_1/mrb_0/dau_0/conv_1/transpose(jvp())/rrg_1/dot_general'
  assert bench_ops.classify(name, 'train_step') == (
    'backward',
    'rrg_*/mrb_*/dau_0/conv_1',
    'dot_general',
  )
  assert bench_ops.classify('jit(f)/jvp(MIRNet)/conv_in/conv', 'train_step')[:2] == (
    'forward',
    'conv_in',
  )
  with pytest.raises(ValueError, match='--ops_of'):
    bench_ops.bench_ops(tiny.config(), of='eval', batch=4, height=32, width=32)


def test_train_step_traces_the_form_training_would_pick(monkeypatch):
  calls = []

  def measured(form, model, batch, height, width):
    calls.append((form, batch, height, width))
    return 'xla', {'taps': 3.0, 'xla': 1.0}

  monkeypatch.setattr(train_state, 'measured_kernel_grad', measured)
  step = bench_model.compile_step(
    _micro_config(train__conv_kernel_grad='auto'), 'train_step', BATCH, SIZE, SIZE, 'none'
  )
  assert calls == [('auto', 1, SIZE, SIZE)]  # one image per fake device
  assert step.model.conv_kernel_grad == 'xla'
