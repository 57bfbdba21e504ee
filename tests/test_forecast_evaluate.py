"""Rollouts, ensembles, forecast files, the forecast and evaluate CLIs, scores against known answers."""

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scoringrules as sr
import xarray as xr
from flax import nnx
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from fcn_jax import evaluate, forecast
from fcn_jax.checkpoints import package as model_ckpt
from fcn_jax.config import ModelConfig
from fcn_jax.data import synthetic as S
from fcn_jax.data.store import StoreInfo
from fcn_jax.inference.files import ForecastError, ForecastWriter, forecast_to_dataset, read_forecast, write_forecast
from fcn_jax.inference.rollout import ensemble_chunk, ensemble_rollout, perturb, rollout
from fcn_jax.model.afnonet import shard_model
from fcn_jax.normalize import Normalizer
from fcn_jax.parallel.mesh import make_mesh
from fcn_jax.training.losses import rollout as train_rollout
from tests.helpers import random_model

CFG = ModelConfig(img_size=(16, 32), patch_size=(4, 4), in_channels=3, out_channels=3, embed_dim=16, depth=1,
                  num_blocks=2)
CHANNELS = ["z500", "t850", "t2m"]
MEAN = np.array([5.4e4, 275.0, 278.0], np.float32)
STD = np.array([3.3e3, 15.0, 21.0], np.float32)
LAT, LON = S.grid(16, 32, poles=False)


def _tiny_model(cfg=CFG):
    return random_model(cfg, scale=0.1)


@pytest.fixture(scope="module")
def model():
    return _tiny_model()


@pytest.fixture(scope="module")
def x0():
    return jax.random.normal(jax.random.key(1), (2, 16, 32, 3), jnp.float32)


@pytest.fixture(scope="module")
def store(synthetic_store):
    """16 x 32 grid, z500/t850/t2m + tp, 24 six-hourly times from 2001-01-01 (analytic values)."""
    times = S.six_hourly("2001-01-01T00", 24)
    return synthetic_store(times, CHANNELS + ["tp"], (16, 32), noise=0.3, doy_climatology=False), times


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory, model, store):
    """A model package: the store's statistics, grid and climatology, as training exports it."""
    path = tmp_path_factory.mktemp("m") / "model"
    package, clim = model_ckpt.package_from_store(store[0], CHANNELS)
    model_ckpt.save_model(path, model, package=package, climatology=clim)
    return str(path)


# --------------------------------------------------------------------------- #
# the one rollout
# --------------------------------------------------------------------------- #


def test_rollout_equals_python_loop_and_the_training_rollout(model, x0):
    out = rollout(model, x0, 4)
    assert out.shape == (2, 5, 16, 32, 3)  # [batch, lead, lat, lon, channel]
    ref = [x0]
    for _ in range(4):
        ref.append(model(ref[-1]))
    np.testing.assert_allclose(np.asarray(out), np.stack(ref, axis=1), rtol=1e-6, atol=1e-6)
    np.testing.assert_array_equal(np.asarray(out[:, 0]), np.asarray(x0))
    # training's k-step rollout (the loss's states, no IC) against the same independent Python loop
    np.testing.assert_allclose(np.asarray(train_rollout(model, x0, 4)), np.stack(ref[1:], axis=1), rtol=1e-6,
                               atol=1e-6)


def test_rollout_under_mesh_equals_python_loop_under_mesh(model, x0, devices):
    """The jitted scan on a (2,1,1,2) mesh against ``x = model(x)`` stepped by hand on the same sharded model."""
    mesh = make_mesh((2, 1, 1, 2))
    with jax.set_mesh(mesh):
        sharded_model = shard_model(nnx.clone(model), mesh)
        xs = jax.device_put(x0, NamedSharding(mesh, P("data", "height", "width", None)))
        out = rollout(sharded_model, xs, 4)
        ref = [xs]
        for _ in range(4):
            ref.append(sharded_model(ref[-1]))
    assert len(out.sharding.device_set) == 4 and len(ref[-1].sharding.device_set) == 4
    np.testing.assert_allclose(np.asarray(out), np.stack(ref, axis=1), rtol=1e-5, atol=1e-5)
    # and the sharded forecast is the single-device one
    np.testing.assert_allclose(np.asarray(out), np.asarray(rollout(model, x0, 4)), rtol=1e-5, atol=1e-5)


