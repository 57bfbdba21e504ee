"""Precipitation training: the world's tp proxy, the feed's pairing, PrecipNet on a frozen backbone.

Mode ``precip`` (fourcastnet-model.md §14.5): a frozen backbone predicts the
state at t+1 from the state at t, PrecipNet maps the prediction to
log1p(tp / eps) and is trained against ``tp`` at t+1, the accumulation over the
6 h ending at t+1 (§11.1).
"""

import json
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest
import xarray as xr

from fcn_jax.config import load_experiment
from fcn_jax.data.channels import WORLD
from fcn_jax.data.errors import DataError
from fcn_jax.data.world import WORLD_STORE_CHANNELS, accumulate_6h, large_scale_precip_rate
from fcn_jax.training.loop import train
from tests.helpers import logged_losses, world_overrides

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def backbone(world_store, tmp_path_factory):
    """A fresh (untrained) tiny world backbone saved as a model checkpoint: the frozen wind model."""
    from fcn_jax.checkpoints import package as model_ckpt
    from fcn_jax.model.afnonet import build_model

    cfg = load_experiment("world", _overrides(world_store, "unused"))
    path = tmp_path_factory.mktemp("backbone") / "model"
    model_ckpt.save_model(path, build_model(cfg.model, seed=1))
    return str(path)


def _overrides(store, backbone, **train):
    """Tiny models on one data year (2000), a few steps, PrecipNet on the frozen ``backbone``."""
    return world_overrides(store, **{"validate_every": 3, "steps": 6, "checkpoint_every": 3,
                                     "backbone_checkpoint": backbone, "rollout_steps": 1, **train})


def _records(workdir):
    return [json.loads(line) for line in Path(workdir, "metrics.jsonl").read_text().splitlines()]


# ------------------------------------------------------------------ the proxy
def test_tp_proxy_is_a_non_negative_accumulation_ending_at_its_time(world_store):
    ds = xr.open_zarr(world_store)
    assert tuple(ds["channel"].values) == WORLD_STORE_CHANNELS == (*WORLD, "tp")
    assert str(ds["channel_units"].sel(channel="tp").values) == "m"
    f = ds["fields"]
    tp = f.sel(channel="tp").values.astype(np.float64)  # [time, lat, lon], metres
    assert np.isfinite(tp).all() and tp.min() >= 0.0
    assert 0.05 < (tp == 0).mean() < 0.95 and (tp > 1e-5).mean() > 0.05  # many dry points, many wet
    assert tp.max() < 0.05  # < 50 mm in 6 h on a 5.6-degree grid
    # The netCDF carries it as the CDS reader expects: a single-level variable in metres.
    sl = xr.open_dataset(Path(world_store).parent / "netcdf" / "world_2000_single_levels.nc")
    assert sl["tp"].attrs["units"] == "m" and "ending at valid_time" in sl["tp"].attrs["comment"]
    sl.close()

    # Alignment: recompute the instantaneous rate from the stored 850 hPa state;
    # tp[k] is the trapezoid over (t_{k-1}, t_k] -- the interval ending at t_k --
    # and not the one starting there.
    lat, lon = ds["lat"].values, ds["lon"].values
    rate = large_scale_precip_rate(*(f.sel(channel=c).values for c in ("u850", "v850", "t850", "sp")), lat, lon)
    ending = accumulate_6h(rate[1:], rate[0])  # intervals ending at t_1 .. t_{n-1}
    np.testing.assert_allclose(tp[1:], ending, rtol=1e-5, atol=1e-10)
    starting = 0.5 * (rate[1:-1] + rate[2:]) * 6 * 3600 / 1000.0  # intervals starting at t_1 .. t_{n-2}
    assert np.abs(tp[1:-1] - starting).mean() > 10 * np.abs(tp[1:-1] - ending[:-1]).mean()


