"""Model packages: convert --stats with the release's files, forecasts from an analysis with no store."""

import json
import textwrap

import h5py
import jax.numpy as jnp
import numpy as np
import pytest
import xarray as xr

from fcn_jax import checkpoint as checkpoint_cli
from fcn_jax import convert, forecast
from fcn_jax.checkpoints import package as checkpoint
from fcn_jax.config import ModelConfig
from fcn_jax.data.channels import FCN_20, FCN_HDF5_LAYOUT
from fcn_jax.data.errors import DataError
from fcn_jax.inference.files import read_forecast
from fcn_jax.inference.rollout import rollout
from tests.helpers import random_model, write_grib

H, W = 16, 32  # the model grid: the first 16 rows of a 17-row pole-to-pole grid (as 720 of 721)
CFG = ModelConfig(img_size=(H, W), patch_size=(4, 4), in_channels=20, out_channels=20, embed_dim=16, depth=1,
                  num_blocks=2)
N_TIME = 12
rng = np.random.default_rng(0)
# release-style statistics of the 21-entry layout, not those of the year file below (other years)
MEANS = np.array([0.5, -0.3, 278, 96500, 101200, 275, 0.2, 0.1, 800, 1.0, 0.2, 14000, 6.0, -0.1, 55000, 252,
                  200000, 48, 70, 18, 290], np.float64)
STDS = np.array([5.5, 4.7, 21, 9500, 1100, 15, 6.0, 5.1, 1000, 8.0, 6.3, 1300, 11.5, 9.0, 3300, 13, 3000, 32, 27,
                 16, 10], np.float64)


def _tiny_model(cfg=CFG):
    return random_model(cfg, scale=0.05, seed=1)


@pytest.fixture(scope="module")
def release(tmp_path_factory):
    """An original-layout year file ``2018.h5`` (17 x 32, 21 channels), release-style stats, a backbone.ckpt."""
    d = tmp_path_factory.mktemp("release")
    lat = np.linspace(90, -90, H + 1)
    fields = (MEANS[None, :, None, None] + STDS[None, :, None, None] * 0.8
              * np.sin(np.deg2rad(lat))[None, None, :, None]
              * np.cos(np.deg2rad(np.arange(W) * 360 / W) + 0.3 * np.arange(N_TIME)[:, None, None, None])
              + 0.1 * STDS[None, :, None, None] * rng.standard_normal((N_TIME, 21, H + 1, W))).astype(np.float32)
    (d / "data").mkdir()
    with h5py.File(d / "data" / "2018.h5", "w") as f:
        f.create_dataset("fields", data=fields)
    stats = d / "stats"
    (stats / "precip").mkdir(parents=True)
    np.save(stats / "global_means.npy", MEANS.reshape(1, 21, 1, 1).astype(np.float32))
    np.save(stats / "global_stds.npy", STDS.reshape(1, 21, 1, 1).astype(np.float32))
    tm = (fields.mean(axis=0, keepdims=True) + 0.01 * STDS[None, :, None, None]).astype(np.float32)
    np.save(stats / "time_means.npy", tm)
    np.save(stats / "precip" / "time_means.npy", np.full((1, 1, H + 1, W), 4e-4, np.float32))
    model = _tiny_model()
    convert.save_torch_checkpoint(model, d / "backbone.ckpt")
    exp = d / "tiny.yaml"
    exp.write_text(textwrap.dedent(f"""\
        base: afno_backbone
        name: tiny_release
        model: {{img_size: [{H}, {W}], patch_size: [4, 4], embed_dim: 16, depth: 1, num_blocks: 2}}
        """))
    return {"dir": d, "fields": fields, "stats": stats, "model": model, "exp": exp, "tm": tm}


@pytest.fixture(scope="module")
def converted(release):
    out = release["dir"] / "model"
    rc = convert.main([str(release["dir"] / "backbone.ckpt"), "--experiment", str(release["exp"]),
                       "--stats", str(release["stats"]), "--out", str(out)])
    assert rc == 0
    return out