def test_ensemble_statistics_and_chunking(model, x0):
    members, n_level = 6, 0.3
    key = jax.random.key(7)
    ens = ensemble_rollout(model, x0, 2, members, n_level, key)
    assert ens.shape == (2, 3, members, 16, 32, 3)  # [batch, lead, member, ...]
    noise = np.asarray(ens[:, 0]) - np.asarray(x0)[:, None]
    assert abs(noise.std() - n_level) < 0.02 * n_level and abs(noise.mean()) < 0.02
    np.testing.assert_allclose(np.asarray(ens[:, 0]), np.asarray(perturb(x0, n_level, key, members)), atol=1e-6)
    # chunking does not change members; member m is a plain rollout of its perturbed IC
    chunked = ensemble_rollout(model, x0, 2, members, n_level, key, member_chunk=4)
    np.testing.assert_allclose(np.asarray(chunked), np.asarray(ens), rtol=1e-5, atol=1e-5)
    one = rollout(model, perturb(x0, n_level, key, [3])[:, 0], 2)
    np.testing.assert_allclose(np.asarray(ens[:, :, 3]), np.asarray(one), rtol=1e-5, atol=1e-5)
    mean = ensemble_rollout(model, x0, 2, members, n_level, key, member_chunk=4, reduce="mean")
    np.testing.assert_allclose(np.asarray(mean), np.asarray(ens).mean(axis=2), rtol=1e-5, atol=1e-5)


def test_ensemble_sharded_over_8_devices_equals_unsharded(model, x0, data_mesh):
    key = jax.random.key(3)
    split = nnx.split(model)
    ref = np.asarray(ensemble_chunk(split, x0[:1], 0.3, key, np.arange(8), 2))
    with jax.set_mesh(data_mesh):
        m = shard_model(nnx.clone(model), data_mesh)
        out = ensemble_chunk(nnx.split(m), x0[:1], 0.3, key, np.arange(8), 2)
    assert len(out.sharding.device_set) == 8
    np.testing.assert_allclose(np.asarray(out), ref, rtol=1e-5, atol=1e-5)


def test_normalizer_round_trip():
    n = Normalizer(MEAN, STD)
    x = np.random.default_rng(0).normal(size=(2, 4, 3)).astype(np.float32) * STD + MEAN
    np.testing.assert_allclose(n.denormalize(n.normalize(x)), x, rtol=1e-6)
    np.testing.assert_allclose(np.asarray(n.normalize(jnp.asarray(x))), n.normalize(x), rtol=1e-6)
    with pytest.raises(ValueError, match="std must be"):
        Normalizer(MEAN, np.zeros(3))


# --------------------------------------------------------------------------- #
# forecast files
# --------------------------------------------------------------------------- #


@pytest.mark.parametrize("suffix", [".nc", ".zarr"])
def test_writer_incremental_and_read_back(tmp_path, suffix):
    init = np.array(["2018-01-01T00", "2018-01-10T00"], dtype="datetime64[ns]")
    data = np.random.default_rng(0).normal(size=(2, 4, 3, 16, 32, 3)).astype(np.float32)
    path = tmp_path / f"fc{suffix}"
    with ForecastWriter(path, init_times=init, n_lead=4, step_hours=6, lat=LAT, lon=LON, channels=CHANNELS,
                        members=3) as w:
        for i in range(2):
            for m in range(3):
                w.write(data[i:i + 1, :, m:m + 1], i, member_start=m)
    assert sorted(os.listdir(tmp_path)) == [f"fc{suffix}"]  # nothing temporary left
    ds = read_forecast(path)
    assert ds["z500"].dims == ("init_time", "lead_time", "member", "lat", "lon")
    assert list((ds.lead_time.values / np.timedelta64(1, "h")).astype(int)) == [0, 6, 12, 18]
    assert ds.valid_time.values[1, 2] == init[1] + np.timedelta64(12, "h")
    assert ds["t2m"].attrs["units"] == "K" and ds.lat.attrs["units"] == "degrees_north"
    assert ds.attrs["Conventions"] == "CF-1.8"
    np.testing.assert_array_equal(ds["t850"].values, data[..., 1])


def test_writer_error_leaves_nothing(tmp_path):
    with pytest.raises(RuntimeError, match="boom"):
        with ForecastWriter(tmp_path / "fc.nc", init_times=["2018-01-01"], n_lead=2, step_hours=6, lat=LAT,
                            lon=LON, channels=CHANNELS):
            raise RuntimeError("boom")
    assert os.listdir(tmp_path) == []
    with pytest.raises(ForecastError, match=r"\.nc .*or \.zarr"):
        ForecastWriter(tmp_path / "fc.h5", init_times=["2018-01-01"], n_lead=2, step_hours=6, lat=LAT, lon=LON,
                       channels=CHANNELS)