def test_precip_rate_physics():
    # a convergent flow rains, the same flow reversed does not; warmer air rains more (Clausius-Clapeyron)
    lat = np.linspace(60, -60, 9)
    lon = np.arange(16) * 22.5
    lam, phi = np.meshgrid(np.deg2rad(lon), np.deg2rad(lat))
    u = -10.0 * np.sin(lam) * np.ones_like(phi)  # du/dlambda = -10 cos(lambda): convergent near lambda = 0
    v = np.zeros_like(u)
    sp = np.full_like(u, 1.0e5)
    r_warm = large_scale_precip_rate(u, v, np.full_like(u, 290.0), sp, lat, lon)
    r_cold = large_scale_precip_rate(u, v, np.full_like(u, 260.0), sp, lat, lon)
    r_rev = large_scale_precip_rate(-u, v, np.full_like(u, 290.0), sp, lat, lon)
    assert r_warm.min() == 0.0 and r_warm[:, 0].min() > 0 and (r_warm[:, 8] == 0).all()
    assert (r_rev[:, 0] == 0).all() and r_rev[:, 8].min() > 0
    assert (r_warm[:, 0] > 5 * r_cold[:, 0]).all()


# ------------------------------------------------------------------ the feed
def test_feed_pairs_the_state_at_t_with_tp_at_t_plus_1(world_store, backbone, data_mesh):
    from fcn_jax.training.data_feed import open_feed

    cfg = load_experiment("world_precip", _overrides(world_store, backbone))
    ds = xr.open_zarr(world_store)
    x = ds["fields"].transpose("time", "lat", "lon", "channel").values  # [time, lat, lon, C + 1]
    with jax.set_mesh(data_mesh):
        feed = open_feed(cfg, data_mesh)
        batch = feed.next_train()
        assert batch["fields"].shape == (8, 2, 32, 64, 16) and batch["tp"].shape == (8, 1, 32, 64, 1)
        assert feed.norm[0].shape == (16,) and feed.climatology.shape == (32, 64, 1)  # inputs only; tp's clim
        np.testing.assert_allclose(np.asarray(feed.norm[0]), ds["mean"].values[:16], rtol=1e-6)
        fields, tp = np.asarray(batch["fields"]), np.asarray(batch["tp"])
        feed.close()
    for b in range(fields.shape[0]):
        t = int(np.nonzero((x[:, :, :, :16] == fields[b, 0]).all(axis=(1, 2, 3)))[0][0])
        np.testing.assert_array_equal(fields[b, 1], x[t + 1, :, :, :16])
        np.testing.assert_array_equal(tp[b, 0, :, :, 0], x[t + 1, :, :, 16])


def test_multi_lead_precip_pairs_each_backbone_step_with_its_tp(world_store, backbone, data_mesh):
    """rollout_steps = k: tp at t+1 .. t+k; PrecipNet on the backbone's 1 .. k-step states, per-lead loss."""
    from fcn_jax.checkpoints import package as model_ckpt
    from fcn_jax.model.afnonet import build_model
    from fcn_jax.normalize import normalize, precip_to_log
    from fcn_jax.training.data_feed import open_feed
    from fcn_jax.training.losses import relative_l2
    from fcn_jax.training.step import precip_forward

    cfg = load_experiment("world_precip", _overrides(world_store, backbone, rollout_steps=3, precip_eps=1e-2))
    x = xr.open_zarr(world_store)["fields"].transpose("time", "lat", "lon", "channel").values  # [t, lat, lon, C+1]
    with jax.set_mesh(data_mesh):
        feed = open_feed(cfg, data_mesh)
        batch = feed.next_train()
        mean, std = (np.asarray(a) for a in feed.norm)
        feed.close()
        assert batch["fields"].shape == (8, 4, 32, 64, 16) and batch["tp"].shape == (8, 3, 32, 64, 1)
        fields, tp = np.asarray(batch["fields"]), np.asarray(batch["tp"])
        for b in range(8):
            t = int(np.nonzero((x[:, :, :, :16] == fields[b, 0]).all(axis=(1, 2, 3)))[0][0])
            np.testing.assert_array_equal(tp[b, :, :, :, 0], x[t + 1:t + 4, :, :, 16])
        wind = model_ckpt.load_model(backbone, mesh=data_mesh)
        pnet = build_model(cfg.model, seed=0)
        nbatch = {"fields": normalize(batch["fields"], mean, std), "tp": batch["tp"]}
        loss, per_lead, pred = precip_forward(pnet, wind, nbatch, 1e-2)
        # the same by hand: step the backbone, apply PrecipNet at each lead, relative L2 per lead, mean
        state, want = nbatch["fields"][:, 0], []
        for j in range(3):
            state = wind(state)
            want.append(float(relative_l2(pnet(state), precip_to_log(batch["tp"][:, j], 1e-2))))
            np.testing.assert_allclose(np.asarray(pred[:, j]), np.asarray(pnet(state)), rtol=2e-5, atol=2e-5)
    np.testing.assert_allclose(np.asarray(per_lead), want, rtol=1e-5)
    assert float(loss) == pytest.approx(np.mean(want), rel=1e-5)


