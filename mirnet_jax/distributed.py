"""The life cycle of a multi-process run: joining it, noticing a lost peer, preemption.

``initialize()`` (called by main.py before anything touches a device) joins the processes with
``jax.distributed`` and starts a watchdog. Without it, a survivor of a killed peer waits in a
collective until jax's coordination service aborts it (SIGABRT, a C++ dump, after the
heartbeat timeout). The watchdog is written here because jax offers no hook for it
(``jax.distributed.initialize`` takes no missed-heartbeat callback): every process bumps a
counter in jax's key-value store each second and watches the others'; a peer whose counter
stops for ``PEER_TIMEOUT_S`` seconds (or a coordinator that stops answering) ends this process
with one line naming the lost process and exit status ``LOST_PEER_EXIT``. A failed collective
(Gloo: connection closed) calls ``lost_peer`` at once, which names the peer within seconds.
Anything not finished by then (an asynchronous checkpoint) stays in orbax's temporary
directory, which is never restored: rerunning every process resumes from the last complete one.

SIGTERM on one process keeps today's behaviour (a Python flag, checked between steps). On
several processes jax's preemption notifier owns SIGTERM: ``Preemption`` installs nothing and
asks orbax's ``reached_preemption``, so every process stops at the same step.
"""

import atexit
import os
import signal
import sys
import threading
import time
from typing import Any

from absl import logging

# A peer silent this long is lost; well below jax's own heartbeat timeout, so ours speaks first.
# jax's stays at its default: lowered, its heartbeat RPCs time out on a loaded host and abort
# a healthy run.
PEER_TIMEOUT_S = float(os.environ.get('MIRNET_PEER_TIMEOUT_S', '20'))
JAX_HEARTBEAT_TIMEOUT_S = int(max(5 * PEER_TIMEOUT_S, 100))
LOST_PEER_EXIT = 75  # EX_TEMPFAIL: rerun every process to resume
_KEY = 'mirnet_jax/alive/{}'
_DONE = 'mirnet_jax/done/{}'
_FAILED = 'mirnet_jax/failed/{}'
BARRIER_TIMEOUT_S = 1800  # processes may start minutes apart (imports, data, eager init)


def is_multiprocess() -> bool:
  """Whether this process is one of several that form the run (jax.distributed needed)."""
  if os.environ.get('JAX_COORDINATOR_ADDRESS'):
    return True
  if int(os.environ.get('SLURM_NTASKS', '1')) > 1:
    return True  # jax reads the SLURM_* variables itself
  # A TPU pod slice: more than one worker host listed.
  return len([h for h in os.environ.get('TPU_WORKER_HOSTNAMES', '').split(',') if h]) > 1


def initialize_arguments() -> dict[str, Any]:
  """The keyword arguments for ``jax.distributed.initialize`` on this process.

  jax reads ``JAX_COORDINATOR_ADDRESS`` and the cluster variables (SLURM, TPU) itself, but
  not ``JAX_NUM_PROCESSES`` / ``JAX_PROCESS_ID``.
  """
  kwargs: dict[str, Any] = {
    arg: int(os.environ[env])
    for arg, env in (('num_processes', 'JAX_NUM_PROCESSES'), ('process_id', 'JAX_PROCESS_ID'))
    if os.environ.get(env)
  }
  kwargs['heartbeat_timeout_seconds'] = JAX_HEARTBEAT_TIMEOUT_S
  return kwargs


_watchdog: 'PeerWatchdog | None' = None


def initialize() -> None:
  """Joins the multi-process run when the environment says there is one; else nothing."""
  global _watchdog
  if not is_multiprocess():
    return
  import jax

  jax.distributed.initialize(**initialize_arguments())
  from jax._src import distributed as jax_distributed  # the client: no public accessor

  client = jax_distributed.global_state.client
  _watchdog = PeerWatchdog(client, jax.process_index(), jax.process_count())
  _watchdog.start()


def barrier(name: str) -> None:
  """Waits for every process at ``name`` (jax's coordination service, not a collective).

  Before the first collective of a phase: gloo gives a communicator 30 s to form, and one
  process can be further behind than that after a slow start (loading data, the eager
  initialisation), which would fail the run.
  """
  if _watchdog is None:
    return
  _watchdog.barrier(name)


class SyncedJit:
  """A jitted function compiled ahead for each new argument shape; on several processes each
  compile is followed by a wait for the peers.

  gloo gives each new communicator 30 s to form; a process that compiles a step more slowly
  than its peers (a loaded host) would fail the first run of it. ``after_compile`` runs after
  every compile, before the program first runs (the trainer releases the compiler's freed
  host memory there, train_state.release_host_memory).
  """

  def __init__(self, jitted: Any, after_compile: Any = None):
    self._jitted = jitted
    self._after_compile = after_compile
    self._compiled: dict[Any, Any] = {}

  def __call__(self, *args: Any) -> Any:
    import jax

    leaves, tree = jax.tree.flatten(args)
    key = (tree, tuple((x.shape, x.dtype, getattr(x, 'sharding', None)) for x in leaves))
    if key not in self._compiled:
      self._compiled[key] = self._jitted.lower(*args).compile()
      if self._after_compile is not None:
        self._after_compile()
      if _watchdog is not None:
        barrier('compiled')
    return self._compiled[key](*args)


def mark_failed() -> None:
  """Tells the peers, at exit, that this process ended with an error (they stop too)."""
  if _watchdog is not None:
    _watchdog.failed = True


def _exit_lost(message: str) -> None:
  # os._exit: a normal exit would wait in jax's shutdown barrier for the dead peer.
  print(f'error: {message}', file=sys.stderr, flush=True)
  logging.flush()
  os._exit(LOST_PEER_EXIT)