def test_forecast_to_dataset_and_derived_valid_time(model, x0, tmp_path):
    fc = rollout(model, x0, 2)
    init = np.array(["2018-01-01T00", "2018-01-10T00"], dtype="datetime64[ns]")
    ds = forecast_to_dataset(fc, init_times=init, lat=LAT, lon=LON, channels=CHANNELS, mean=MEAN, std=STD)
    np.testing.assert_allclose(ds["t850"].values, np.asarray(fc)[..., 1] * STD[1] + MEAN[1], rtol=1e-6)
    # a file made elsewhere: no valid_time, dims in another order
    other = ds.drop_vars("valid_time").transpose("lat", "lon", "lead_time", "init_time")
    other.to_netcdf(tmp_path / "other.nc")
    back = read_forecast(tmp_path / "other.nc")
    assert back["z500"].dims == ("init_time", "lead_time", "lat", "lon")
    assert back.valid_time.values[1, 1] == init[1] + np.timedelta64(6, "h")


# --------------------------------------------------------------------------- #
# forecast CLI
# --------------------------------------------------------------------------- #


def test_forecast_cli_deterministic_and_ensemble(store, model_dir, model, tmp_path, capsys):
    path, times = store
    out = tmp_path / "det.nc"
    rc = forecast.main([model_dir, "--store", path, "--init", f"{times[0]}/{times[4]}/12h", "--steps", "3",
                        "--out", str(out)])
    assert rc == 0, capsys.readouterr().err
    ds = read_forecast(out)
    assert ds.sizes == {"init_time": 3, "lead_time": 4, "lat": 16, "lon": 32}
    norm = StoreInfo.read(path).normalizer(CHANNELS)
    x0 = norm.normalize(np.asarray(xr.open_zarr(path)["fields"].sel(channel=CHANNELS).isel(time=[0, 2, 4]).transpose(
        "time", "lat", "lon", "channel").values))
    ref = norm.denormalize(np.asarray(rollout(model, x0, 3)))
    got = np.stack([ds[c].values for c in CHANNELS], -1)
    np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-4 * np.abs(ref).max())

    out_e = tmp_path / "ens.zarr"
    rc = forecast.main([model_dir, "--store", path, "--init", f"{times[1]}", "--steps", "2", "--members", "5",
                        "--member-chunk", "2", "--seed", "4", "--out", str(out_e)])
    assert rc == 0, capsys.readouterr().err
    e = read_forecast(out_e)
    assert e["t2m"].dims == ("init_time", "lead_time", "member", "lat", "lon") and e.sizes["member"] == 5
    x1 = norm.normalize(np.asarray(xr.open_zarr(path)["fields"].sel(channel=CHANNELS).isel(time=[1]).transpose(
        "time", "lat", "lon", "channel").values))
    ref = ensemble_rollout(model, x1, 2, 5, 0.3, jax.random.fold_in(jax.random.key(4), 0))
    got = norm.normalize(np.stack([e[c].values for c in CHANNELS], -1))
    np.testing.assert_allclose(got, np.asarray(ref), rtol=1e-4, atol=1e-4)


def test_forecast_cli_precipitation(store, model_dir, model, tmp_path, capsys):
    """tp = eps * expm1(clip(PrecipNet(state), 0, log1p(tp_max / eps))) at every lead >= 1; lead 0 the store's tp."""
    from fcn_jax.normalize import precip_to_metres

    path, times = store
    pcfg = ModelConfig(img_size=(16, 32), patch_size=(4, 4), in_channels=3, out_channels=1, embed_dim=16, depth=1,
                       num_blocks=2, kind="precip")
    pnet = _tiny_model(pcfg)
    pdir = tmp_path / "precip"
    model_ckpt.save_model(pdir, pnet)
    out = tmp_path / "p.nc"
    rc = forecast.main([model_dir, "--precip", str(pdir), "--store", path, "--init", f"{times[2]}", "--steps", "2",
                        "--out", str(out)])
    assert rc == 0, capsys.readouterr().err
    ds = read_forecast(out)
    assert ds["tp"].attrs["units"] == "m"
    st = xr.open_zarr(path)
    np.testing.assert_allclose(ds["tp"].values[0, 0], st["fields"].sel(channel="tp").isel(time=2).values, rtol=1e-6)
    norm = StoreInfo.read(path).normalizer(CHANNELS)
    x = norm.normalize(np.asarray(st["fields"].sel(channel=CHANNELS).isel(time=[2]).transpose(
        "time", "lat", "lon", "channel").values))
    traj = rollout(model, x, 2)
    m, s = StoreInfo.read(path).normalizer(["tp"]).as_tuple()
    y_max = np.log1p((m[0] + 10 * s[0]) / 1e-5)
    ref = np.stack([precip_to_metres(np.asarray(pnet(traj[:, k]))[..., 0], 1e-5, y_max) for k in (1, 2)], 1)
    np.testing.assert_allclose(ds["tp"].values[:, 1:], ref, rtol=1e-4, atol=1e-9)
    assert np.all(ds["tp"].values[:, 1:] <= 1e-5 * np.expm1(y_max) * (1 + 1e-6))


