"""The training workflow: modes, exact resume (SIGKILL), resharding, preemption, NaNs, multi-process."""

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import jax
import numpy as np
import optax
import pytest

from fcn_jax.config import load_experiment
from fcn_jax.training.loop import NonFiniteLossError, train
from tests.helpers import logged_losses, world_overrides

REPO = Path(__file__).resolve().parent.parent


@pytest.mark.slow
def test_pretrain_then_finetune_through_entry_points(world_store, tmp_path):
    pre = tmp_path / "pre"
    cfg = load_experiment("world", world_overrides(world_store))
    summary = train(cfg, pre, progress=False)
    assert summary["final_step"] == 8
    assert (pre / "config.yaml").is_file() and (pre / "model_best" / "model.json").is_file()
    assert load_experiment(pre / "config.yaml") == cfg  # the resolved config reloads as is
    # the exported model is a package: the store's statistics, grid and climatology travel with it
    from fcn_jax.checkpoints.package import read_package
    from fcn_jax.data.store import StoreInfo

    pkg, info = read_package(pre / "model_best"), StoreInfo.read(world_store)
    assert pkg.channels == tuple(cfg.data.channels) and pkg.has_stats and pkg.has_climatology
    np.testing.assert_array_equal(pkg.mean, info.mean[info.index_of(cfg.data.channels)])
    np.testing.assert_array_equal(pkg.std, info.std[info.index_of(cfg.data.channels)])
    np.testing.assert_array_equal(pkg.lat, info.lat)
    np.testing.assert_array_equal(pkg.climatology()["time_mean"].values, info.time_mean(cfg.data.channels))
    assert pkg.provenance["store"] == str(Path(world_store).resolve()) and pkg.provenance["experiment"] == cfg.name
    recs = [json.loads(l) for l in (pre / "metrics.jsonl").read_text().splitlines()]
    train_recs = [r for r in recs if r.get("kind") != "validation"]
    assert {"step", "loss", "lr", "samples_per_s"} <= set(train_recs[0])
    val = [r for r in recs if r.get("kind") == "validation"]
    assert [r["step"] for r in val] == [4, 8]
    assert set(val[0]["rmse"]) == set(cfg.data.channels) and len(val[0]["acc"]["z500"]) == 1
    assert list((pre / "tb").iterdir())  # TensorBoard event file

    # fine-tuning: the original's 2-step loss from the pre-trained weights, via the CLI
    ft = tmp_path / "ft"
    proc = subprocess.run(
        [sys.executable, "-m", "fcn_jax.train", "world_finetune", "--workdir", str(ft), "--no-progress",
         *sum((["--set", o] for o in world_overrides(world_store, steps=4, init_from=str(pre))), [])],
        capture_output=True, text=True, timeout=600, cwd=REPO,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "initialised weights from" in proc.stdout
    recs = [json.loads(l) for l in (ft / "metrics.jsonl").read_text().splitlines()]
    assert len(recs[0]["loss_per_step"]) == 2
    assert recs[0]["loss"] == pytest.approx(sum(recs[0]["loss_per_step"]), rel=1e-6)
    val = [r for r in recs if r.get("kind") == "validation"][0]
    assert val["lead_hours"] == [6, 12] and len(val["rmse"]["z500"]) == 2


def test_loss_decreases_on_a_fixed_batch(world_store):
    from fcn_jax.data.pipeline import make_train_iterator
    from fcn_jax.model.afnonet import build_model
    from fcn_jax.parallel.mesh import make_mesh
    from fcn_jax.training.step import init_train_state, make_train_step

    cfg = load_experiment("world", world_overrides(world_store))
    mesh = make_mesh((1, 1, 1, 1))
    with jax.set_mesh(mesh):
        it = make_train_iterator(world_store, mesh=mesh, batch_size=4, channels=list(cfg.data.channels), years="2000")
        batch = next(it)
        tx = optax.adam(3e-3)
        graphdef, state = init_train_state(build_model(cfg.model, seed=0), tx)
        step = make_train_step(graphdef, tx)
        losses = []
        for _ in range(25):
            state, m = step(state, batch)
            losses.append(float(m["loss"]))
    assert losses[-1] < 0.5 * losses[0], losses


def _train_cmd(workdir, overrides, *extra):
    return [sys.executable, "-m", "fcn_jax.train", "world", "--workdir", str(workdir), "--no-progress",
            *sum((["--set", o] for o in overrides), []), *extra]


def _wait_for_step(workdir, step, proc, timeout=300):
    t0 = time.time()
    while time.time() - t0 < timeout:
        if proc.poll() is not None:
            raise AssertionError(f"run ended early: {proc.stderr.read()[-3000:]}")
        ck = Path(workdir, "checkpoints")
        if (Path(workdir) / "metrics.jsonl").exists() and max(logged_losses(workdir), default=0) >= step \
                and ck.is_dir() and any(p.name.isdigit() for p in ck.iterdir()):
            return
        time.sleep(0.2)
    raise AssertionError("timed out waiting for the run")


@pytest.mark.slow
def test_exact_resume_after_sigkill(world_store, tmp_path):
    ov = world_overrides(world_store, steps=12, validate_every=100)
    ref = tmp_path / "ref"
    subprocess.run(_train_cmd(ref, ov), check=True, capture_output=True, timeout=600, cwd=REPO)
    reference = logged_losses(ref)

    run = tmp_path / "run"
    proc = subprocess.Popen(_train_cmd(run, ov), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO)
    _wait_for_step(run, 5, proc)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    killed_at = max(logged_losses(run))
    assert killed_at < 12
    done = subprocess.run(_train_cmd(run, ov), capture_output=True, text=True, timeout=600, cwd=REPO)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "resumed" in done.stdout
    resumed = logged_losses(run)
    assert max(resumed) == 12
    # every step's loss -- before the kill, and re-run after the resume -- equals the uninterrupted run
    for step, loss in resumed.items():
        assert loss == pytest.approx(reference[step], rel=1e-6, abs=0), step


@pytest.mark.slow
def test_resume_onto_another_mesh(world_store, tmp_path):
    # 4 steps on (8,1,1,1), then continue on (2,2,2,1): the checkpoint reshards on restore
    ov = world_overrides(world_store, steps=8, validate_every=100)
    first = load_experiment("world", [*ov, "mesh.data=8"])
    train(first, tmp_path / "a", progress=False, max_steps=4)
    second = load_experiment("world", [*ov, "mesh.data=2", "mesh.channel=2", "mesh.height=2"])
    summary = train(second, tmp_path / "a", progress=False)
    assert summary["start_step"] == 4 and summary["final_step"] == 8
    straight = train(first, tmp_path / "b", progress=False)
    assert straight["final_step"] == 8
    a, b = logged_losses(tmp_path / "a"), logged_losses(tmp_path / "b")
    for step in range(1, 9):
        assert a[step] == pytest.approx(b[step], rel=2e-5), step


def test_sigterm_saves_and_exits_cleanly(world_store, tmp_path):
    ov = world_overrides(world_store, steps=1000, checkpoint_every=500, validate_every=1000)
    run = tmp_path / "run"
    proc = subprocess.Popen(_train_cmd(run, ov), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            cwd=REPO)
    t0 = time.time()
    while max(logged_losses(run), default=0) < 3 if (run / "metrics.jsonl").exists() else True:
        assert proc.poll() is None and time.time() - t0 < 300
        time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err[-3000:]
    assert "'preempted': True" in out
    steps = sorted(int(p.name) for p in (run / "checkpoints").iterdir() if p.name.isdigit())
    assert steps and steps[-1] == max(logged_losses(run)) and steps[-1] < 500


def test_non_finite_loss_stops_and_keeps_last_good_checkpoint(world_store, tmp_path):
    from fcn_jax.checkpoints.train_state import RunCheckpoints

    cfg = load_experiment("world", world_overrides(world_store, lr=1e12, checkpoint_every=1, log_every=1, steps=20,
                                                   validate_every=100))
    with pytest.raises(NonFiniteLossError, match=r"NaN or Inf by step \d+.*last good checkpoint is step \d+"):
        train(cfg, tmp_path / "run", progress=False)
    ck = RunCheckpoints(tmp_path / "run" / "checkpoints")
    last = ck.latest_step()
    assert last is not None and last < 20
    # the kept checkpoint holds finite numbers
    import orbax.checkpoint as ocp

    restored = ocp.CheckpointManager(tmp_path / "run" / "checkpoints").restore(
        last, args=ocp.args.Composite(state=ocp.args.StandardRestore()))
    assert all(np.isfinite(np.asarray(x)).all() for x in jax.tree.leaves(restored["state"]))
    ck.close()


@pytest.mark.slow
def test_two_processes_match_one(world_store, tmp_path):
    from tests.multiproc import run_one_and_two_processes

    ov = world_overrides(world_store, steps=4, validate_every=4, checkpoint_every=4)
    run_one_and_two_processes(lambda wd, *extra: _train_cmd(wd, ov, *extra), tmp_path / "one", tmp_path / "two")
    a, b = logged_losses(tmp_path / "one"), logged_losses(tmp_path / "two")
    assert sorted(a) == sorted(b) == [1, 2, 3, 4]
    for step in a:
        assert b[step] == pytest.approx(a[step], rel=1e-5), step
    assert (tmp_path / "two" / "model_final" / "model.json").is_file()