class PeerWatchdog:
  """Ends this process when a peer stops beating (see the module docstring)."""

  def __init__(self, client: Any, index: int, count: int, period: float = 1.0):
    self._client, self._index, self._count, self._period = client, index, count, period
    self._seen = {i: (None, time.monotonic()) for i in range(count) if i != index}
    self._stopping = False
    self._lock = threading.Lock()
    self._barriers = 0
    self.failed = False

  def barrier(self, name: str) -> None:
    self._barriers += 1
    self._client.wait_at_barrier(
      f'mirnet_jax/{name}/{self._barriers}', int(BARRIER_TIMEOUT_S * 1000)
    )

  def start(self) -> None:
    atexit.register(self._at_exit)
    threading.Thread(target=self._run, name='peer-watchdog', daemon=True).start()

  def _at_exit(self) -> None:
    # Keep beating (peers wait for us in jax's shutdown barrier) but stop judging them, and
    # tell them whether this process ended on purpose or with an error.
    self._stopping = True
    key = _FAILED if self.failed else _DONE
    try:
      self._client.key_value_set(key.format(self._index), '1', allow_overwrite=True)
    except Exception:  # noqa: BLE001 - best effort at exit
      pass

  def _beat(self, n: int) -> None:
    self._client.key_value_set(_KEY.format(self._index), str(n), allow_overwrite=True)

  def stale_peers(self) -> list[int]:
    """Peers silent for ``PEER_TIMEOUT_S``; raises if the coordinator does not answer."""
    now, stale = time.monotonic(), []
    with self._lock:
      for peer, (value, since) in self._seen.items():
        if self._flag(_FAILED, peer) and not self._stopping:
          _exit_lost(
            f'process {peer} of {self._count} failed (its log has the error); process '
            f'{self._index} stops too'
          )
        if self._flag(_DONE, peer):
          continue
        try:
          current = self._client.key_value_try_get(_KEY.format(peer))
        except Exception as e:  # noqa: BLE001 - not set yet, or the store is gone
          if 'NOT_FOUND' not in str(e) and 'not found' not in str(e).lower():
            raise
          current = None
        if current != value:
          self._seen[peer] = (current, now)
        elif now - since > PEER_TIMEOUT_S:
          stale.append(peer)
    return stale

  def _flag(self, key: str, peer: int) -> bool:
    try:
      return bool(self._client.key_value_try_get(key.format(peer)))
    except Exception as e:  # noqa: BLE001 - not set; re-raised when the store is gone
      if 'NOT_FOUND' in str(e) or 'not found' in str(e).lower():
        return False
      raise

  def describe(self, peers: list[int]) -> str:
    names = ', '.join(str(p) for p in peers)
    return (
      f'lost process {names} of {self._count} (no heartbeat for {PEER_TIMEOUT_S:.0f} s); '
      f'process {self._index} stops too. Rerun every process to resume from the last complete '
      'checkpoint'
    )

  def _coordinator_lost(self, e: Exception) -> None:
    reason = ' '.join(str(e).split())[:160]
    _exit_lost(
      f'lost process 0 of {self._count} (the coordinator does not answer: {reason}); process '
      f'{self._index} stops too. Rerun every process to resume from the last complete checkpoint'
    )

  def _run(self) -> None:
    n = 0
    while True:
      try:
        self._beat(n)
        stale = [] if self._stopping else self.stale_peers()
      except Exception as e:  # noqa: BLE001 - the key-value store lives on process 0
        if self._stopping:
          return
        self._coordinator_lost(e)
        return
      if stale:
        _exit_lost(self.describe(stale))
      n += 1
      time.sleep(self._period)

  def lost_peer(self, error: BaseException) -> None:
    """Called on a failed collective: names the silent peer and exits (never returns)."""
    logging.warning('a collective failed: %s', ' '.join(str(error).split())[:200])
    deadline = time.monotonic() + PEER_TIMEOUT_S + 5 * self._period
    while time.monotonic() < deadline:
      try:
        stale = self.stale_peers()
      except Exception as e:  # noqa: BLE001
        self._coordinator_lost(e)
      if stale:
        _exit_lost(self.describe(stale))
      time.sleep(self._period)
    _exit_lost(
      f'a collective failed on process {self._index} of {self._count} and every peer still '
      f'beats ({" ".join(str(error).split())[:160]}); stopping'
    )


def check_collective_error(error: BaseException) -> None:
  """On several processes, a runtime error from a collective means a lost peer: exit cleanly.

  Returns (so the caller re-raises) on one process or for other errors.
  """
  if _watchdog is None:
    return
  text = str(error)
  if any(s in text for s in ('Gloo', 'Connection closed', 'connection reset', 'UNAVAILABLE')):
    _watchdog.lost_peer(error)


class Preemption:
  """SIGTERM as a stop request checked between steps.

  One process: a Python handler sets a flag (the previous handler is restored by ``close``).
  Several: jax's preemption notifier already handles SIGTERM and feeds orbax's sync point;
  replacing it would make ``reached_preemption`` never true, so nothing is installed.
  """

  def __init__(self):
    import jax

    self.requested = False
    self._multiprocess = jax.process_count() > 1
    self._previous = None
    if not self._multiprocess:
      self._previous = signal.signal(signal.SIGTERM, self._handle)

  def _handle(self, signum, frame):
    del signum, frame
    self.requested = True

  def reached(self, manager: Any, step: int) -> bool:
    """Whether to save ``step`` and stop (the same answer on every process)."""
    if self._multiprocess:
      return bool(manager.reached_preemption(step))
    return self.requested

  def close(self) -> None:
    if self._previous is not None:
      signal.signal(signal.SIGTERM, self._previous)
      self._previous = None