@pytest.mark.slow
def test_forecast_on_two_processes_equals_one(store, model_dir, tmp_path):
    """jax.distributed: an ensemble with tp over 2 processes x 4 CPU devices = 1 process x 8, one file
    (in two lead segments: the second continues the first's global arrays on both processes)."""
    import subprocess
    import sys

    from tests.multiproc import run_one_and_two_processes

    path, times = store
    pcfg = ModelConfig(img_size=(16, 32), patch_size=(4, 4), in_channels=3, out_channels=1, embed_dim=16, depth=1,
                       num_blocks=2, kind="precip")
    pdir = tmp_path / "precip"
    model_ckpt.save_model(pdir, _tiny_model(pcfg))

    def cmd(workdir, *extra):
        os.makedirs(workdir, exist_ok=True)
        # 8 members in chunks of 8 shard over the 8 devices of either layout: 4 on each process's devices
        return [sys.executable, "-m", "fcn_jax.forecast", model_dir, "--store", path, "--precip", str(pdir),
                "--init", f"{times[1]},{times[5]}", "--steps", "3", "--members", "8", "--seed", "2",
                "--lead-chunk", "2", "--out", str(workdir / "ens.nc"), *extra]  # 2 lead segments

    run_one_and_two_processes(cmd, tmp_path / "one", tmp_path / "two")
    one, two = read_forecast(tmp_path / "one" / "ens.nc"), read_forecast(tmp_path / "two" / "ens.nc")
    assert one.sizes == two.sizes == {"init_time": 2, "lead_time": 4, "member": 8, "lat": 16, "lon": 32}
    # the second really ran as one job over both processes' devices
    assert (one.attrs["processes"], two.attrs["processes"]) == (1, 2)
    assert one.attrs["mesh"] == two.attrs["mesh"] == "data=8,channel=1,height=1,width=1"
    for c in [*CHANNELS, "tp"]:
        np.testing.assert_allclose(two[c].values, one[c].values, rtol=1e-5, atol=1e-5 * np.abs(one[c].values).max(),
                                   err_msg=c)
    # one writer: nothing else in the directory (no second file, no temporary left behind)
    assert sorted(p.name for p in (tmp_path / "two").iterdir()) == ["ens.nc"]
    usage = subprocess.run([sys.executable, "-m", "fcn_jax.forecast", "--help"], capture_output=True, text=True)
    assert usage.returncode == 0 and "--coordinator" in usage.stdout and "--cpu-devices" in usage.stdout


def test_forecast_from_a_converted_original_checkpoint(store, model, tmp_path, capsys):
    """Original-format .ckpt -> python -m fcn_jax.convert -> python -m fcn_jax.forecast: shapes and values."""
    import textwrap

    from fcn_jax import convert

    path, times = store
    ckpt = tmp_path / "backbone.ckpt"
    convert.save_torch_checkpoint(model, ckpt)
    exp = tmp_path / "tiny.yaml"
    exp.write_text(textwrap.dedent(f"""\
        base: afno_backbone
        name: tiny
        model: {{img_size: [16, 32], patch_size: [4, 4], in_channels: 3, out_channels: 3, embed_dim: 16, depth: 1,
                 num_blocks: 2}}
        data: {{channels: [{", ".join(CHANNELS)}]}}
        """))
    assert convert.main([str(ckpt), "--experiment", str(exp), "--out", str(tmp_path / "conv")]) == 0
    out = tmp_path / "c.nc"
    # the experiment is a file, not a name: its channels cannot be looked up -> a clear error, then --channels
    assert forecast.main([str(tmp_path / "conv"), "--store", path, "--init", str(times[0]), "--steps", "2",
                          "--out", str(out)]) == 2
    assert "pass --channels" in capsys.readouterr().err and not out.exists()
    assert forecast.main([str(tmp_path / "conv"), "--store", path, "--init", str(times[0]), "--steps", "2",
                          "--channels", ",".join(CHANNELS), "--out", str(out)]) == 0
    ds = read_forecast(out)
    assert ds.sizes == {"init_time": 1, "lead_time": 3, "lat": 16, "lon": 32} and list(ds.data_vars) == CHANNELS
    norm = StoreInfo.read(path).normalizer(CHANNELS)
    x0 = norm.normalize(np.asarray(xr.open_zarr(path)["fields"].sel(channel=CHANNELS).isel(time=[0]).transpose(
        "time", "lat", "lon", "channel").values))
    ref = norm.denormalize(np.asarray(rollout(model, x0, 2)))
    np.testing.assert_allclose(np.stack([ds[c].values for c in CHANNELS], -1), ref, rtol=1e-5,
                               atol=1e-4 * np.abs(ref).max())


