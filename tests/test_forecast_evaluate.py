"""Rollouts, ensembles, forecast NetCDF output, baseline scoring, tables and plots."""

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import xarray as xr
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P

from fcn_jax import evaluate
from fcn_jax.config import ModelConfig
from fcn_jax.forecast import ensemble_rollout, forecast_to_dataset, perturb, rollout, write_forecast_netcdf
from fcn_jax.model.afnonet import AFNONet, shard_model
from fcn_jax.parallel.mesh import make_mesh

CFG = ModelConfig(img_size=(16, 32), patch_size=(4, 4), in_channels=3, out_channels=3, embed_dim=16, depth=1,
                  num_blocks=2)
CHANNELS = ["z500", "t850", "t2m"]
MEAN = np.array([5.4e4, 275.0, 278.0], np.float32)
STD = np.array([3.3e3, 15.0, 21.0], np.float32)
LAT = np.linspace(90.0, -90.0 + 180.0 / 16, 16)  # north first, FCN-like (pole row, no south pole)
LON = np.arange(32) * 360.0 / 32


@pytest.fixture(scope="module")
def model():
    """A tiny AFNONet with seeded random parameters.

    ``AFNONet(CFG, seed=0)`` initialises eagerly, op by op, and costs 6-10 s of
    compilation on a shared 2-core CPU; building the module abstractly and
    filling its parameters from NumPy takes 0.3 s. Any parameters do for
    checking the rollout machinery.
    """
    graphdef, state = nnx.split(nnx.eval_shape(lambda: AFNONet(CFG, seed=0)))
    rng = np.random.default_rng(0)
    state = jax.tree.map(lambda a: jnp.asarray(0.1 * rng.standard_normal(a.shape), jnp.float32), state)
    return nnx.merge(graphdef, state)


@pytest.fixture(scope="module")
def x0():
    return jax.random.normal(jax.random.key(1), (2, 16, 32, 3), jnp.float32)


# --------------------------------------------------------------------------- #
# rollout and ensembles
# --------------------------------------------------------------------------- #


def test_rollout_equals_python_loop(model, x0):
    out = rollout(model, x0, 4)
    assert out.shape == (5, 2, 16, 32, 3)
    ref = [x0]
    for _ in range(4):
        ref.append(model(ref[-1]))
    np.testing.assert_allclose(np.asarray(out), np.stack(ref), rtol=1e-6, atol=1e-6)
    np.testing.assert_array_equal(np.asarray(out[0]), np.asarray(x0))  # entry 0 is the IC


def test_rollout_under_mesh_equals_single_device(model, x0, devices):
    ref = np.asarray(rollout(model, x0, 2))
    mesh = make_mesh((2, 1, 1, 2))  # 2 AFNO blocks: channel*height*width must divide 2
    with jax.set_mesh(mesh):
        sharded_model = shard_model(nnx.clone(model), mesh)  # a copy: the fixture stays unsharded
        xs = jax.device_put(x0, NamedSharding(mesh, P("data", "height", "width", None)))
        out = rollout(sharded_model, xs, 2)
    assert len(out.sharding.device_set) == 4
    np.testing.assert_allclose(np.asarray(out), ref, rtol=1e-5, atol=1e-5)


def test_ensemble_perturbation_statistics(model, x0):
    members, n_level = 6, 0.3
    key = jax.random.key(7)
    ens = ensemble_rollout(model, x0, 2, members, n_level, key)
    assert ens.shape == (3, members, 2, 16, 32, 3)
    noise = np.asarray(ens[0]) - np.asarray(x0)[None]
    assert abs(noise.std() - n_level) < 0.02 * n_level and abs(noise.mean()) < 0.02
    # noise on every channel, fresh per member
    assert np.all(noise.reshape(members, -1, 3).std(axis=1) > 0.25)
    assert np.abs(np.asarray(ens[:, 0]) - np.asarray(ens[:, 1])).min(axis=(1, 2, 3, 4)).max() > 0
    # deterministic with the key, independent of chunking; the mean matches reduce="mean"
    again = ensemble_rollout(model, x0, 2, members, n_level, key, member_chunk=3)
    np.testing.assert_allclose(np.asarray(again), np.asarray(ens), rtol=1e-6, atol=1e-6)
    mean = ensemble_rollout(model, x0, 2, members, n_level, key, member_chunk=3, reduce="mean")
    np.testing.assert_allclose(np.asarray(mean), np.asarray(ens).mean(axis=1), atol=1e-5)
    other = perturb(x0, n_level, jax.random.key(8), members)
    assert not np.allclose(np.asarray(other), np.asarray(ens[0]))
    # each member is an ordinary rollout of its perturbed IC
    np.testing.assert_allclose(np.asarray(ens[:, 3]), np.asarray(rollout(model, ens[0, 3], 2)), rtol=1e-5, atol=1e-5)


# --------------------------------------------------------------------------- #
# NetCDF
# --------------------------------------------------------------------------- #


