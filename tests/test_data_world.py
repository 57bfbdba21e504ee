"""Embedded world: splits, CLI, persistence metric; a tiny real run (slow)."""

import time
from pathlib import Path

import numpy as np
import pytest
import xarray as xr

from fcn_jax.data import synthetic as S
from fcn_jax.data.catalog import world_store
from fcn_jax.data.channels import WORLD, get_channel
from fcn_jax.data.prepare import prepare
from fcn_jax.data.world import DEFAULT_DAYS, WORLD_STORE_CHANNELS, WorldSpec, persistence_skill, world_splits
from fcn_jax.prepare import main


def test_splits():
    assert world_splits(DEFAULT_DAYS)["train"][0] == 2000
    assert world_splits(1461) == {"train": [2000, 2001], "valid": [2002], "test": [2003]}
    assert world_splits(400) == {"train": [2000], "valid": [2001], "test": [2001]}
    assert world_splits(10) == {"train": [2000], "valid": [2000], "test": [2000]}


@pytest.mark.parametrize("cmd", ["prepare", "world"])
def test_cli_help(cmd, capsys):
    import importlib

    with pytest.raises(SystemExit) as e:
        importlib.import_module(f"fcn_jax.{cmd}").main(["--help"])
    assert e.value.code == 0
    assert "usage: python -m fcn_jax." + cmd in capsys.readouterr().out


def test_cli_info(tmp_path, capsys):
    lat, lon = S.grid(4, 8)
    files = S.write_cds(tmp_path / "src", S.six_hourly("2000-01-01", 8), ["z500"], lat, lon)
    assert main([*files, "--out", str(tmp_path / "s.zarr"), "--channels", "z500", "--quiet", "--no-doy-clim"]) == 0
    capsys.readouterr()
    assert main(["--info", str(tmp_path / "s.zarr")]) == 0
    assert "z500" in capsys.readouterr().out
    assert main(["--info", str(tmp_path / "none.zarr")]) == 2


def test_cli_prepare_and_error_exit(tmp_path, capsys):
    lat, lon = S.grid(4, 8)
    files = S.write_cds(tmp_path / "src", S.six_hourly("2000-01-01", 8), ["z500", "u10"], lat, lon)
    assert main([*files, "--out", str(tmp_path / "s.zarr"), "--channels", "u10,z500", "--quiet",
                 "--no-doy-clim"]) == 0
    assert list(xr.open_zarr(tmp_path / "s.zarr")["channel"].values) == ["u10", "z500"]
    assert main([*files, "--out", str(tmp_path / "t.zarr"), "--channels", "t850", "--quiet"]) == 2
    assert "error: channel t850" in capsys.readouterr().err


def test_cli_dry_run_prints_the_plan(tmp_path, capsys):
    lat, lon = S.grid(4, 8)
    files = S.write_cds(tmp_path / "src", S.six_hourly("2000-01-01", 8), ["z500"], lat, lon)
    assert main([*files, "--out", str(tmp_path / "s.zarr"), "--channels", "z500", "--dry-run",
                 "--climatology", "doy-hour"]) == 0
    out = capsys.readouterr().out
    assert "plan for" in out and "clim_doy_hour [366, 4, 1, 4, 8]" in out and "estimated time" in out
    assert not (tmp_path / "s.zarr").exists()


def test_no_import_cycle_world_generates_only():
    import subprocess
    import sys

    code = ("import sys, fcn_jax.data.world, fcn_jax.data.store; "
            "m = sys.modules; assert 'fcn_jax.data.catalog' not in m and 'fcn_jax.data.prepare' not in m; "
            "import fcn_jax.data.world as w; assert not hasattr(w, 'prepare') and not hasattr(w, 'open_store')")
    subprocess.run([sys.executable, "-c", code], check=True)


def test_persistence_skill_metric(tmp_path):
    # white noise in time: persistence error = sqrt(2) x climatology error at every lead
    lat, lon = S.grid(4, 8)
    times = S.six_hourly("2000-01-01", 400)
    x = np.random.default_rng(0).normal(size=(400, 1, 4, 8)).astype(np.float32) + 280
    files = S.write_cds(tmp_path / "src", times, ["t850"], lat, lon, values=x)
    out = prepare(files, tmp_path / "s.zarr", channels=["t850"], doy_climatology=False, progress=False)
    r = persistence_skill(out, max_lead=3)
    np.testing.assert_allclose(r["persistence"], np.sqrt(2), rtol=0.08)
    np.testing.assert_array_equal(r["lead_hours"], [6, 12, 18])