def test_multi_lead_precip_through_the_loop_validates_every_lead(world_store, backbone, tmp_path):
    """rollout_steps = 2 in the loop: training and validation records carry one loss and one tp score per lead."""
    run = tmp_path / "run"
    cfg = load_experiment("world_precip", _overrides(world_store, backbone, steps=2, validate_every=2,
                                                     checkpoint_every=2, rollout_steps=2, precip_eps=1e-2))
    assert train(cfg, run, progress=False)["final_step"] == 2
    steps = [r for r in _records(run) if "loss" in r and r.get("kind") != "validation"]
    assert all(len(r["loss_per_step"]) == 2 for r in steps)
    for r in steps:  # default weights 1/k: the loss is the mean of the per-lead losses
        assert r["loss"] == pytest.approx(np.mean(r["loss_per_step"]), rel=1e-5)
    (val,) = [r for r in _records(run) if r.get("kind") == "validation"]
    assert val["lead_hours"] == [6, 12] and len(val["val_loss_per_step"]) == 2
    assert val["val_loss"] == pytest.approx(np.mean(val["val_loss_per_step"]), rel=1e-5)
    assert len(val["rmse"]["tp"]) == len(val["acc"]["tp"]) == 2
    assert all(0 < v < 0.05 for v in val["rmse"]["tp"])  # metres


def test_store_without_tp_is_a_clear_error(world_store, backbone, tmp_path):
    from fcn_jax.data.prepare import prepare

    nc = sorted(str(p) for p in (Path(world_store).parent / "netcdf").glob("*.nc"))
    dry = prepare(nc, tmp_path / "dry.zarr", channels=list(WORLD), doy_climatology=False, progress=False)
    cfg = load_experiment("world_precip", _overrides(world_store, backbone) + [f"data.store={dry}"])
    with pytest.raises(DataError, match=r"dry\.zarr: precipitation training .* needs the target channel 'tp'"
                                        r".*--channels u10,v10,.*,z250,tp"):
        train(cfg, tmp_path / "run", progress=False)


# ------------------------------------------------------------------ training
def test_precip_loss_decreases_on_a_fixed_batch(world_store, backbone, data_mesh):
    import optax

    from fcn_jax.checkpoints import package as model_ckpt
    from fcn_jax.model.afnonet import build_model
    from fcn_jax.training.data_feed import open_feed
    from fcn_jax.training.step import init_train_state, make_train_step

    cfg = load_experiment("world_precip", _overrides(world_store, backbone))
    with jax.set_mesh(data_mesh):
        feed = open_feed(cfg, data_mesh)
        batch = feed.next_train()
        feed.close()
        frozen = model_ckpt.load_model(backbone, mesh=data_mesh)
        tx = optax.adam(1e-2)
        graphdef, state = init_train_state(build_model(cfg.model, seed=0), tx)
        step = make_train_step(graphdef, tx, mode="precip", frozen=frozen, norm=feed.norm)
        losses = []
        for _ in range(25):
            state, m = step(state, batch)
            losses.append(float(m["loss"]))
    # Seed 0's final ReLU starts almost dead (PyTorch's conv init, as the original):
    # the loss sits near 1 (a zero prediction) for a few steps, then falls.
    assert np.isfinite(losses).all()
    assert losses[-1] < 0.75 * losses[0], losses