def test_convert_with_release_stats_makes_a_self_contained_package(release, converted, capsys):
    pkg = checkpoint.read_package(converted)
    assert pkg.channels == FCN_20 and pkg.out_channels == FCN_20 and pkg.kind == "backbone"
    # the experiment's channels picked from the 21-entry arrays by the original's index list
    idx = [FCN_HDF5_LAYOUT.index(c) for c in FCN_20]
    np.testing.assert_array_equal(pkg.mean, MEANS[idx].astype(np.float32))
    np.testing.assert_array_equal(pkg.std, STDS[idx].astype(np.float32))
    # the original's grid: the first 16 rows of the 17-row pole-to-pole one
    np.testing.assert_allclose(pkg.lat, np.linspace(90, -90, H + 1)[:H])
    np.testing.assert_allclose(pkg.lon, np.arange(W) * 360 / W)
    clim = pkg.climatology()
    np.testing.assert_array_equal(clim["time_mean"].values, release["tm"][0, idx, :H])
    assert list(clim["channel"].values) == list(FCN_20)
    prov = pkg.provenance
    assert prov["source_checkpoint"].endswith("backbone.ckpt") and set(prov["stats_files"]) == {
        "global_means.npy", "global_stds.npy", "time_means.npy"}
    assert prov["stats_channel_index"] == idx and pkg.time_step_hours == 6.0
    # integrity covers the climatology: damage is refused
    assert checkpoint_cli.main(["show", str(converted)]) == 0
    shown = capsys.readouterr().out
    assert "z500 55000+-3300" in shown and "time_mean" in shown


def test_convert_precip_takes_the_precip_climatology(release, tmp_path):
    from fcn_jax.convert import save_torch_checkpoint

    pcfg = ModelConfig(img_size=(H, W), patch_size=(4, 4), in_channels=20, out_channels=1, embed_dim=16, depth=1,
                       num_blocks=2, kind="precip")
    save_torch_checkpoint(_tiny_model(pcfg), tmp_path / "precip.ckpt")
    out = tmp_path / "pmodel"
    assert convert.main([str(tmp_path / "precip.ckpt"), "--experiment", str(release["exp"]), "--kind", "precip",
                         "--stats", str(release["stats"]), "--out", str(out)]) == 0
    pkg = checkpoint.read_package(out)
    assert pkg.kind == "precip" and pkg.out_channels == ("tp",) and pkg.precip == {"eps": 1e-5}
    assert pkg.channels == FCN_20 and pkg.has_stats
    np.testing.assert_allclose(pkg.climatology()["time_mean"].sel(channel="tp").values, 4e-4)


@pytest.mark.parametrize("case,pattern", [
    ("means_shape", r"global_means\.npy: shape \(21,\), expected \(1, N, 1, 1\)"),
    ("count", r"global_means\.npy: shape \(1, 7, 1, 1\) does not hold the experiment's channels"),
    ("time_means", r"time_means\.npy: shape \(1, 21, 17, 30\), expected \(1, 21, 17 or 16, 32\)"),
    ("missing", r"global_stds\.npy: not found"),
])
def test_convert_stats_errors_name_the_file_and_both_shapes(case, pattern, release, tmp_path, capsys):
    stats = tmp_path / "stats"
    stats.mkdir()
    for n in ("global_means", "global_stds", "time_means"):
        np.save(stats / f"{n}.npy", np.load(release["stats"] / f"{n}.npy"))
    if case == "means_shape":
        np.save(stats / "global_means.npy", MEANS.astype(np.float32))
    elif case == "count":
        np.save(stats / "global_means.npy", np.zeros((1, 7, 1, 1), np.float32))
        np.save(stats / "global_stds.npy", np.ones((1, 7, 1, 1), np.float32))
    elif case == "time_means":
        np.save(stats / "time_means.npy", np.zeros((1, 21, 17, 30), np.float32))
    elif case == "missing":
        (stats / "global_stds.npy").unlink()
    out = tmp_path / "m"
    rc = convert.main([str(release["dir"] / "backbone.ckpt"), "--experiment", str(release["exp"]),
                       "--stats", str(stats), "--out", str(out)])
    assert rc == 2 and not out.exists()
    assert __import__("re").search(pattern, capsys.readouterr().err)


def _reference(release, ic_index, steps):
    """The original's inference in NumPy terms: rows 0..15, z-score with the release stats, roll out, de-normalise."""
    idx = [FCN_HDF5_LAYOUT.index(c) for c in FCN_20]
    m, s = MEANS[idx].astype(np.float32), STDS[idx].astype(np.float32)
    x = release["fields"][ic_index][:, idx, :H].transpose(0, 2, 3, 1)  # [n, lat, lon, channel]
    traj = np.asarray(rollout(release["model"], jnp.asarray((x - m) / s), steps))
    return traj * s + m


