"""Multi-host start-up: ``jax.distributed`` from explicit arguments or the environment.

Order of precedence:

1. explicit ``coordinator`` / ``num_processes`` / ``process_id`` (command-line flags);
2. the ``FCN_COORDINATOR`` / ``FCN_NUM_PROCESSES`` / ``FCN_PROCESS_ID`` variables;
3. a SLURM job step with more than one task (``SLURM_NTASKS > 1``): JAX detects the
   coordinator, process count and id from SLURM's variables by itself;
4. otherwise a single process, nothing to initialise.

Command lines reach it through :func:`fcn_jax.cli.start`, which sets the
platform and CPU tuning first. Call before any other JAX operation. Each process then reads only its share of
the data (see :mod:`fcn_jax.data.pipeline`); only process 0 writes logs.

**A lost peer.** Left alone, a survivor of a SIGKILLed or crashed peer waits
in a collective until XLA's coordination service aborts it with a C++ stack
trace. Instead, :class:`PeerWatch` (started by :func:`initialize`) posts a
heartbeat counter to the coordination service's key-value store every
``timeout/5`` seconds and reads the others'. When a peer's counter has not
moved for ``peer_timeout`` seconds (``--peer-timeout``, ``FCN_PEER_TIMEOUT``;
default :data:`DEFAULT_PEER_TIMEOUT_S`), or the store itself (process 0) is
gone, every survivor prints one line -- which process was lost, the note the
running job registered (training: the newest committed checkpoint; see
:func:`set_resume_note`) and that rerunning the same command resumes -- and
exits with :data:`fcn_jax.errors.EXIT_PEER_LOST` (75). JAX's own heartbeat
timeout is set above it (3x, at least 100 s), so the watch always speaks first.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from typing import Callable

from fcn_jax.errors import EXIT_PEER_LOST, InputError

#: Seconds without a peer's heartbeat before the survivors exit (``--peer-timeout``, ``FCN_PEER_TIMEOUT``).
DEFAULT_PEER_TIMEOUT_S = 60.0
_KEY = "fcn_jax/peer_watch"
_resume_note: Callable[[], str] = lambda: "rerunning the same command starts it again"  # noqa: E731
_watch: "PeerWatch | None" = None


def initialize(coordinator: str | None = None, num_processes: int | None = None,
               process_id: int | None = None, peer_timeout: float | None = None) -> bool:
    """Start ``jax.distributed`` when this is a multi-process run, and its :class:`PeerWatch`; returns whether it did.

    ``peer_timeout``: seconds of silence after which a peer counts as lost
    (default ``FCN_PEER_TIMEOUT``, else :data:`DEFAULT_PEER_TIMEOUT_S`; 0 = no watch).
    """
    import jax

    if peer_timeout is None:
        peer_timeout = float(os.environ.get("FCN_PEER_TIMEOUT", DEFAULT_PEER_TIMEOUT_S))
    # JAX's heartbeat timeout above ours: its verdict is an abort with a stack trace
    timeouts = {"heartbeat_timeout_seconds": int(max(100, 3 * peer_timeout))}

    coordinator = coordinator or os.environ.get("FCN_COORDINATOR")
    if num_processes is None and os.environ.get("FCN_NUM_PROCESSES"):
        num_processes = int(os.environ["FCN_NUM_PROCESSES"])
    if process_id is None and os.environ.get("FCN_PROCESS_ID"):
        process_id = int(os.environ["FCN_PROCESS_ID"])
    if coordinator:
        if num_processes is None or process_id is None:
            raise InputError(
                "a coordinator address needs --num-processes and --process-id "
                "(or FCN_NUM_PROCESSES / FCN_PROCESS_ID)"
            )
        jax.distributed.initialize(coordinator_address=coordinator, num_processes=num_processes,
                                   process_id=process_id, **timeouts)
    elif int(os.environ.get("SLURM_NTASKS", "1")) > 1 and "SLURM_JOB_ID" in os.environ:
        jax.distributed.initialize(**timeouts)  # SLURM cluster detection
    else:
        return False
    if peer_timeout > 0 and jax.process_count() > 1:
        start_peer_watch(peer_timeout)
    return True


def wait_for_peer_verdict(error: BaseException) -> None:
    """After an unexpected error in a multi-process run: give the peer watch time to say a peer was lost.

    A collective that fails because its peer died (e.g. gloo's "Connection
    reset by peer") raises here before the watch has decided; if a peer is
    indeed lost the watch ends the process with its one line within
    ``peer_timeout``, else this returns and the error goes on as a bug.
    """
    if _watch is None or _watch.finished:
        return
    deadline = time.monotonic() + _watch.timeout + 2 * _watch.interval
    while time.monotonic() < deadline and _watch.is_alive():
        time.sleep(0.1)


def set_resume_note(note: Callable[[], str], checkpoint_dir: str | os.PathLike | None = None,
                    sealed_by: str | None = None) -> None:
    """What a survivor says about resuming when a peer is lost (called then; keep it cheap and safe).

    ``checkpoint_dir``/``sealed_by``: where the run's checkpoint steps are and
    the file that marks one sealed, for the supervisor (:func:`supervise`), which
    speaks when this process cannot (see :func:`committed_step_note`).
    """
    global _resume_note
    _resume_note = note
    path = os.environ.get("FCN_SUPERVISOR_NOTE")
    if path and checkpoint_dir is not None:
        with open(path, "w") as f:
            json.dump({"checkpoint_dir": str(checkpoint_dir), "sealed_by": sealed_by}, f)


def committed_step_note(directory: str | os.PathLike, sealed_by: str | None) -> str:
    """Which step a rerun resumes from, from the directory alone: the newest digit-named step holding
    ``sealed_by`` (its integrity manifest: committed and sealed). Reads no step."""
    from pathlib import Path

    d = Path(directory)
    steps = sorted((int(p.name) for p in d.iterdir() if p.is_dir() and p.name.isdigit()
                    and (sealed_by is None or (p / sealed_by).is_file())), reverse=True) if d.is_dir() else []
    if not steps:
        return f"no checkpoint was committed in {d} yet: rerunning the same command starts the run from the beginning"
    return f"checkpoint step {steps[0]} in {d} is intact (committed and sealed): rerunning the same command resumes from it"


def is_multiprocess_request(coordinator: str | None = None) -> bool:
    """Whether the flags or the environment ask for a multi-process run (before anything is started)."""
    return bool(coordinator or os.environ.get("FCN_COORDINATOR")
                or (int(os.environ.get("SLURM_NTASKS", "1")) > 1 and "SLURM_JOB_ID" in os.environ))


#: Lines of XLA's coordination-service abort: the child's stack trace the supervisor replaces with one line.
_SERVICE_ABORT = re.compile(r"coordination_service|Polled an error from coordination service|Check failure stack "
                            r"trace|^\s+@\s+0x|terminate called|CoordinationServiceAgent|Socket closed|"
                            r"Terminating process because the JAX distributed service detected fatal errors|"
                            r"preemption_sync_manager")


def supervise(argv: list[str]) -> int:
    """Run this command again as a child and stand between it and the user; returns its exit status.

    Only for multi-process runs, and only so that losing process 0 -- which
    holds the coordination service -- ends the survivors in one line instead
    of XLA's abort: the child's stderr passes through, except the lines of that
    abort, and a child that died of it becomes :data:`~fcn_jax.errors.EXIT_PEER_LOST`
    with the note of :func:`set_resume_note`. SIGTERM/SIGINT are passed on (a
    preempted job still saves); the child dies with its supervisor (Linux
    ``PR_SET_PDEATHSIG``).
    """
    import tempfile

    fd, note_path = tempfile.mkstemp(prefix="fcn_jax-note-", suffix=".json")
    os.close(fd)
    env = {**os.environ, "FCN_SUPERVISED": "1", "FCN_SUPERVISOR_NOTE": note_path}
    child = subprocess.Popen(argv, env=env, stderr=subprocess.PIPE, preexec_fn=_die_with_parent)
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda signum, _frame: child.send_signal(signum))
    aborted = False
    held: list[str] = []

    def relay(piece: bytes) -> None:
        nonlocal aborted
        text = piece.decode(errors="replace")
        if _SERVICE_ABORT.search(text):
            aborted = True
            held.append(text)
        else:
            sys.stderr.write(text)
            sys.stderr.flush()

    # pieces end at '\n' or '\r' (a progress bar redraws with '\r'): each is passed on as soon as it is whole
    pending = b""
    while chunk := child.stderr.read1(1 << 16):
        *whole, pending = re.split(rb"(?<=[\r\n])", pending + chunk)
        for piece in whole:
            relay(piece)
    if pending:
        relay(pending)
    code = child.wait()
    try:
        if aborted and code != 0:
            note = "rerunning the same command starts it again"
            try:
                with open(note_path) as f:
                    info = json.load(f)
                note = committed_step_note(info["checkpoint_dir"], info.get("sealed_by"))
            except (OSError, ValueError, KeyError):
                pass
            print(f"error: a peer process was lost: process 0 (the coordinator) is unreachable; {note}",
                  file=sys.stderr, flush=True)
            return EXIT_PEER_LOST
        if held:  # an abort that was not the exit status' cause: show it after all
            sys.stderr.writelines(held)
        return 128 - code if code < 0 else code  # a signal: the shell's 128 + N
    finally:
        os.unlink(note_path)


def _die_with_parent() -> None:
    """In the child, before exec: a SIGKILLed supervisor takes its child with it (Linux; elsewhere a no-op)."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


def start_peer_watch(timeout: float) -> "PeerWatch":
    """Start (once) the heartbeat watch of this multi-process run; see the module doc."""
    global _watch
    if _watch is None:
        import jax
        from jax._src import distributed as jax_distributed  # the coordination service's client

        _watch = PeerWatch(jax_distributed.global_state.client, jax.process_index(), jax.process_count(), timeout)
        _watch.start()
    return _watch


class PeerWatch:
    """Heartbeats through the coordination service's key-value store; a silent peer ends this process in one line.

    Counters, not clocks: a peer is alive while its counter moves, so hosts'
    clocks need not agree. A process that finishes says so (at exit), and is not
    mistaken for a lost one.
    """

    def __init__(self, client, process_id: int, num_processes: int, timeout: float,
                 on_lost: Callable[[str], None] | None = None):
        self.client, self.pid, self.n, self.timeout = client, process_id, num_processes, float(timeout)
        self.interval = max(0.2, self.timeout / 5)
        self.on_lost = on_lost or _exit_peer_lost
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="fcn_jax-peer-watch", daemon=True)

    def start(self) -> None:
        import atexit

        atexit.register(self.finish)
        self._thread.start()

    @property
    def finished(self) -> bool:
        return self._stop.is_set()

    def is_alive(self) -> bool:
        return self._thread.is_alive()

    def finish(self) -> None:
        """This process is done: say so (peers then ignore its silence) and stop watching."""
        self._stop.set()
        try:
            self.client.key_value_set(f"{_KEY}/done/{self.pid}", "1", allow_overwrite=True)
        except Exception:  # noqa: BLE001 - the store may already be gone at exit
            pass

    def _done(self, peer: int) -> bool:
        try:
            return self.client.key_value_try_get(f"{_KEY}/done/{peer}") == "1"
        except Exception:  # noqa: BLE001 - not found (or the store is gone: judged below)
            return False

    def _run(self) -> None:
        beat = 0
        start = time.monotonic()
        last_seen = {p: (None, start) for p in range(self.n) if p != self.pid}  # peer -> (counter, when)
        store_ok = start
        while not self._stop.wait(self.interval):
            now = time.monotonic()
            beat += 1
            try:
                self.client.key_value_set(f"{_KEY}/beat/{self.pid}", str(beat), allow_overwrite=True)
                store_ok = now
            except Exception:  # noqa: BLE001 - the store lives in process 0
                if now - store_ok > self.timeout and not self._stop.is_set():
                    return self.on_lost((f"process 0 (the coordinator) of {self.n}" if self.pid else
                                         "the coordination service") + " stopped responding")
                continue
            for peer, (seen, when) in list(last_seen.items()):
                try:
                    value = self.client.key_value_try_get(f"{_KEY}/beat/{peer}")
                except Exception:  # noqa: BLE001 - not posted yet
                    value = None
                if value is not None and value != seen:
                    last_seen[peer] = (value, now)
                elif now - when > self.timeout and not self._done(peer) and not self._stop.is_set():
                    return self.on_lost(f"process {peer} of {self.n} sent no heartbeat for {self.timeout:g} s")


def _exit_peer_lost(who: str) -> None:
    """One line on stderr and :data:`~fcn_jax.errors.EXIT_PEER_LOST`, from the watch thread (the main one may
    be blocked in a collective that will never complete)."""
    try:
        note = _resume_note()
    except Exception as e:  # noqa: BLE001 - the message must still go out
        note = f"(could not tell which checkpoint is intact: {e})"
    print(f"error: a peer process was lost: {who}; {note}", file=sys.stderr, flush=True)
    sys.stdout.flush()
    os._exit(EXIT_PEER_LOST)


def is_primary() -> bool:
    import jax

    return jax.process_index() == 0
