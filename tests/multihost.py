"""Several local JAX processes forming one ``jax.distributed`` run on 127.0.0.1, for tests.

    procs = multihost.start(['-m', 'mirnet_jax.main', '--workdir=W', ...], num_processes=2,
                            devices_per_process=2, log_dir=tmp_path / 'logs')
    results = multihost.wait(procs, timeout=300)      # [Result(returncode, output), ...]

Each process gets ``JAX_COORDINATOR_ADDRESS=127.0.0.1:<free port>``, ``JAX_NUM_PROCESSES``,
``JAX_PROCESS_ID`` (what ``mirnet_jax.main`` passes to ``jax.distributed.initialize``) and
``XLA_FLAGS=--xla_force_host_platform_device_count=K`` on the CPU platform, so the run has
``num_processes * K`` devices. A ``python -c`` script calls ``jax.distributed.initialize()``
itself (``PRELUDE`` does it from the same variables). Output goes to one file per process
(never a pipe: a full pipe would block a process that logs a lot), readable while it runs.
"""

import dataclasses
import os
import pathlib
import re
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence

REPO = pathlib.Path(__file__).resolve().parents[1]

# Joins a ``python -c`` script to the run (main.py does this itself).
PRELUDE = """
import os, jax
jax.distributed.initialize(
  os.environ['JAX_COORDINATOR_ADDRESS'],
  int(os.environ['JAX_NUM_PROCESSES']),
  int(os.environ['JAX_PROCESS_ID']),
)
"""


def free_port() -> int:
  """A TCP port that nothing listens on right now (the OS picks it)."""
  with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
    s.bind(('127.0.0.1', 0))
    return s.getsockname()[1]


@dataclasses.dataclass
class Process:
  """One started process of the run."""

  index: int
  popen: subprocess.Popen
  log: pathlib.Path

  def output(self) -> str:
    """Everything the process wrote to stdout and stderr so far."""
    return self.log.read_text(errors='replace') if self.log.exists() else ''

  @property
  def pid(self) -> int:
    return self.popen.pid

  def signal(self, signum: int) -> None:
    if self.popen.poll() is None:
      self.popen.send_signal(signum)


@dataclasses.dataclass
class Result:
  """How one process ended: its exit code (negative: killed by that signal) and output."""

  index: int
  returncode: int
  output: str
  seconds: float


def environment(
  index: int,
  num_processes: int,
  devices_per_process: int,
  port: int,
  extra: Mapping[str, str] | None = None,
) -> dict[str, str]:
  """The environment of process ``index`` of the run."""
  env = dict(os.environ)
  env.update(
    JAX_PLATFORMS='cpu',
    XLA_FLAGS=f'--xla_force_host_platform_device_count={devices_per_process}',
    JAX_COORDINATOR_ADDRESS=f'127.0.0.1:{port}',
    JAX_NUM_PROCESSES=str(num_processes),
    JAX_PROCESS_ID=str(index),
    TF_CPP_MIN_LOG_LEVEL='3',
    PYTHONPATH=os.pathsep.join([str(REPO), str(REPO / 'tests')]),
    PYTHONUNBUFFERED='1',
  )
  env.update(extra or {})
  return env


def start(
  args: Sequence[str] | Sequence[Sequence[str]],
  *,
  num_processes: int = 2,
  devices_per_process: int = 2,
  log_dir: str | os.PathLike,
  env: Mapping[str, str] | None = None,
  cwd: str | os.PathLike | None = None,
) -> list[Process]:
  """Starts the processes of one run: ``python ARGS`` each (or one argument list each).

  Args:
    args: the arguments after ``python`` (``['-m', 'mirnet_jax.main', ...]`` or ``['-c', S]``),
      the same for every process, or a list of ``num_processes`` argument lists.
    num_processes: processes in the run.
    devices_per_process: fake CPU devices of each process.
    log_dir: where ``process_<i>.log`` (stdout and stderr) are written.
    env: extra environment variables for every process.
    cwd: working directory (default: the repository).
  """
  per_process = [list(args)] * num_processes if isinstance(args[0], str) else list(args)
  assert len(per_process) == num_processes, (len(per_process), num_processes)
  log_dir = pathlib.Path(log_dir)
  log_dir.mkdir(parents=True, exist_ok=True)
  port = free_port()
  procs = []
  for i, argv in enumerate(per_process):
    log = log_dir / f'process_{i}.log'
    with open(log, 'w') as f:
      popen = subprocess.Popen(
        [sys.executable, *argv],
        env=environment(i, num_processes, devices_per_process, port, env),
        cwd=str(cwd or REPO),
        stdout=f,
        stderr=subprocess.STDOUT,
        stdin=subprocess.DEVNULL,
        start_new_session=True,  # a signal to the test's group never reaches them by accident
      )
    procs.append(Process(i, popen, log))
  return procs


def wait_for(procs: Sequence[Process], pattern: str, timeout: float, *, every: bool = True) -> None:
  """Waits until the output of every process (or any, ``every=False``) matches ``pattern``.

  Raises:
    TimeoutError: not seen in time, or a process ended first; with the output tails.
  """
  regex = re.compile(pattern)
  deadline = time.monotonic() + timeout
  while True:
    seen = [bool(regex.search(p.output())) for p in procs]
    if all(seen) if every else any(seen):
      return
    ended = [p for p, s in zip(procs, seen, strict=True) if not s and p.popen.poll() is not None]
    if ended or time.monotonic() > deadline:
      why = f'process {ended[0].index} ended' if ended else f'{timeout:.0f} s passed'
      raise TimeoutError(f'{pattern!r} not seen ({why}):\n{tails(procs)}')
    time.sleep(0.2)


def wait(procs: Sequence[Process], timeout: float) -> list[Result]:
  """Waits for every process to end (at most ``timeout`` seconds in all); kills the rest.

  A process still running at the deadline is killed (SIGKILL) and reported with return code
  ``-9``, so a hung run fails its test instead of hanging the suite.
  """
  start_time = time.monotonic()
  deadline = start_time + timeout
  results = []
  for p in procs:
    try:
      p.popen.wait(timeout=max(0.0, deadline - time.monotonic()))
    except subprocess.TimeoutExpired:
      kill(procs)
      p.popen.wait()
    results.append(Result(p.index, p.popen.returncode, p.output(), time.monotonic() - start_time))
  return results


def run(
  args: Sequence[str] | Sequence[Sequence[str]], *, timeout: float = 300, **kwargs
) -> list[Result]:
  """``start`` then ``wait``: the results of a whole run."""
  return wait(start(args, **kwargs), timeout)


def kill(procs: Sequence[Process]) -> None:
  """SIGKILLs every process still running (and whatever it started, e.g. grain workers)."""
  for p in procs:
    if p.popen.poll() is None:
      try:
        os.killpg(p.popen.pid, signal.SIGKILL)
      except ProcessLookupError:
        pass


def tails(procs_or_results: Sequence[Process | Result], chars: int = 3000) -> str:
  """The last ``chars`` of each process's output, labelled, for assertion messages."""
  parts = []
  for p in procs_or_results:
    text = p.output() if isinstance(p, Process) else p.output
    code = p.popen.poll() if isinstance(p, Process) else p.returncode
    parts.append(f'--- process {p.index} (exit {code}) ---\n{text[-chars:]}')
  return '\n'.join(parts)