def test_forecast_from_a_year_file_needs_no_store(release, converted, tmp_path):
    out = tmp_path / "f.nc"
    rc = forecast.main([str(converted), "--ic-file", str(release["dir"] / "data" / "2018.h5"),
                        "--init", "2018-01-01T06,2018-01-02T00", "--steps", "3", "--out", str(out)])
    assert rc == 0
    ds = read_forecast(out)
    assert ds.sizes == {"init_time": 2, "lead_time": 4, "lat": H, "lon": W} and list(ds.data_vars) == list(FCN_20)
    np.testing.assert_allclose(ds["lat"].values, np.linspace(90, -90, H + 1)[:H])
    assert "first 16 of 17 latitude rows" in ds.attrs["grid"] and "model package" in ds.attrs["normalization"]
    got = np.stack([ds[c].values for c in FCN_20], -1)
    ref = _reference(release, [1, 4], 3)
    np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-5 * STDS.max())
    np.testing.assert_array_equal(got[:, 0], ref[:, 0])  # lead 0 is the analysis itself


def test_forecast_regrids_only_when_asked(release, converted, tmp_path, capsys):
    """A netCDF analysis on a coarser grid: refused naming both grids; --regrid interpolates bilinearly."""
    lat, lon = np.linspace(90, -90, 9), np.arange(16) * 22.5
    src = release["fields"][:2, :20, ::2, ::2]  # exact subsample of the 17 x 32 grid
    ds = xr.Dataset({c: (("time", "lat", "lon"), src[:, i]) for i, c in enumerate(FCN_20)},
                    coords={"time": np.datetime64("2018-01-01T00", "ns") + np.arange(2) * np.timedelta64(6, "h"),
                            "lat": lat, "lon": lon})
    ds.to_netcdf(tmp_path / "coarse.nc")
    out = tmp_path / "r.nc"
    args = [str(converted), "--ic-file", str(tmp_path / "coarse.nc"), "--init", "2018-01-01T06", "--steps", "1",
            "--out", str(out)]
    assert forecast.main(args) == 2
    err = capsys.readouterr().err
    assert "coarse.nc: grid 9 x 16 (lat 90 .. -90, lon 0 .. 337.5) does not fit" in err and "--regrid" in err
    assert not out.exists()
    assert forecast.main(args + ["--regrid"]) == 0
    fc = read_forecast(out)
    assert "bilinear" in fc.attrs["grid"]
    # rows on the coarse grid's latitudes (every other one) and its longitudes are reproduced exactly
    z = fc["z500"].isel(init_time=0, lead_time=0).values
    np.testing.assert_allclose(z[::2, ::2], src[1, FCN_20.index("z500"), :8], rtol=1e-6)
    # halfway in longitude (periodic: 348.75 deg lies between 337.5 and 360 = 0)
    k = FCN_20.index("z500")
    np.testing.assert_allclose(z[0, -1], 0.5 * (src[1, k, 0, -1] + src[1, k, 0, 0]), rtol=1e-6)


def test_a_model_without_statistics_needs_a_store(release, tmp_path, capsys):
    bare = tmp_path / "bare"
    assert convert.main([str(release["dir"] / "backbone.ckpt"), "--experiment", "afno_backbone",
                         "--set", f"model.img_size=[{H},{W}]", "--set", "model.patch_size=[4,4]",
                         "--set", "model.embed_dim=16", "--set", "model.depth=1", "--set", "model.num_blocks=2",
                         "--out", str(bare)]) == 0
    assert "carries no normalisation statistics" in capsys.readouterr().err
    assert not checkpoint.read_package(bare).has_stats
    out = tmp_path / "f.nc"
    rc = forecast.main([str(bare), "--ic-file", str(release["dir"] / "data" / "2018.h5"), "--init", "2018-01-01T00",
                        "--steps", "1", "--out", str(out)])
    assert rc == 2 and "carries no normalisation statistics" in capsys.readouterr().err and not out.exists()