@pytest.mark.slow
def test_precip_training_through_the_loop_and_the_cli(world_store, backbone, tmp_path):
    run = tmp_path / "run"
    cfg = load_experiment("world_precip", _overrides(world_store, backbone))
    summary = train(cfg, run, progress=False)
    assert summary["final_step"] == 6
    assert all(np.isfinite(v) for v in logged_losses(run).values())
    meta = json.loads((run / "model_best" / "model.json").read_text())
    assert meta["kind"] == "precip" and meta["model"]["out_channels"] == 1
    # the package: the backbone's input statistics, eps and tp's statistics (the forecast's bound)
    assert meta["out_channels"] == ["tp"] and meta["precip"]["eps"] == cfg.train.precip_eps
    assert meta["precip"]["tp_std"] > 0 and len(meta["normalization"]["mean"]) == len(cfg.data.channels)
    val = [r for r in _records(run) if r.get("kind") == "validation"]
    assert [r["step"] for r in val] == [3, 6]
    assert list(val[0]["rmse"]) == ["tp"] and val[0]["lead_hours"] == [6]
    rmse, acc = val[-1]["rmse"]["tp"][0], val[-1]["acc"]["tp"][0]
    assert 0 < rmse < 0.05 and -1 <= acc <= 1  # metres; ACC against the time mean of tp

    # the same through the entry point, every value from --set
    cli = tmp_path / "cli"
    proc = subprocess.run(
        [sys.executable, "-m", "fcn_jax.train", "world_precip", "--workdir", str(cli), "--no-progress",
         *sum((["--set", o] for o in _overrides(world_store, backbone, steps=3, validate_every=3)), [])],
        capture_output=True, text=True, timeout=600, cwd=REPO,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert sorted(logged_losses(cli)) == [1, 2, 3]
    # the same seed and data order: the first steps repeat the in-process run
    for s in (1, 2, 3):
        assert logged_losses(cli)[s] == pytest.approx(logged_losses(run)[s], rel=1e-5), s
    assert json.loads((cli / "model_final" / "model.json").read_text())["kind"] == "precip"


@pytest.mark.slow
def test_precip_two_processes_match_one(world_store, backbone, tmp_path):
    from tests.multiproc import run_one_and_two_processes

    ov = _overrides(world_store, backbone, steps=4, validate_every=4, checkpoint_every=4)

    def cmd(workdir, *extra):
        return [sys.executable, "-m", "fcn_jax.train", "world_precip", "--workdir", str(workdir), "--no-progress",
                *sum((["--set", o] for o in ov), []), *extra]

    run_one_and_two_processes(cmd, tmp_path / "one", tmp_path / "two")
    a, b = logged_losses(tmp_path / "one"), logged_losses(tmp_path / "two")
    assert sorted(a) == sorted(b) == [1, 2, 3, 4]
    for step in a:
        assert b[step] == pytest.approx(a[step], rel=1e-5), step
    va = [r for r in _records(tmp_path / "one") if r.get("kind") == "validation"][0]
    vb = [r for r in _records(tmp_path / "two") if r.get("kind") == "validation"][0]
    assert vb["rmse"]["tp"][0] == pytest.approx(va["rmse"]["tp"][0], rel=1e-4)
    assert (tmp_path / "two" / "model_final" / "model.json").is_file()
