"""Fault injection: damaged / truncated / deleted checkpoint files, full disks, two writers, bad store chunks, NaNs.

Each test asserts what is kept (earlier checkpoints, the run directory) and what
the user is told (step, path, file, bytes, variable/time/chunk).
"""

import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fcn_jax.checkpoints import integrity
from fcn_jax.checkpoints.train_state import CheckpointDamagedError, CheckpointSpaceError, RunCheckpoints, abstract_like
from tests.helpers import logged_losses, world_overrides


def _overrides(store, **train):
    return world_overrides(store, validate_every=100, **train)


REPO = Path(__file__).resolve().parent.parent


# ------------------------------------------------------------------ helpers
def _state(seed: int) -> dict:
    rng = np.random.default_rng(seed)
    return {"w": jnp.asarray(rng.normal(size=(64, 512)).astype(np.float32)),  # 128 KiB: a real data file
            "b": jnp.asarray(rng.normal(size=(7,)).astype(np.float32)),
            "step": jnp.asarray(seed, jnp.int32)}


def _two_steps(directory: Path, log=None) -> RunCheckpoints:
    ck = RunCheckpoints(directory, keep_latest=3, keep_best=0, log=log or print)
    for step in (1, 2):
        ck.save(step, _state(step), {"pos": step}, {"step": step}, force=True)
    ck.wait()
    return ck


def _largest_file(step_dir: Path) -> Path:
    files = [p for p in step_dir.rglob("*") if p.is_file() and p.name != integrity.MANIFEST]
    return max(files, key=lambda p: p.stat().st_size)


