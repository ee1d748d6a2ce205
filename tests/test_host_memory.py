"""train_state.host_allocator and release_host_memory: which malloc the process runs on, and
handing freed memory back under it (README "Performance": tcmalloc on CPU)."""

import glob
import os
import subprocess
import sys
import textwrap

import pytest

from mirnet_jax import train_state

MAPS = textwrap.dedent("""\
  55d0c0000000-55d0c0100000 r-xp 00000000 08:01 1 /usr/bin/python3.11
  7f0000000000-7f0000200000 r-xp 00028000 08:01 2 /usr/lib/x86_64-linux-gnu/libc.so.6
  7f0000400000-7f0000440000 r-xp 00010000 08:01 3 /usr/lib/libtcmalloc_minimal.so.4.5.10
  7f0000500000-7f0000580000 r-xp 00010000 08:01 4 /usr/lib/x86_64-linux-gnu/libjemalloc.so.2
  7f0000600000-7f0000601000 rw-p 00000000 00:00 0
  not a mapping line
  7ffd00000000-7ffd00021000 rw-p 00000000 00:00 0 [stack]
""")


@pytest.mark.parametrize(
  'address, expected',
  [
    (0x7F0000000000, 'glibc'),  # first byte of libc's text
    (0x7F00001FFFFF, 'glibc'),  # its last byte
    (0x7F0000200000, 'unknown'),  # one past the end: no mapping
    (0x7F0000420000, 'tcmalloc'),
    (0x7F0000500010, 'jemalloc'),
    (0x55D0C0000100, 'unknown'),  # the interpreter's own malloc (a static build)
    (0x7F0000600010, 'unknown'),  # anonymous memory
    (0x7FFD00000010, 'unknown'),  # [stack]
    (0x10, 'unknown'),
  ],
)
def test_allocator_of_names_the_mapping_holding_malloc(address, expected):
  assert train_state.allocator_of(address, MAPS) == expected


def test_allocator_of_empty_maps():
  assert train_state.allocator_of(0x7F0000000000, '') == 'unknown'


def test_this_process_runs_on_glibc_unless_preloaded():
  # The test machines are glibc Linux; with LD_PRELOAD set the preloaded malloc is named.
  got = train_state.host_allocator()
  preload = os.environ.get('LD_PRELOAD', '')
  expected = next((a for a in ('tcmalloc', 'jemalloc', 'mimalloc') if a in preload), 'glibc')
  assert got == expected


_TCMALLOC = sorted(
  glob.glob('/usr/lib/*/libtcmalloc_minimal.so.4') + glob.glob('/usr/lib/libtcmalloc_minimal.so.4')
)

# Allocates and touches 256 MiB through malloc, frees it, then releases: tcmalloc keeps freed
# spans resident until asked, so the RSS falls only after release_host_memory.
_RELEASE_SCRIPT = """
import ctypes
from mirnet_jax import bench_model, train_state
libc = ctypes.CDLL(None)
libc.malloc.restype = ctypes.c_void_p
libc.free.argtypes = [ctypes.c_void_p]
n = 256 * 2**20
before = bench_model.rss_gib()
chunks = [libc.malloc(n // 16) for _ in range(16)]
for c in chunks:
  ctypes.memset(c, 1, n // 16)
touched = bench_model.rss_gib()
for c in chunks:
  libc.free(c)
freed = bench_model.rss_gib()
train_state.release_host_memory()
released = bench_model.rss_gib()
print(train_state.host_allocator(), before, touched, freed, released)
"""


@pytest.mark.skipif(not _TCMALLOC, reason='libtcmalloc_minimal.so.4 is not installed here')
def test_release_host_memory_under_tcmalloc_returns_freed_pages():
  env = {**os.environ, 'LD_PRELOAD': _TCMALLOC[0], 'JAX_PLATFORMS': 'cpu'}
  out = subprocess.run(
    [sys.executable, '-c', _RELEASE_SCRIPT], env=env, capture_output=True, text=True, timeout=300
  )
  assert out.returncode == 0, out.stderr[-2000:]
  allocator, before, touched, freed, released = out.stdout.split()[-5:]
  before, touched, freed, released = map(float, (before, touched, freed, released))
  assert allocator == 'tcmalloc'
  assert touched - before > 0.2  # the 0.25 GiB is resident
  assert freed - before > 0.2  # tcmalloc kept it after free()
  assert freed - released > 0.2  # release_host_memory handed it back


def test_allocator_hint_only_for_glibc_on_cpu_without_remat():
  hint = train_state.allocator_hint('cpu', 'glibc', 'none')
  assert 'tcmalloc' in hint and 'LD_PRELOAD=' in hint
  assert 'GLIBC_TUNABLES=glibc.malloc.hugetlb=1' in hint
  assert train_state.allocator_hint('cpu', 'glibc', 'mrb') is None
  assert train_state.allocator_hint('cpu', 'glibc', 'rrg') is None
  assert train_state.allocator_hint('cpu', 'tcmalloc', 'none') is None
  assert train_state.allocator_hint('cpu', 'unknown', 'none') is None
  assert train_state.allocator_hint('gpu', 'glibc', 'none') is None
  assert train_state.allocator_hint('tpu', 'glibc', 'none') is None