def test_no_source_and_missing_time_are_clear_errors(release, converted, tmp_path, capsys):
    out = tmp_path / "f.nc"
    assert forecast.main([str(converted), "--init", "2018-01-01T00", "--steps", "1", "--out", str(out)]) == 2
    assert "give --ic-file SOURCE" in capsys.readouterr().err
    assert forecast.main([str(converted), "--ic-file", str(release["dir"] / "data" / "2018.h5"),
                          "--init", "2018-02-01T00", "--steps", "1", "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "initial time 2018-02-01T00:00:00 is not in" in err and "2018.h5" in err and "12 times" in err
    assert not out.exists()


def test_analysis_fits_721_rows_to_720_and_reports_missing_times(release):
    from fcn_jax.data.analysis import fit_grid, open_analysis

    lat = np.linspace(90, -90, H + 1)
    an = open_analysis(str(release["dir"] / "data" / "2018.h5"), ["z500", "t2m"], lat=lat[:H],
                       lon=np.arange(W) * 360 / W)
    x = an.read(np.array(["2018-01-01T12", "2018-01-01T00"], "datetime64[ns]"))
    assert x.shape == (2, H, W, 2)
    np.testing.assert_array_equal(x[0, ..., 0], release["fields"][2, FCN_HDF5_LAYOUT.index("z500"), :H])
    np.testing.assert_array_equal(x[1, ..., 1], release["fields"][0, FCN_HDF5_LAYOUT.index("t2m"), :H])
    with pytest.raises(DataError, match="grid 17 x 32 .* does not fit"):
        fit_grid(lat, np.arange(W) * 360 / W, lat[1:], np.arange(W) * 360 / W)
    with pytest.raises(DataError, match=r"time 2019-01-01T00:00:00 is not in .*12 times"):
        an.read(np.array(["2019-01-01T00"], "datetime64[ns]"))
    assert json.dumps(an.grid_note)


# --------------------------------------------------------------------------- #
# The README walkthrough "Forecasting with the published FourCastNet", at a reduced size
# --------------------------------------------------------------------------- #

_GRIB_SFC = {"u10": "10u", "v10": "10v", "t2m": "2t", "sp": "sp", "msl": "msl", "tcwv": "tcwv"}


def _write_era5_grib(d, fields_t, t):
    """An ERA5-like analysis as the CDS delivers it: a pressure-level and a single-level GRIB file (16-bit)."""
    pytest.importorskip("eccodes")
    t = np.datetime64(t, "h")
    date, hour = int(str(t.astype("datetime64[D]")).replace("-", "")), int(str(t)[-2:])
    step = 180.0 / H
    grid = dict(gridType="regular_ll", Ni=W, Nj=H + 1, latitudeOfFirstGridPointInDegrees=90.0,
                latitudeOfLastGridPointInDegrees=-90.0, longitudeOfFirstGridPointInDegrees=0.0,
                longitudeOfLastGridPointInDegrees=360.0 - step, iDirectionIncrementInDegrees=step,
                jDirectionIncrementInDegrees=step, dataDate=date, dataTime=hour * 100)

    def write(path, msgs):
        return write_grib(path, [(sample, {**grid, **keys}, values) for sample, keys, values in msgs])

    pl, sfc = [], []
    for i, c in enumerate(FCN_HDF5_LAYOUT):
        if c is None:
            continue
        if c in _GRIB_SFC:
            sfc.append(("regular_ll_sfc_grib1", {"shortName": _GRIB_SFC[c]}, fields_t[i]))
        else:
            pl.append(("regular_ll_pl_grib1", {"shortName": c[0], "typeOfLevel": "isobaricInhPa",
                                               "level": int(c[1:])}, fields_t[i]))
    return write(d / "era5_pl.grib", pl), write(d / "era5_sfc.grib", sfc)


def test_walkthrough_published_weights_from_a_grib_analysis(release, converted, tmp_path):
    """convert --stats (backbone, precip) -> forecast from GRIB (no store) -> ensemble -> precip -> evaluate."""
    from fcn_jax import evaluate

    pl, sfc = _write_era5_grib(tmp_path, release["fields"][1], "2018-01-01T06")
    det = tmp_path / "det.nc"
    assert forecast.main([str(converted), "--ic-file", pl, sfc, "--init", "2018-01-01T06", "--steps", "3",
                          "--out", str(det)]) == 0
    fc = read_forecast(det)
    got = np.stack([fc[c].values for c in FCN_20], -1)
    ref = _reference(release, [1], 3)
    # the GRIB's 16-bit packing is the only difference from the year file's IC
    idx = [FCN_HDF5_LAYOUT.index(c) for c in FCN_20]
    std = STDS[idx]
    assert np.max(np.abs(got[:, 0] - ref[:, 0]) / std) < 2e-4
    assert np.max(np.abs(got - ref) / std) < 5e-3

    ens = tmp_path / "ens.nc"
    assert forecast.main([str(converted), "--ic-file", pl, sfc, "--init", "2018-01-01T06", "--steps", "2",
                          "--members", "4", "--member-chunk", "2", "--out", str(ens)]) == 0
    assert read_forecast(ens).sizes["member"] == 4

    pcfg = ModelConfig(img_size=(H, W), patch_size=(4, 4), in_channels=20, out_channels=1, embed_dim=16, depth=1,
                       num_blocks=2, kind="precip")
    convert.save_torch_checkpoint(_tiny_model(pcfg), tmp_path / "precip.ckpt")
    pdir = tmp_path / "precip"
    assert convert.main([str(tmp_path / "precip.ckpt"), "--experiment", str(release["exp"]), "--kind", "precip",
                         "--stats", str(release["stats"]), "--out", str(pdir)]) == 0
    pfc = tmp_path / "tp.nc"
    assert forecast.main([str(converted), "--precip", str(pdir), "--ic-file", pl, sfc, "--init", "2018-01-01T06",
                          "--steps", "2", "--out", str(pfc)]) == 0
    tp = read_forecast(pfc)
    assert tp["tp"].attrs["units"] == "m" and np.all(tp["tp"].values[:, 1:] >= 0)
    assert np.isnan(tp["tp"].values[:, 0]).all()  # the analysis has no tp
    assert tp.attrs["precip_bound"].startswith("unbounded") and tp.attrs["precip_eps"] == 1e-5

    scores = evaluate.evaluate_forecast(det, str(release["dir"] / "data" / "2018.h5"), tmp_path / "scores",
                                        climatology=[str(converted)], convention="fcn", plots=False)
    z = scores["rmse"].sel(system="model", channel="z500").values
    assert z[0] < 2e-4 * STDS[14] and np.all(np.isfinite(z))
    assert float(scores["acc"].sel(system="model", channel="z500").isel(lead_time=0)) > 0.999


def test_forecast_in_lead_segments_equals_one_rollout(release, converted, tmp_path):
    """--lead-chunk rolls out and writes a few steps at a time (bounded memory): the same file as one rollout."""
    from fcn_jax.inference.forecaster import lead_segments as _lead_segments

    assert _lead_segments(5, 2) == [(0, 2), (2, 2), (4, 1)]
    assert _lead_segments(28, 8) == [(0, 7), (7, 7), (14, 7), (21, 7)]  # equal segments: one compile
    assert _lead_segments(4, 0) == [(0, 4)] and _lead_segments(4, 8) == [(0, 4)]
    h5 = str(release["dir"] / "data" / "2018.h5")
    runs = {}
    for k in (0, 2):
        out = tmp_path / f"f{k}.nc"
        assert forecast.main([str(converted), "--ic-file", h5, "--init", "2018-01-01T00,2018-01-01T12",
                              "--steps", "5", "--lead-chunk", str(k), "--out", str(out)]) == 0
        runs[k] = read_forecast(out)
    for c in FCN_20:
        np.testing.assert_allclose(runs[2][c].values, runs[0][c].values, rtol=1e-6, atol=1e-6 * STDS.max())
    assert not np.isnan(runs[2]["z500"].values).any()  # every lead written


def test_ensemble_in_lead_segments_equals_one_rollout(release, converted, tmp_path):
    """Members continue from their last lead segment by segment (memory for one segment): the same file."""
    h5 = str(release["dir"] / "data" / "2018.h5")
    runs = {}
    for k in (0, 2):
        out = tmp_path / f"e{k}.nc"
        assert forecast.main([str(converted), "--ic-file", h5, "--init", "2018-01-01T00", "--steps", "5",
                              "--members", "3", "--seed", "4", "--lead-chunk", str(k), "--out", str(out)]) == 0
        runs[k] = read_forecast(out)
    assert runs[2].sizes["member"] == 3 and not np.isnan(runs[2]["t850"].values).any()
    for c in FCN_20:
        np.testing.assert_allclose(runs[2][c].values, runs[0][c].values, rtol=1e-6, atol=1e-6 * STDS.max())