def damage(step_dir: Path, kind: str) -> str:
    """Hurt one file of a checkpoint as a failing disk or a partial copy would; returns its relative name."""
    target = _largest_file(step_dir)
    if kind == "damaged":  # 4 KB overwritten in the middle
        data = bytearray(target.read_bytes())
        mid = len(data) // 2
        n = min(4096, len(data) // 4)
        data[mid:mid + n] = bytes((b + 1) % 256 for b in data[mid:mid + n])
        target.write_bytes(bytes(data))
    elif kind == "truncated":
        with open(target, "r+b") as f:
            f.truncate(target.stat().st_size // 3)
    elif kind == "deleted":
        target.unlink()
    elif kind == "manifest_deleted":
        target = step_dir / integrity.MANIFEST
        target.unlink()
    else:  # pragma: no cover
        raise ValueError(kind)
    return target.relative_to(step_dir).as_posix()


# ------------------------------------------------------- damaged checkpoints
@pytest.mark.parametrize("kind", ["damaged", "truncated", "deleted", "manifest_deleted"])
def test_damaged_latest_checkpoint_falls_back_to_newest_intact(tmp_path, kind):
    ckdir = tmp_path / "run" / "checkpoints"
    ck = _two_steps(ckdir)
    assert ck.verify(1) == [] and ck.verify(2) == []
    manifest = json.loads((ckdir / "2" / integrity.MANIFEST).read_text())
    assert any(name.startswith("state/") for name in manifest["files"])  # the arrays are covered
    ck.close()
    name = damage(ckdir / "2", kind)

    messages = []
    ck = RunCheckpoints(ckdir, keep_latest=3, keep_best=0, log=messages.append)
    step, state, data_state, meta = ck.restore_latest(abstract_like(_state(0)))
    # the newest intact step, exactly as saved
    assert step == 1 and data_state == {"pos": 1} and meta["step"] == 1
    for k, v in _state(1).items():
        np.testing.assert_array_equal(np.asarray(state[k]), np.asarray(v))
    # the user is told: step, path, which file and how
    assert len(messages) == 1
    msg = messages[0]
    assert "step 2" in msg and str(ckdir / "2") in msg and "falling back to step 1" in msg
    assert name in msg
    assert {"damaged": "contents damaged", "truncated": "truncated", "deleted": "missing",
            "manifest_deleted": "no integrity manifest"}[kind] in msg
    # the damaged step is set aside, never deleted, with a note; Orbax no longer lists it
    moved = tmp_path / "run" / "checkpoints_damaged" / "2"
    assert moved.is_dir() and "failed verification" in (moved.parent / "2.DAMAGED.txt").read_text()
    assert ck.all_steps() == [1]
    ck.close()


def test_restore_by_step_refuses_a_damaged_step(tmp_path):
    ck = _two_steps(tmp_path / "checkpoints")
    damage(tmp_path / "checkpoints" / "1", "damaged")
    with pytest.raises(CheckpointDamagedError, match=r"checkpoint step 1 .*contents damaged"):
        ck.restore(1, abstract_like(_state(0)))
    ck.close()


def test_no_intact_checkpoint_stops_and_moves_nothing(tmp_path):
    ckdir = tmp_path / "checkpoints"
    _two_steps(ckdir).close()
    damage(ckdir / "1", "truncated")
    damage(ckdir / "2", "deleted")
    ck = RunCheckpoints(ckdir)
    with pytest.raises(CheckpointDamagedError, match=r"no intact checkpoint.*step 2: .*missing.*step 1: .*truncated"):
        ck.restore_latest(abstract_like(_state(0)))
    assert ck.all_steps() == [1, 2] and not (tmp_path / "checkpoints_damaged").exists()
    ck.close()


def test_verify_command_reports_damage_without_changing_anything(tmp_path, capsys):
    from fcn_jax.checkpoint import main
    from fcn_jax.checkpoints.package import save_model
    from fcn_jax.config import load_experiment
    from fcn_jax.model.afnonet import build_model

    run = tmp_path / "run"
    _two_steps(run / "checkpoints").close()
    cfg = load_experiment("world", ["model.embed_dim=32", "model.depth=1"]).model
    save_model(run / "model_final", build_model(cfg, seed=0))
    assert main(["verify", str(run)]) == 0
    out = capsys.readouterr().out
    assert "ok       step 1" in out and "ok       step 2" in out and "model_final" in out and "all intact" in out

    name = damage(run / "checkpoints" / "2", "damaged")
    before = sorted(p.relative_to(run).as_posix() for p in run.rglob("*"))
    assert main(["verify", str(run)]) == 1
    out = capsys.readouterr().out
    assert "DAMAGED  step 2" in out and name in out and "ok       step 1" in out
    assert sorted(p.relative_to(run).as_posix() for p in run.rglob("*")) == before  # read-only
    from fcn_jax.train import main as train_main  # the training CLI's flag: the same check, no training

    assert train_main(["world", "--workdir", str(run), "--verify-checkpoints"]) == 1
    out = capsys.readouterr().out
    assert "DAMAGED  step 2" in out and name in out
    assert sorted(p.relative_to(run).as_posix() for p in run.rglob("*")) == before


def test_verify_tells_nothing_to_verify_and_missing_apart_from_damage(tmp_path, capsys):
    from fcn_jax.checkpoint import main
    from fcn_jax.train import main as train_main

    empty = tmp_path / "new_run"
    (empty / "checkpoints").mkdir(parents=True)  # a run that has not saved yet
    assert main(["verify", str(empty)]) == 6
    out = capsys.readouterr().out
    assert "nothing" in out and "DAMAGED" not in out and "not damage" in out
    assert main(["verify", str(tmp_path / "no_such_run")]) == 2
    out = capsys.readouterr().out
    assert "no such file or directory" in out and "DAMAGED" not in out
    assert train_main(["world", "--workdir", str(empty), "--verify-checkpoints"]) == 6
    run = tmp_path / "run"
    _two_steps(run / "checkpoints").close()
    damage(run / "checkpoints" / "2", "damaged")
    # several paths: damage outranks a missing path, which outranks nothing to verify
    assert main(["verify", str(empty), str(tmp_path / "no_such_run"), str(run)]) == 1
    assert "DAMAGED checkpoints found" in capsys.readouterr().out
    assert main(["verify", str(empty), str(tmp_path / "no_such_run")]) == 2
    assert "DAMAGED" not in capsys.readouterr().out


def test_seal_adds_manifests_only_where_missing(tmp_path, capsys):
    from fcn_jax.checkpoint import main

    ckdir = tmp_path / "run" / "checkpoints"
    _two_steps(ckdir).close()
    (ckdir / "1" / integrity.MANIFEST).unlink()  # as a checkpoint from before integrity data
    damage(ckdir / "2", "damaged")
    assert main(["seal", str(tmp_path / "run")]) == 0
    assert f"sealed   {ckdir / '1'}" in capsys.readouterr().out
    assert integrity.verify(ckdir / "1") == []
    assert integrity.verify(ckdir / "2") != []  # an existing manifest is never rewritten


def test_exported_model_carries_and_verifies_integrity(tmp_path):
    from fcn_jax.checkpoints.package import load_model, save_model
    from fcn_jax.config import load_experiment
    from fcn_jax.model.afnonet import build_model

    cfg = load_experiment("world", ["model.embed_dim=32", "model.depth=1"]).model
    out = save_model(tmp_path / "model", build_model(cfg, seed=0))
    assert integrity.verify(out) == []
    load_model(out)  # intact: loads
    name = damage(out, "damaged")
    with pytest.raises(integrity.IntegrityError, match=rf"model checkpoint .* is damaged: {name}: contents damaged"):
        load_model(out)


# ---------------------------------------------------------------- full disk
def test_full_disk_is_refused_before_writing(tmp_path, monkeypatch):
    from fcn_jax.checkpoints import train_state as checkpointing

    ckdir = tmp_path / "checkpoints"
    ck = _two_steps(ckdir)
    real = shutil.disk_usage

    def tiny(path):
        return real(path)._replace(free=50_000)

    monkeypatch.setattr(checkpointing.shutil, "disk_usage", tiny)
    with pytest.raises(CheckpointSpaceError) as err:
        ck.save(3, _state(3), {"pos": 3}, {"step": 3}, force=True)
    e = err.value
    assert e.step == 3 and e.free == 50_000 and e.needed > 128 * 1024
    assert "needs about 1.1 MiB, 48.8 KiB is free" in str(e) and "steps [1, 2]" in str(e)
    assert "resumes from step 2" in str(e)
    assert sorted(p.name for p in ckdir.iterdir()) == ["1", "2"]  # nothing started, nothing lost
    assert ck.verify(1) == [] and ck.verify(2) == []
    ck.close()


def _can_mount_tmpfs() -> bool:
    if shutil.which("unshare") is None:
        return False
    r = subprocess.run(["unshare", "-Urm", "sh", "-c", "d=$(mktemp -d) && mount -t tmpfs -o size=1m tmpfs $d"],
                       capture_output=True)
    return r.returncode == 0


_ENOSPC_SCRIPT = textwrap.dedent("""
    import json, os, sys
    import jax.numpy as jnp, numpy as np
    from fcn_jax.checkpoints.train_state import CheckpointSpaceError, RunCheckpoints
    d = sys.argv[1]
    ck = RunCheckpoints(os.path.join(d, "checkpoints"), check_free_space=False)  # the real write must fail
    ck.save(1, {"a": jnp.arange(1000.0)}, {"i": 1}, {"m": 1}, force=True)
    ck.wait()
    big = {"a": jnp.asarray(np.random.default_rng(0).normal(size=400_000).astype(np.float32))}  # 1.6 MB > disk
    try:
        ck.save(2, big, {"i": 2}, {"m": 2}, force=True)
        ck.wait()
        print("RESULT saved")
    except CheckpointSpaceError as e:
        print("RESULT", e)
    print("LISTING", json.dumps(sorted(os.listdir(os.path.join(d, "checkpoints")))))
    ck.close()
""")


@pytest.mark.skipif(not _can_mount_tmpfs(), reason="needs `unshare -Urm` to mount a tiny tmpfs")
def test_enospc_on_a_tiny_filesystem_keeps_earlier_checkpoints(tmp_path):
    """A real 1 MiB tmpfs fills up during the save: tensorstore's write fails with ENOSPC."""
    (tmp_path / "enospc.py").write_text(_ENOSPC_SCRIPT)
    mnt, keep = tmp_path / "mnt", tmp_path / "after"
    mnt.mkdir()
    script = (f"mount -t tmpfs -o size=1m tmpfs {mnt} && "
              f"{sys.executable} {tmp_path / 'enospc.py'} {mnt} && cp -a {mnt} {keep}")
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONPATH": str(REPO)}
    r = subprocess.run(["unshare", "-Urm", "sh", "-c", script], capture_output=True, text=True, timeout=300, env=env)
    assert r.returncode == 0, r.stderr[-3000:]
    result = [l for l in r.stdout.splitlines() if l.startswith("RESULT")][0]
    assert "saving checkpoint step 2" in result and "no space left on device" in result
    assert "needs about 2.5 MiB" in result and "steps [1]" in result and "resumes from step 1" in result
    listing = json.loads([l for l in r.stdout.splitlines() if l.startswith("LISTING")][0][len("LISTING "):])
    assert [n for n in listing if n.isdigit()] == ["1"]  # step 2 never committed, step 1 stays
    # the next start (here: on a copy with room) resumes from the last complete step
    ck = RunCheckpoints(keep / "checkpoints")
    assert ck.all_steps() == [1]
    step, state, _, meta = ck.restore_latest({"a": jax.ShapeDtypeStruct((1000,), jnp.float32)})
    assert step == 1 and meta == {"m": 1}
    np.testing.assert_array_equal(np.asarray(state["a"]), np.arange(1000.0, dtype=np.float32))
    ck.close()


def test_enospc_from_the_storage_layer_is_reported_with_sizes(tmp_path, monkeypatch):
    """An injected OSError(ENOSPC) while Orbax writes the step (e.g. another writer filled the disk)."""
    import errno

    from orbax.checkpoint._src.handlers import json_checkpoint_handler as jh

    ckdir = tmp_path / "checkpoints"
    ck = _two_steps(ckdir)

    async def full(self, x, directory):  # the JSON items' file write
        raise OSError(errno.ENOSPC, "No space left on device", str(directory))

    monkeypatch.setattr(jh.JsonCheckpointHandler, "_save_fn", full)
    with pytest.raises(CheckpointSpaceError, match=r"step 3 .*no space left on device.*needs about .*steps \[1, 2\]"):
        ck.save(3, _state(3), {"pos": 3}, {"step": 3}, force=True)
        ck.wait()
    monkeypatch.undo()
    assert sorted(p.name for p in ckdir.iterdir() if p.name.isdigit()) == ["1", "2"]
    try:
        ck.close()
    except Exception:  # noqa: BLE001 - Orbax may re-raise the failed save's other errors
        pass
    ck = RunCheckpoints(ckdir)  # the next start restores step 2 (Orbax removes the partial step meanwhile)
    assert ck.all_steps() == [1, 2]
    assert ck.restore_latest(abstract_like(_state(0)))[0] == 2 and ck.verify(1) == ck.verify(2) == []
    ck.close()


# -------------------------------------------------------------- two writers
def test_second_process_on_a_live_run_directory_is_refused(tmp_path):
    from fcn_jax.training.runlock import RunLock, RunLockedError

    run = tmp_path / "run"
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time; from fcn_jax.training.runlock import RunLock; "
         f"RunLock({str(run)!r}).acquire(); print('locked', flush=True); time.sleep(600)"],
        stdout=subprocess.PIPE, text=True, cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)})
    try:
        assert holder.stdout.readline().strip() == "locked"
        second = subprocess.run(
            [sys.executable, "-m", "fcn_jax.train", "world", "--workdir", str(run), "--no-progress"],
            capture_output=True, text=True, timeout=300, cwd=REPO,
            env={**os.environ, "PYTHONPATH": str(REPO), "JAX_PLATFORMS": "cpu"})
        assert second.returncode == 2, second.stderr[-2000:]
        assert f"{run} is in use by another training process (pid {holder.pid} on host" in second.stderr
        assert sorted(p.name for p in run.iterdir()) == [".lock"]  # nothing of the run touched
        with pytest.raises(RunLockedError):
            RunLock(run).acquire()
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    # a crashed (killed) holder leaves no stuck lock
    with RunLock(run):
        assert f'"pid": {os.getpid()}' in (run / ".lock").read_text()


