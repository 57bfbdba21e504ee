"""A lost peer: the survivors exit in one line with status 75 and the rerun resumes to the same losses.

The real thing (2 processes x 4 CPU devices, one SIGKILLed mid-training) and
the peer watch's logic on a fake key-value store.
"""

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from fcn_jax import distributed
from fcn_jax.errors import EXIT_PEER_LOST
from tests.helpers import logged_losses

REPO = Path(__file__).resolve().parent.parent
PEER_TIMEOUT = 8


# --------------------------------------------------------------------------- #
# The watch, on a fake coordination-service client
# --------------------------------------------------------------------------- #


class FakeStore:
    def __init__(self):
        self.kv, self.down, self.lock = {}, False, threading.Lock()

    def key_value_set(self, key, value, allow_overwrite=False):
        if self.down:
            raise RuntimeError("UNAVAILABLE: Socket closed")
        with self.lock:
            self.kv[key] = value

    def key_value_try_get(self, key):
        if self.down:
            raise RuntimeError("UNAVAILABLE: Socket closed")
        with self.lock:
            if key not in self.kv:
                raise RuntimeError(f"NOT_FOUND: {key}")
            return self.kv[key]


def _watches(store, n, timeout=0.5):
    lost = {p: [] for p in range(n)}
    watches = [distributed.PeerWatch(store, p, n, timeout, on_lost=lost[p].append) for p in range(n)]
    for w in watches:
        w._thread.start()
    return watches, lost


def test_watch_reports_a_silent_peer_and_only_that():
    store = FakeStore()
    (w0, w1, w2), lost = _watches(store, 3)
    time.sleep(1.0)
    assert lost == {0: [], 1: [], 2: []}  # all beating
    w2._stop.set()  # process 2 dies: its counter stops (not 'done')
    deadline = time.monotonic() + 5
    while not (lost[0] and lost[1]) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert lost[0] == ["process 2 of 3 sent no heartbeat for 0.5 s"] and lost[1] == lost[0]
    w0._stop.set(), w1._stop.set()


def test_watch_ignores_a_peer_that_finished():
    store = FakeStore()
    (w0, w1), lost = _watches(store, 2)
    time.sleep(0.6)
    w1.finish()  # a clean exit says so
    time.sleep(1.5)
    assert lost[0] == []
    w0._stop.set()


def test_watch_reports_the_coordinator_when_the_store_goes():
    store = FakeStore()
    (w0, w1), lost = _watches(store, 2)
    time.sleep(0.6)
    store.down = True  # process 0, which holds the store, is gone
    deadline = time.monotonic() + 5
    while not lost[1] and time.monotonic() < deadline:
        time.sleep(0.05)
    assert lost[1] == ["process 0 (the coordinator) of 2 stopped responding"]
    w0._stop.set()


def test_committed_step_note(tmp_path):
    ck = tmp_path / "checkpoints"
    assert "no checkpoint was committed" in distributed.committed_step_note(ck, "MANIFEST")
    for step, sealed in ((5, True), (10, True), (15, False)):  # 15: committed, not yet sealed
        (ck / str(step)).mkdir(parents=True)
        if sealed:
            (ck / str(step) / "MANIFEST").write_text("{}")
    (ck / "20.orbax-checkpoint-tmp").mkdir()
    note = distributed.committed_step_note(ck, "MANIFEST")
    assert note.startswith(f"checkpoint step 10 in {ck} is intact") and "rerunning the same command resumes" in note


# --------------------------------------------------------------------------- #
# 2 processes x 4 CPU devices, one SIGKILLed
# --------------------------------------------------------------------------- #


def _world_overrides(store):
    return {"data.store": store, "data.train_years": "[2000,2000]", "data.valid_years": "[2000,2000]",
            "model.embed_dim": 32, "model.depth": 2, "model.num_blocks": 8, "train.batch_size": 8,
            "train.steps": 20, "train.log_every": 1, "train.validate_every": 10, "train.checkpoint_every": 5,
            "train.validate_batches": 1, "train.warmup_steps": 0, "mesh.data": 2, "mesh.height": 2,
            "mesh.width": 2}


def _launch(workdir, store):
    from tests.multiproc import free_port

    sets = sum((["--set", f"{k}={v}"] for k, v in _world_overrides(store).items()), [])
    port = free_port()
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    return [subprocess.Popen([sys.executable, "-m", "fcn_jax.train", "world", "--workdir", str(workdir),
                              "--no-progress", *sets, "--cpu-devices", "4", "--coordinator", f"127.0.0.1:{port}",
                              "--num-processes", "2", "--process-id", str(i), "--peer-timeout", str(PEER_TIMEOUT)],
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO, env=env)
            for i in range(2)]




def _run_to_end(workdir, store):
    procs = _launch(workdir, store)
    outs = [p.communicate(timeout=900) for p in procs]
    for p, (_, err) in zip(procs, outs):
        assert p.returncode == 0, err[-3000:]


@pytest.fixture(scope="module")
def uninterrupted(world_store, tmp_path_factory):
    workdir = tmp_path_factory.mktemp("clean") / "run"
    _run_to_end(workdir, world_store)
    return logged_losses(workdir)


@pytest.mark.parametrize("victim", [1, pytest.param(0, marks=pytest.mark.slow)],
                         ids=["worker_lost", "coordinator_lost"])
def test_a_killed_process_ends_the_survivor_in_one_line_and_the_rerun_resumes(victim, world_store, uninterrupted,
                                                                              tmp_path):
    workdir = tmp_path / "run"
    procs = _launch(workdir, world_store)
    t0 = time.monotonic()
    while not (workdir / "checkpoints" / "10").is_dir():  # mid-training: after the second checkpoint
        assert time.monotonic() - t0 < 600 and all(p.poll() is None for p in procs), "training did not start"
        time.sleep(0.1)
    procs[victim].send_signal(signal.SIGKILL)
    killed = time.monotonic()
    survivor = procs[1 - victim]
    _, err = survivor.communicate(timeout=PEER_TIMEOUT + 60)
    took = time.monotonic() - killed
    procs[victim].communicate()
    assert survivor.returncode == EXIT_PEER_LOST, err[-3000:]
    assert took <= PEER_TIMEOUT + 10, took  # within the stated time (the timeout, plus a beat)
    lines = err.strip().splitlines()
    assert lines[-1].startswith("error: a peer process was lost: "), err[-3000:]
    assert (f"process {victim}" in lines[-1] and "is intact (committed and sealed): rerunning the same command "
            "resumes from it" in lines[-1]), lines[-1]
    assert "Check failure" not in err and "Traceback" not in err and "stack trace" not in err, err[-3000:]
    step = int(lines[-1].split("checkpoint step ")[1].split()[0])
    assert step >= 10

    _run_to_end(workdir, world_store)  # the same command again
    resumed = logged_losses(workdir)
    assert sorted(resumed) == sorted(uninterrupted) == list(range(1, 21))
    for s in resumed:  # steps after the intact checkpoint re-run: as if nothing happened
        assert resumed[s] == pytest.approx(uninterrupted[s], rel=1e-6, abs=0), s