@pytest.mark.parametrize("case,pattern", [
    ("time", r"initial time 2002-01-01T00:00:00 is not in store .*: it has 24 times 2001-01-01T00:00:00 \.\. "
             r"2001-01-06T18:00:00 every 6 h"),
    ("channels", r"channels \['q700'\] not in the store"),
    ("count", r"maps 3 -> 3 channels but its channel list has 2"),
    ("grid", r"grid lat x lon = \(16, 32\) but the model .* img_size \(8, 16\)"),
    ("ic_grid", r"ic\.nc: grid 8 x 16 \(lat .*\) does not fit the model .*'s grid 16 x 32 .*--regrid"),
    ("lead_chunk", r"--lead-chunk must be >= 0 \(0 = all steps at once\), got -2"),
    ("damaged", r"MODEL_DIR .*model package .* is damaged: params/.*contents damaged"),
])
def test_forecast_bad_input_is_a_clear_error_and_leaves_nothing(case, pattern, store, model_dir, tmp_path, capsys):
    path, times = store
    args = [model_dir, "--store", path, "--init", str(times[0]), "--steps", "2", "--out", str(tmp_path / "f.nc")]
    if case == "time":
        args[4] = "2002-01-01T00"
    elif case == "channels":
        args += ["--channels", "z500,t850,q700"]
    elif case == "count":
        args += ["--channels", "z500,t850"]
    elif case == "grid":
        small = tmp_path / "small"
        model_ckpt.save_model(small, _tiny_model(ModelConfig(img_size=(8, 16), patch_size=(4, 4), in_channels=3,
                                                             out_channels=3, embed_dim=16, depth=1, num_blocks=2)),
                              extra={"channels": CHANNELS})
        args[0] = str(small)
    elif case == "ic_grid":
        lat8, lon16 = S.grid(8, 16, poles=False)
        xr.Dataset({c: (("time", "lat", "lon"), np.zeros((1, 8, 16), np.float32)) for c in CHANNELS},
                   coords={"time": times[:1], "lat": lat8, "lon": lon16}).to_netcdf(tmp_path / "ic.nc")
        args += ["--ic-file", str(tmp_path / "ic.nc")]
    elif case == "lead_chunk":
        args += ["--lead-chunk", "-2"]
    elif case == "damaged":  # the package is verified once, before anything is loaded
        import shutil

        shutil.copytree(model_dir, tmp_path / "dmg")
        blob = max((p for p in (tmp_path / "dmg" / "params").rglob("*") if p.is_file()), key=lambda p: p.stat().st_size)
        data = bytearray(blob.read_bytes())
        data[len(data) // 2] ^= 0xFF
        blob.write_bytes(bytes(data))
        args[0] = str(tmp_path / "dmg")
    assert forecast.main(args) == 2
    assert __import__("re").search(pattern, capsys.readouterr().err)
    assert not [p for p in os.listdir(tmp_path) if p.startswith("f.nc") or p.startswith(".f.nc")]


# --------------------------------------------------------------------------- #
# evaluate: exactly known answers, references, bad input
# --------------------------------------------------------------------------- #


def _truth_fields(path, idx):
    """Store fields ``[n, lat, lon, channel]`` at time indices ``idx``."""
    ds = xr.open_zarr(path)
    return np.asarray(ds["fields"].sel(channel=CHANNELS).isel(time=np.asarray(idx)).transpose(
        "time", "lat", "lon", "channel").values, np.float64)


def _file_from(path, times, fields, out, init_idx, n_lead):
    """A forecast file: ``fields(i, l) [..., lat, lon, ch]`` for each init ``init_idx`` and lead l."""
    f = np.stack([np.stack([fields(i, l) for l in range(n_lead)]) for i in init_idx])
    init = np.asarray(times)[list(init_idx)]
    return write_forecast(out, f.astype(np.float32), init_times=init, lat=LAT, lon=LON, channels=CHANNELS)


def test_evaluate_known_answers(store, tmp_path):
    path, times = store
    c = np.array([30.0, 0.5, -1.5])
    init_idx, n_lead = [0, 3, 6], 4
    det = _file_from(path, times, lambda i, l: _truth_fields(path, [i + l])[0] + c, tmp_path / "off.nc",
                     init_idx, n_lead)
    s = evaluate.evaluate_forecast(det, path, tmp_path / "det", plots=False)
    assert s.rmse.dims == ("system", "channel", "lead_time")
    assert list(s.system.values) == ["model", "persistence", "climatology"]
    m = s.sel({"system": "model"})
    np.testing.assert_allclose(m.rmse.values, np.abs(c)[:, None] * np.ones(n_lead), rtol=1e-4)
    np.testing.assert_allclose(m.bias.values, c[:, None] * np.ones(n_lead), rtol=1e-4)
    np.testing.assert_allclose(m.mae.values, np.abs(c)[:, None] * np.ones(n_lead), rtol=1e-4)
    pers = s.sel({"system": "persistence"})
    np.testing.assert_allclose(pers.rmse.isel(lead_time=0), 0.0, atol=1e-6)
    np.testing.assert_allclose(pers.acc.isel(lead_time=0), 1.0, atol=1e-6)
    assert "crps" not in s
    assert (tmp_path / "det" / "scores.nc").is_file() and (tmp_path / "det" / "scores.csv").is_file()

    # two members truth + c +- d: ensemble mean truth + c, fair CRPS |c| - d, spread sqrt(2) d
    d = np.abs(c) / 3
    ens = _file_from(path, times, lambda i, l: _truth_fields(path, [i + l])[0][None] + c
                     + np.stack([d, -d])[:, None, None, :], tmp_path / "ens.nc", init_idx, n_lead)
    s = evaluate.evaluate_forecast(ens, path, tmp_path / "ens", plots=False)
    m = s.sel({"system": "model"})
    np.testing.assert_allclose(m.rmse.values, np.abs(c)[:, None] * np.ones(n_lead), rtol=1e-4)
    np.testing.assert_allclose(m.crps.values, (np.abs(c) - d)[:, None] * np.ones(n_lead), rtol=1e-4)
    np.testing.assert_allclose(m.spread.values, np.sqrt(2) * d[:, None] * np.ones(n_lead), rtol=1e-4)
    np.testing.assert_allclose(m.spread_skill.values, np.sqrt(2) / 3, rtol=1e-4)
    np.testing.assert_allclose(s.crps.sel({"system": "persistence"}), s.mae.sel({"system": "persistence"}))


@pytest.mark.parametrize("convention", ["fcn", "wb2"])
def test_evaluate_matches_xarray_and_scoringrules(store, tmp_path, convention):
    path, times = store
    rng = np.random.default_rng(5)
    init_idx, n_lead, M = [0, 2, 5], 3, 4
    noise = rng.normal(size=(len(init_idx), n_lead, M, 16, 32, 3)) * np.array([200.0, 2.0, 3.0])
    fc_path = _file_from(path, times, lambda i, l: _truth_fields(path, [i + l])[0][None]
                         + noise[init_idx.index(i), l], tmp_path / "e.nc", init_idx, n_lead)
    s = evaluate.evaluate_forecast(fc_path, path, None, convention=convention)
    # one IC, lead and channel at a time (bounded memory), or channels in uneven groups (2 + 1): the same scores
    for chunk in (1, 2 * 16 * 32 * 4 * M):
        xr.testing.assert_allclose(evaluate.evaluate_forecast(fc_path, path, None, convention=convention,
                                                              max_chunk_bytes=chunk), s, rtol=1e-5)
    fc = xr.open_dataset(fc_path)
    st = xr.open_zarr(path)
    w = np.cos(np.deg2rad(LAT))
    if convention == "wb2":
        w = evaluate.metrics.lat_weights(LAT, scheme="wb2")
    wx = xr.DataArray(w, dims="lat", coords={"lat": fc.lat.values})
    for k, ch in enumerate(CHANNELS):
        f = fc[ch].astype("float64")
        truth = st["fields"].sel(channel=ch).isel(time=xr.DataArray(
            np.asarray(init_idx)[:, None] + np.arange(n_lead), dims=("init_time", "lead_time"))).drop_vars("time")
        truth = truth.assign_coords(lat=fc.lat.values, lon=fc.lon.values).astype("float64")
        mse = ((f.mean("member") - truth) ** 2).weighted(wx).mean(("lat", "lon"))
        rmse = np.sqrt(mse).mean("init_time") if convention == "fcn" else np.sqrt(mse.mean("init_time"))
        np.testing.assert_allclose(s.rmse.sel({"system": "model", "channel": ch}), rmse, rtol=2e-4)
        crps = sr.crps_ensemble(truth.values, f.transpose("init_time", "lead_time", "lat", "lon", "member").values,
                                estimator="fair", backend="numpy")
        crps = xr.DataArray(crps, dims=truth.dims, coords=truth.coords).weighted(wx).mean(("lat", "lon"))
        np.testing.assert_allclose(s.crps.sel({"system": "model", "channel": ch}), crps.mean("init_time"), rtol=2e-4)
        var = f.var("member", ddof=1).weighted(wx).mean(("lat", "lon")).mean("init_time")
        np.testing.assert_allclose(s.spread.sel({"system": "model", "channel": ch}), np.sqrt(var), rtol=2e-4)
        bias = (f.mean("member") - truth).weighted(wx).mean(("lat", "lon")).mean("init_time")
        np.testing.assert_allclose(s.bias.sel({"system": "model", "channel": ch}), bias, rtol=2e-3,
                                   atol=1e-4 * float(np.abs(noise[..., k]).mean()))


@pytest.mark.parametrize("case,pattern", [
    ("lead", r"valid time of lead 18 h from init 2001-01-06T06:00:00 \(past the end of the data\?\): 2001-01-07T00:00:00 is not in"),
    ("grid", r"store .*s\.zarr: grid 16 x 32 .* does not fit the forecast .*f\.nc's grid 8 x 16"),
    ("channel", r"s\.zarr: channels \['q700'\] are not in the store"),
])
def test_evaluate_bad_input(case, pattern, store, tmp_path):
    path, times = store
    if case == "lead":
        fcp = _file_from(path, times, lambda i, l: _truth_fields(path, [min(i + l, 23)])[0], tmp_path / "f.nc",
                         [0, 21], 4)
    elif case == "grid":
        lat8, lon16 = S.grid(8, 16, poles=False)
        fcp = write_forecast(tmp_path / "f.nc", np.zeros((1, 2, 8, 16, 3), np.float32), init_times=times[:1],
                             lat=lat8, lon=lon16, channels=CHANNELS)
    else:
        fcp = write_forecast(tmp_path / "f.nc", np.zeros((1, 2, 16, 32, 1), np.float32), init_times=times[:1],
                             lat=LAT, lon=LON, channels=["q700"])
    with pytest.raises(ForecastError, match=pattern):
        evaluate.evaluate_forecast(fcp, path, tmp_path / "out")
    assert not (tmp_path / "out").exists()
    assert evaluate.main([str(fcp), "--truth", path, "--out", str(tmp_path / "out")]) == 2


def test_evaluate_cli_table_plots(store, tmp_path, capsys):
    path, times = store
    rng = np.random.default_rng(1)
    fcp = _file_from(path, times, lambda i, l: _truth_fields(path, [i + l])[0][None]
                     + rng.normal(size=(3, 16, 32, 3)) * [100.0, 1.0, 1.0], tmp_path / "e.nc", [0, 4], 5)
    assert evaluate.main([str(fcp), "--truth", path, "--out", str(tmp_path / "o")]) == 0
    text = capsys.readouterr().out
    for word in ("RMSE", "ACC", "CRPS", "spread/skill", "persistence", "climatology", "z500", "1 d"):
        assert word in text
    files = sorted(os.listdir(tmp_path / "o"))
    assert files == ["map_z500.png", "rank_histogram.nc", "rank_histogram.png", "scores.csv", "scores.nc",
                     "scores_vs_lead.png", "spread_skill.png"]
    head = (tmp_path / "o" / "scores.csv").read_text().splitlines()[0]
    assert head.startswith("system,channel,lead_time_hours") and "crps" in head and "spread_skill" in head
    rh = xr.open_dataset(tmp_path / "o" / "rank_histogram.nc")
    assert int(rh.rank_histogram.isel(lead_time=1, channel=0).sum()) == 2 * 16 * 32


def test_initial_condition_starts_like_the_original():
    starts = evaluate.initial_condition_starts(1336, 41, 36)
    assert len(starts) == 36 and starts[0] == 0 and starts[-1] == 1260


# --------------------------------------------------------------------------- #
# cyclone tracks
# --------------------------------------------------------------------------- #


def _moving_low(n_lead, lat, lon, start=(45.0, 300.0), speed=(0.5, 4.0), depth=2000.0, sigma_km=800.0):
    """``[lead, lat, lon]`` surface pressure with a Gaussian low moving ``speed`` deg/step (lat, lon)."""
    from fcn_jax.track import great_circle_km

    out = []
    for t in range(n_lead):
        c = (start[0] + speed[0] * t, (start[1] + speed[1] * t) % 360)
        d = great_circle_km(np.asarray(lat)[:, None], np.asarray(lon)[None, :], *c)
        out.append(1.0e5 - depth * np.exp(-0.5 * (d / sigma_km) ** 2))
    return np.stack(out)


def test_tracker_follows_a_moving_low_in_every_member(tmp_path):
    from fcn_jax import track

    lat, lon = S.grid(32, 64, poles=False)
    n_lead = 9
    speeds = [(0.5, 4.0), (0.0, 5.0), (1.0, 3.0)]
    sp = np.stack([_moving_low(n_lead, lat, lon, speed=s) for s in speeds], axis=1)  # [lead, member, lat, lon]
    path = write_forecast(tmp_path / "f.nc", sp[None, ..., None].astype(np.float32),
                          init_times=["2003-01-01T00"], lat=lat, lon=lon, channels=["sp"])
    tr = track.track_forecast(path, (46.0, 302.0), radius_km=900)
    for m, (vlat, vlon) in enumerate(speeds):
        true_lat = 45.0 + vlat * np.arange(n_lead)
        true_lon = (300.0 + vlon * np.arange(n_lead)) % 360
        err = track.great_circle_km(tr.track_lat.values[m], tr.track_lon.values[m], true_lat, true_lon)
        assert np.all(err < 120), (m, err)  # sub-grid refined: well under the ~5.6 deg (~600 km) grid spacing
    assert "truth_lat" not in tr
    # a radius smaller than the grid spacing finds nothing: lost, NaN
    lost = track.track_forecast(path, (46.0, 302.0), radius_km=50)
    assert np.isnan(lost.track_lat.values).all()
    with pytest.raises(ForecastError, match=r"no pressure variable to track"):
        track.track_forecast(path, (46.0, 302.0), variable="msl")


def test_track_cli_with_truth_from_the_store(synthetic_store, tmp_path, capsys):
    """Forecast = the store's own sp: every member's track is the truth's, error 0."""
    from fcn_jax import track

    lat, lon = LAT, LON
    times = S.six_hourly("2001-01-01T00", 8)
    store = synthetic_store(times, ["sp", "t2m"], (16, 32), noise=0.3, doy_climatology=False)
    x = np.asarray(xr.open_zarr(store)["fields"].sel(channel="sp").values)  # [time, lat, lon]
    f = np.stack([x[1:6], x[1:6]], axis=1)[None, ..., None]  # init times[1], 5 leads, 2 identical members
    path = write_forecast(tmp_path / "fc" / "f.nc", f, init_times=times[1:2], lat=lat, lon=lon, channels=["sp"],
                          attrs={"store": str(store)})
    start = track.find_low(x[1], lat, lon, lat_band=(-90, 90), smooth_anomaly=False)
    lat0, lon0 = start
    assert track.main([str(path), f"--start={lat0},{lon0}", "--radius-km", "1500"]) == 0
    text = capsys.readouterr().out
    assert "mean member error" in text
    out = sorted(os.listdir(tmp_path / "fc"))
    assert out == ["f.nc", "tracks.csv", "tracks.nc", "tracks.png"]
    tr = xr.open_dataset(tmp_path / "fc" / "tracks.nc")
    np.testing.assert_allclose(tr.track_error_km.values, 0.0, atol=1e-6)
    np.testing.assert_allclose(tr.track_lat.values[0], tr.truth_lat.values)
    rows = (tmp_path / "fc" / "tracks.csv").read_text().splitlines()
    assert rows[0] == "init_time,member,lead_time_hours,lat,lon,pressure" and len(rows) == 1 + 3 * 5
    assert track.main([str(path), "--start", "95,10"]) == 2
    assert "latitude must be within" in capsys.readouterr().err


def test_evaluate_scores_other_systems_in_the_same_call(store, tmp_path):
    """--also NAME=FILE: another forecast as one more system, against the same truth and normalisation."""
    path, times = store
    rng = np.random.default_rng(7)
    init_idx, n_lead = [0, 3], 3
    a = _file_from(path, times, lambda i, l: _truth_fields(path, [i + l])[0]
                   + rng.normal(size=(16, 32, 3)) * np.array([100.0, 1.0, 1.0]), tmp_path / "a.nc", init_idx, n_lead)
    b = _file_from(path, times, lambda i, l: _truth_fields(path, [i + l])[0]
                   + rng.normal(size=(16, 32, 3)) * np.array([300.0, 3.0, 3.0]), tmp_path / "b.nc", init_idx, n_lead)
    both = evaluate.evaluate_forecast(a, path, None, also={"other": b})
    assert list(both.system.values) == ["model", "other", "persistence", "climatology"]
    alone = evaluate.evaluate_forecast(b, path, None)
    for v in ("rmse", "acc", "bias"):
        np.testing.assert_allclose(both[v].sel(system="other"), alone[v].sel(system="model"), rtol=1e-5)
        np.testing.assert_allclose(both[v].sel(system="persistence"), alone[v].sel(system="persistence"), rtol=1e-5)
    assert np.all(both.rmse.sel(system="other") > both.rmse.sel(system="model"))
    short = _file_from(path, times, lambda i, l: _truth_fields(path, [i + l])[0], tmp_path / "c.nc", [0], n_lead)
    with pytest.raises(ForecastError, match="init_time"):
        evaluate.evaluate_forecast(a, path, None, also={"short": short})
    with pytest.raises(ForecastError, match="is taken"):
        evaluate.evaluate_forecast(a, path, None, also={"persistence": b})