# ------------------------------------------------------- training-level faults
def _store_copy(store, tmp_path) -> Path:
    dst = tmp_path / "store.zarr"
    shutil.copytree(store, dst)
    return dst


def _batch_windows(store, cfg, batch: int):
    """(window indices of global batch ``batch`` (0-based), the WindowSource), in the pipeline's own order."""
    import grain

    from fcn_jax.data.pipeline import WindowSource

    src = WindowSource(store, list(cfg.data.channels), cfg.train.rollout_steps, "2000", stride=cfg.data.dt)
    ds = grain.MapDataset.range(len(src)).seed(cfg.train.seed).shuffle().repeat(None)
    return [int(i) for i in ds.batch(cfg.train.batch_size, drop_remainder=True)[batch]], src


@pytest.mark.slow
def test_resume_after_damaged_latest_checkpoint_matches_an_undamaged_run(world_store, tmp_path):
    from fcn_jax.config import load_experiment
    from fcn_jax.training.loop import train

    cfg = load_experiment("world", _overrides(world_store))
    train(cfg, tmp_path / "ref", progress=False)
    reference = logged_losses(tmp_path / "ref")

    run = tmp_path / "run"
    first = train(cfg, run, progress=False, max_steps=6)
    assert first["last_saved"] == 6
    name = damage(run / "checkpoints" / "6", "damaged")
    second = train(cfg, run, progress=False)
    assert second["start_step"] == 4 and second["final_step"] == 8  # newest intact: step 4
    assert (run / "checkpoints_damaged" / "6").is_dir()
    assert name in (run / "checkpoints_damaged" / "6.DAMAGED.txt").read_text()
    resumed = logged_losses(run)
    assert sorted(resumed) == list(range(1, 9))
    for step in range(1, 9):  # steps 5, 6 re-run from step 4, 7, 8 new: all as if nothing happened
        assert resumed[step] == pytest.approx(reference[step], rel=1e-6, abs=0), step
    from fcn_jax.checkpoints.package import verify_path

    verdict, lines = verify_path(run)
    assert verdict == "intact", lines