@pytest.mark.slow
def test_tiny_world_end_to_end(tmp_path):
    """Real dinosaur run (short): CDS-style files, store contents, cache, determinism."""
    spec = WorldSpec(seed=3, days=3, spinup_days=30)
    store = world_store(tmp_path / "w", spec=spec, progress=False)
    nc = sorted((tmp_path / "w" / "netcdf").glob("*.nc"))
    assert [p.name for p in nc] == ["world_2000_pressure_levels.nc", "world_2000_single_levels.nc"]
    pl = xr.open_dataset(nc[0])
    assert set(pl.dims) == {"valid_time", "pressure_level", "latitude", "longitude"}
    assert "number" in pl.coords and "expver" in pl.coords
    assert pl["z"].attrs["units"] == "m**2 s**-2"
    pl.close()
    ds = xr.open_zarr(store)
    # the 16 model channels, then the precipitation proxy (the target of precip training)
    assert list(ds["channel"].values) == list(WORLD_STORE_CHANNELS) == [*WORLD, "tp"]
    assert list(ds["channel_units"].values) == [get_channel(c).units for c in WORLD_STORE_CHANNELS]
    assert ds.sizes["lat"] == 32 and ds.sizes["lon"] == 64 and ds.sizes["time"] == 12
    assert ds["lat"].values[0] > 87 and ds["lat"].values[-1] < -87  # north -> south, no poles
    x = ds["fields"].values
    assert np.isfinite(x).all()
    z500 = ds["fields"].sel(channel="z500").values
    assert 4.0e4 < z500.mean() < 6.0e4 and z500.std() > 100  # geopotential, m^2 s^-2
    assert 9.0e4 < ds["fields"].sel(channel="sp").values.mean() < 1.1e5  # Pa
    assert (np.abs(ds["fields"].sel(channel="u250").values).max()) > 5  # winds develop within 30 days
    assert ds["fields"].sel(channel="t850").values.std(axis=0).max() > 0.01  # it evolves in time
    tp = ds["fields"].sel(channel="tp").values
    assert tp.min() >= 0 and tp.max() > 0  # metres per 6 h; zero where the low levels diverge
    # cached: the second call is instant and leaves the files alone
    mtime = nc[0].stat().st_mtime
    t = time.perf_counter()
    assert world_store(tmp_path / "w", spec=spec, progress=False) == store
    assert time.perf_counter() - t < 2.0 and nc[0].stat().st_mtime == mtime
    # deterministic: regenerate elsewhere, identical values
    nc2 = world_store(tmp_path / "w2", spec=spec, prepare_store=False, progress=False)
    pl2 = xr.open_dataset(nc2 / "world_2000_pressure_levels.nc")
    pl1 = xr.open_dataset(nc[0])
    np.testing.assert_array_equal(pl1["z"].values, pl2["z"].values)
    pl1.close()
    pl2.close()


def test_twin_forecast_of_the_world_by_its_own_core(world_store, tmp_path, capsys):
    """The world's dynamical core from its own (slightly perturbed) state: near-perfect at first, then diverging."""
    from fcn_jax import evaluate
    from fcn_jax import world as world_cli
    from fcn_jax.inference.files import read_forecast

    out = tmp_path / "twin.nc"
    init = "2000-01-20T00,2000-01-26T06"
    args = ["--twin", str(out), "--init", init, "--steps", "8", "--store", world_store, "--quiet"]
    assert world_cli.main(args) == 0
    fc = read_forecast(out)
    assert fc.sizes["init_time"] == 2 and fc.sizes["lead_time"] == 9 and "z500" in fc.data_vars
    scores = evaluate.evaluate_forecast(out, world_store, None, convention="fcn")
    rm = scores["rmse"].sel(system="model", channel="t850").values  # K, by lead
    pers = scores["rmse"].sel(system="persistence", channel="t850").values
    # the 0.1 K grid-point noise, smoothed by the regridding and hyperdiffusion: small at every lead and not zero
    # (the twin is not the stored truth replayed); this young test world (10 days of spin-up) barely moves, so
    # persistence is good too, and the twin beats it from 12 h on
    assert np.all(rm < 0.2) and np.all(rm > 1e-3)
    assert np.all(rm[2:] < pers[2:])
    assert world_cli.main(args) == 2  # no silent overwrite
    assert "exists; pass --overwrite" in capsys.readouterr().err


def test_twin_refuses_a_world_it_cannot_reproduce(world_store):
    import json

    from fcn_jax.data.errors import DataError
    from fcn_jax.data.world import WorldSpec, twin_forecasts

    spec_d = json.loads((Path(world_store).parent / "world.json").read_text())["spec"]
    spec = WorldSpec(**{k: tuple(v) if isinstance(v, list) else v for k, v in spec_d.items()})
    wrong = lambda k: np.ones((32, 64, 1), np.float32)  # noqa: E731 - not this world
    with pytest.raises(DataError, match="is not the stored world"):
        next(twin_forecasts(spec, np.asarray(["2000-01-20T00"], "datetime64[ns]"), 2, ["z500"], truth=wrong,
                            progress=False))
    with pytest.raises(DataError, match="perturbation must be >= 0 K"):
        next(twin_forecasts(spec, np.asarray(["2000-01-20T00"], "datetime64[ns]"), 2, ["z500"], perturbation_k=-1,
                            progress=False))
    with pytest.raises(DataError, match="6-hourly output times"):
        next(twin_forecasts(spec, np.asarray(["1999-01-20T00"], "datetime64[ns]"), 2, ["z500"], progress=False))