def test_forecast_netcdf(model, x0, tmp_path):
    fc = rollout(model, x0, 3)  # [lead, init, lat, lon, ch]
    init = np.array(["2018-01-01T00", "2018-01-10T00"], dtype="datetime64[ns]")
    path = write_forecast_netcdf(tmp_path / "fc.nc", fc, init_times=init, lat=LAT, lon=LON, channels=CHANNELS,
                                 mean=MEAN, std=STD)
    assert sorted(os.listdir(tmp_path)) == ["fc.nc"]  # no temporary file left behind
    with xr.open_dataset(path) as ds:
        assert ds["z500"].dims == ("init_time", "lead_time", "lat", "lon")
        assert ds.lead_time.dtype.kind == "m"
        assert list(ds.lead_time.values.astype("timedelta64[h]").astype(int)) == [0, 6, 12, 18]
        assert ds["z500"].attrs["units"] == "m**2 s**-2" and ds["t2m"].attrs["units"] == "K"
        assert ds.lat.attrs["units"] == "degrees_north"
        np.testing.assert_allclose(ds["t850"].values, np.asarray(fc)[..., 1].swapaxes(0, 1) * STD[1] + MEAN[1],
                                   rtol=1e-6)
        assert ds.valid_time.values[1, 2] == init[1] + np.timedelta64(12, "h")

    ens = ensemble_rollout(model, x0, 1, 3, 0.3, jax.random.key(0))
    ds = forecast_to_dataset(ens, init_times=init, lat=LAT, lon=LON, channels=CHANNELS, mean=MEAN, std=STD)
    assert ds["t2m"].dims == ("init_time", "lead_time", "member", "lat", "lon")
    assert ds.sizes["member"] == 3


# --------------------------------------------------------------------------- #
# scoring
# --------------------------------------------------------------------------- #


def _cyclic_truth(n_ic=4, n_lead=4, seed=0):
    """truth[i, l] = state[(i + l) % n_ic]: every lead sees the same set of states."""
    rng = np.random.default_rng(seed)
    states = rng.normal(size=(n_ic, 16, 32, 3)).astype(np.float32)
    return np.stack([np.stack([states[(i + l) % n_ic] for l in range(n_lead)]) for i in range(n_ic)])


def _climatology(truth):
    return (truth[:, 0].mean(axis=0) * STD + MEAN).astype(np.float32)  # physical time mean


def test_baselines_and_perfect_forecast():
    truth = _cyclic_truth()
    scores = evaluate.score_forecasts(truth, truth, MEAN, STD, _climatology(truth), LAT, channels=CHANNELS)
    assert scores.rmse.dims == ("method", "lead_time_h", "channel")
    assert list(scores.method.values) == ["model", "persistence", "climatology"]
    assert list(scores.lead_time_h.values) == [0, 6, 12, 18]
    pers, clim, mod = (scores.sel({"method": m}) for m in ("persistence", "climatology", "model"))
    np.testing.assert_allclose(pers.rmse.sel(lead_time_h=0), 0.0, atol=1e-6)
    np.testing.assert_allclose(pers.acc.sel(lead_time_h=0), 1.0, atol=1e-6)
    assert np.all(pers.rmse.sel(lead_time_h=6) > 0)
    for v in ("rmse", "rmse_wb2", "acc"):
        np.testing.assert_allclose(clim[v].values, np.broadcast_to(clim[v].values[:1], (4, 3)), rtol=1e-5, atol=1e-7)
    assert np.all(clim.acc == 0)
    np.testing.assert_allclose(mod.rmse, 0.0, atol=1e-6)
    np.testing.assert_allclose(mod.acc, 1.0, atol=1e-6)


def test_rmse_in_physical_units():
    truth = _cyclic_truth()
    scores = evaluate.score_forecasts(truth, truth + 0.1, MEAN, STD, _climatology(truth), LAT,
                                      channels=CHANNELS, weights="cos")
    np.testing.assert_allclose(scores.rmse.sel({"method": "model"}), np.broadcast_to(0.1 * STD, (4, 3)), rtol=1e-4)
    np.testing.assert_allclose(scores.rmse_wb2.sel({"method": "model"}), np.broadcast_to(0.1 * STD, (4, 3)), rtol=1e-4)
    assert list(scores.units.values) == ["m**2 s**-2", "K", "K"]


def test_initial_condition_starts_like_the_original():
    starts = evaluate.initial_condition_starts(1336, 41, 36)  # z500 in 2018
    assert len(starts) == 36 and starts[0] == 0 and starts[-1] == 1260


def test_model_scores_table_plots_and_files(model, tmp_path):
    rng = np.random.default_rng(3)
    series = rng.normal(size=(12, 16, 32, 3)).astype(np.float32)
    starts = evaluate.initial_condition_starts(len(series), 4, 3)
    truth = evaluate.truth_trajectories(series, starts, 4)  # [n_ic, 4, lat, lon, ch]
    fc = evaluate.forecast_trajectories(model, truth[:, 0], 3, batch_size=2)
    assert fc.shape == truth.shape
    np.testing.assert_allclose(fc[:, 0], truth[:, 0])
    scores = evaluate.score_forecasts(truth, fc, MEAN, STD, series.mean(0) * STD + MEAN, LAT, channels=CHANNELS,
                                      step_hours=24, ic_chunk=2)
    assert scores.attrs["n_ic"] == len(starts)

    table = evaluate.format_table(scores, leads_h=(24, 48, 72))
    for word in ("model", "persistence", "climatology", "RMSE", "ACC", "z500", "1 d", "3 d"):
        assert word in table
    assert len(table.splitlines()) == 3 + 3 * 3 + 1  # header, 3 channels x 3 leads, footnote

    png = evaluate.plot_scores(scores, tmp_path / "scores.png")
    maps = evaluate.plot_forecast_vs_truth(fc[0] * STD + MEAN, truth[0] * STD + MEAN, LAT, LON, "z500", 2,
                                           tmp_path / "map.png", channels=CHANNELS, step_hours=24)
    for p in (png, maps):
        assert p.stat().st_size > 1000 and p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    csv, nc = evaluate.write_scores(scores, tmp_path / "scores")
    with xr.open_dataset(nc) as back:
        np.testing.assert_allclose(back.rmse.values, scores.rmse.values)
    head = csv.read_text().splitlines()[0]
    assert head.startswith("method,lead_time_h,channel") and "rmse" in head and "acc" in head
    assert not [f for f in os.listdir(tmp_path) if f.endswith(".tmp")]