@pytest.mark.slow
def test_full_disk_during_training_stops_and_next_start_resumes(world_store, tmp_path, monkeypatch):
    from fcn_jax.checkpoints import train_state as checkpointing
    from fcn_jax.config import load_experiment
    from fcn_jax.training.loop import train

    cfg = load_experiment("world", _overrides(world_store, steps=6))
    real, calls = shutil.disk_usage, []

    def filling_up(path):  # room for the first two saves, then the disk is full
        calls.append(path)
        return real(path) if len(calls) <= 2 else real(path)._replace(free=10_000)

    monkeypatch.setattr(checkpointing.shutil, "disk_usage", filling_up)
    run = tmp_path / "run"
    with pytest.raises(CheckpointSpaceError, match=r"saving checkpoint step 6 .*needs about .*9.8 KiB is free.*"
                                                   r"steps \[2, 4\].*resumes from step 4"):
        train(cfg, run, progress=False)
    monkeypatch.undo()
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["2", "4"]
    assert not (run / "model_final").exists()
    summary = train(cfg, run, progress=False)
    assert summary["start_step"] == 4 and summary["final_step"] == 6


def test_damaged_store_chunk_names_variable_time_and_chunk(world_store, tmp_path):
    from fcn_jax.config import load_experiment
    from fcn_jax.data.errors import DataError
    from fcn_jax.training.loop import train

    bad_store = _store_copy(world_store, tmp_path)
    cfg = load_experiment("world", _overrides(str(bad_store), steps=8))
    # a time step first read in the batch of step 5 (so checkpoints 2 and 4 exist before it)
    seen = set()
    for b in range(4):
        idx, src = _batch_windows(str(bad_store), cfg, b)
        seen |= {int(t) for i in idx for t in src._index[i]}
    idx, src = _batch_windows(str(bad_store), cfg, 4)
    t = next(int(t) for i in idx for t in src._index[i] if int(t) not in seen)
    chunk = bad_store / "fields" / f"{t}.0.0.0"
    chunk.write_bytes(np.random.default_rng(0).integers(0, 256, chunk.stat().st_size, np.uint8).tobytes())

    run = tmp_path / "run"
    with pytest.raises(DataError) as err:
        train(cfg, run, progress=False)
    msg = str(err.value)
    when = np.datetime_as_string(src.times[t], unit="m")
    assert f"variable 'fields' cannot be decoded at time {when} (time index {t}), chunk {chunk}" in msg
    assert "batch of step 5" in msg
    ck = RunCheckpoints(run / "checkpoints")
    assert ck.all_steps() == [2, 4] and ck.verify(2) == [] and ck.verify(4) == []  # untouched
    ck.close()


@pytest.mark.parametrize("kind", ["garbage", "truncated"])
def test_window_read_of_a_damaged_chunk_names_it(world_store, tmp_path, kind):
    from fcn_jax.data.errors import DataError
    from fcn_jax.data.pipeline import WindowSource

    bad_store = _store_copy(world_store, tmp_path)
    src = WindowSource(str(bad_store), None, rollout_steps=2, years="2000", stride=2)  # non-contiguous reads
    i = 10
    t = int(src._index[i][1])  # the middle step of window 10
    chunk = bad_store / "fields" / f"{t}.0.0.0"
    raw = chunk.read_bytes()
    chunk.write_bytes(raw[: len(raw) // 2] if kind == "truncated" else bytes(len(raw)))
    with pytest.raises(DataError, match=rf"'fields' cannot be decoded at time .* \(time index {t}\), chunk {chunk}"):
        src[i]
    np.testing.assert_array_equal(src[i + 3].shape, (3, 32, 64, 17))  # other windows still read


def test_nan_in_the_data_is_reported_with_step_and_time_stamps(world_store, tmp_path, data_mesh):
    import zarr

    from fcn_jax.config import load_experiment
    from fcn_jax.data.pipeline import make_train_iterator
    from fcn_jax.training.loop import NonFiniteLossError, train

    bad_store = _store_copy(world_store, tmp_path)
    arr = zarr.open_array(str(bad_store / "fields"), mode="r+")
    poisoned = [40, 90, 130]
    for t in poisoned:  # NaN that got into the store after prepare
        x = arr[t]
        x[3, 5, 7] = np.nan
        arr[t] = x
    cfg = load_experiment("world", _overrides(str(bad_store), steps=20, checkpoint_every=4))
    # which step meets a NaN, found by reading the batches through the real pipeline (no shortcut)
    with jax.set_mesh(data_mesh):
        it = make_train_iterator(str(bad_store), mesh=data_mesh, batch_size=8, channels=list(cfg.data.channels),
                                 years="2000", seed=cfg.train.seed, normalize=False)
        first_bad = next(b for b in range(20) if not np.isfinite(np.asarray(next(it))).all()) + 1
    with pytest.raises(NonFiniteLossError) as err:
        train(cfg, tmp_path / "run", progress=False)
    msg = str(err.value)
    assert f"became NaN or Inf by step {first_bad}: the first non-finite step" in msg
    import re

    starts = re.search(r"windows starting at \[([^\]]*)\]", msg).group(1).split(", ")
    assert len(starts) <= 8
    src = it.source
    bad_starts = {np.datetime_as_string(src.times[t - d], unit="h") for t in poisoned for d in (0, cfg.data.dt)}
    assert bad_starts & set(starts), (starts, bad_starts)
    last_good = (first_bad - 1) // 4 * 4
    if last_good:
        assert f"last good checkpoint is step {last_good} (verified)" in msg
