"""``fcn_jax.evaluate`` with truth from any analysis source and climatologies from packages, stores,
the original's ``time_means.npy`` and WeatherBench 2 zarr; FourCastNet ``inference.py`` parity."""

import numpy as np
import pytest
import xarray as xr

from fcn_jax import evaluate
from fcn_jax.checkpoints import package as model_ckpt
from fcn_jax.data import synthetic as S
from fcn_jax.data.channels import FCN_HDF5_LAYOUT
from fcn_jax.data.prepare import prepare
from fcn_jax.data.readers import open_source
from fcn_jax.inference.files import ForecastError, write_forecast
from tests.helpers import random_model

CHANNELS = ["z500", "t850", "t2m"]
# the original's grid in miniature: 17 rows 90 .. -90 with both poles (ERA5's 721); the model sees the first 16
LAT17, LON = S.grid(17, 32, poles=True)
LAT = LAT17[:16]
TIMES = S.six_hourly("2001-01-01T00", 24)
INIT_IDX, N_LEAD = [0, 4, 9], 4
NOISE = np.array([150.0, 1.5, 2.0], np.float32)


def _truth17():
    """[time, lat17, lon, channel] physical: what the source files hold."""
    return np.moveaxis(S.truth(TIMES, CHANNELS, LAT17, LON), 1, -1).astype(np.float64)


def _forecast(path, attrs=None, seed=0):
    """Truth (first 16 rows) + noise at each init/lead: [init, lead, lat, lon, channel]."""
    x = _truth17()[:, :16]
    rng = np.random.default_rng(seed)
    f = np.stack([x[i:i + N_LEAD] for i in INIT_IDX]) + rng.normal(size=(len(INIT_IDX), N_LEAD, 16, 32, 3)) * NOISE
    write_forecast(path, f.astype(np.float32), init_times=TIMES[INIT_IDX], lat=LAT, lon=LON, channels=CHANNELS,
                   attrs=attrs)
    return str(path), f


@pytest.fixture(scope="module")
def src(tmp_path_factory):
    """An original-layout HDF5 year file (17 x 32), CDS netCDF files of the same fields, a store made from the
    HDF5 file (17 rows, as prepared from ERA5) and a forecast on the 16-row model grid."""
    d = tmp_path_factory.mktemp("evsrc")
    (h5,) = S.write_fcn_hdf5(d / "h5", [2001], len(TIMES), LAT17, LON)
    S.write_cds(d / "cds", TIMES, CHANNELS, LAT17, LON)
    store = prepare(open_source([h5], CHANNELS), d / "s.zarr", channels=CHANNELS, doy_climatology=False,
                    progress=False)
    fc, f = _forecast(d / "fc.nc")
    return {"dir": d, "h5": h5, "cds": str(d / "cds"), "store": str(store), "fc": fc, "f": f}


def _release_time_means(values, n=21):
    """A release-style ``time_means.npy`` array (1, 21, H, W): ``values [C, H, W]`` at CHANNELS' layout slots."""
    rng = np.random.default_rng(9)
    out = rng.normal(size=(1, n) + values.shape[1:]).astype(np.float32)
    for k, c in enumerate(CHANNELS):
        out[0, list(FCN_HDF5_LAYOUT).index(c)] = values[k]
    return out


def test_scores_select_one_system(src):
    s = evaluate.evaluate_forecast(src["fc"], src["store"], None, plots=False)
    assert s.rmse.dims == ("system", "channel", "lead_time")
    one = s.rmse.sel(system="model")
    assert one.dims == ("channel", "lead_time") and one.shape == (3, N_LEAD)
    assert s.sel(system="persistence").rmse.shape == (3, N_LEAD)
    assert "store" in s.attrs["climatology"] and "time mean" in s.attrs["climatology"]
    assert "first 16 of 17 latitude rows" in s.attrs["truth_grid"]


@pytest.mark.parametrize("kind", ["hdf5", "cds"])
@pytest.mark.parametrize("convention", ["fcn", "wb2"])
def test_truth_from_a_source_equals_truth_from_its_store(src, kind, convention):
    ref = evaluate.evaluate_forecast(src["fc"], src["store"], None, convention=convention, plots=False)
    got = evaluate.evaluate_forecast(src["fc"], src["h5" if kind == "hdf5" else "cds"], None, convention=convention,
                                     climatology=src["store"], plots=False)
    xr.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-6)
    assert got.attrs["normalisation"] == f"z500, t850, t2m: store {src['store']}"


def test_fcn_convention_equals_the_original_inference_formulas(src, tmp_path):
    """inference.py, in NumPy from the spec (fourcastnet-model.md §15-16): per IC, RMSE = sqrt(mean(L (p - t)^2)) * std
    and ACC = sum L p' t' / sqrt(sum L p'^2 sum L t'^2) on normalised fields, anomalies against the normalised
    time mean (rows 0..H-1 of the 721-row file, not re-centred), L from lat_j = 90 - j 180 / (H - 1); then the
    mean over ICs. The truth comes straight from the HDF5 file, the climatology from a time_means.npy."""
    rng = np.random.default_rng(3)
    truth = _truth17()  # [t, 17, 32, c]
    tm = truth.mean(axis=0) + rng.normal(size=truth.shape[1:]) * NOISE  # a climatology not equal to the truth mean
    npy = tmp_path / "time_means.npy"
    np.save(npy, _release_time_means(np.moveaxis(tm, -1, 0)))
    s = evaluate.evaluate_forecast(src["fc"], src["h5"], None, climatology=str(npy), convention="fcn", plots=False)
    assert "time means" in s.attrs["climatology"] and "estimated from the truth" in s.attrs["normalisation"]

    means, stds = np.array([5.2e4, 270.0, 281.0]), np.array([2.9e3, 18.0, 22.0])  # the original's global stats
    n = 16
    lat_q = 90.0 - np.arange(n) * 180.0 / (n - 1)
    L = n * np.cos(np.deg2rad(lat_q)) / np.cos(np.deg2rad(lat_q)).sum()
    m = (np.load(npy)[0][[list(FCN_HDF5_LAYOUT).index(c) for c in CHANNELS]][:, :n] - means[:, None, None]) \
        / stds[:, None, None]  # [c, lat, lon]
    rmse = np.zeros((len(INIT_IDX), N_LEAD, 3))
    acc = np.zeros_like(rmse)
    for i, i0 in enumerate(INIT_IDX):
        for lt in range(N_LEAD):
            pred = (np.moveaxis(src["f"][i, lt], -1, 0) - means[:, None, None]) / stds[:, None, None]
            tar = (np.moveaxis(truth[i0 + lt, :n], -1, 0) - means[:, None, None]) / stds[:, None, None]
            w = L[None, :, None]
            rmse[i, lt] = np.sqrt(np.mean(w * (pred - tar) ** 2, axis=(-1, -2))) * stds
            a, b = pred - m, tar - m
            acc[i, lt] = np.sum(w * a * b, axis=(-1, -2)) / np.sqrt(np.sum(w * a * a, axis=(-1, -2))
                                                                    * np.sum(w * b * b, axis=(-1, -2)))
    np.testing.assert_allclose(s.rmse.sel(system="model").values, rmse.mean(0).T, rtol=1e-5)
    np.testing.assert_allclose(s.acc.sel(system="model").values, acc.mean(0).T, rtol=1e-5)


def test_release_time_means_equal_a_store_time_mean(src, tmp_path):
    """(1, 21, 17, 32) time means fitted to the 16-row forecast = the store's 17-row time mean fitted the same way."""
    tm = xr.open_zarr(src["store"])["time_mean"].sel(channel=CHANNELS).values  # [c, 17, 32]
    npy = tmp_path / "time_means.npy"
    np.save(npy, _release_time_means(tm))
    ref = evaluate.evaluate_forecast(src["fc"], src["store"], None, plots=False)
    got = evaluate.evaluate_forecast(src["fc"], src["store"], None, climatology=str(npy), plots=False)
    xr.testing.assert_allclose(got.acc, ref.acc, rtol=1e-5, atol=1e-6)
    xr.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-6)
    assert f"time means {npy}" in got.attrs["climatology"] and "first 16 of 17" in got.attrs["climatology"]
    # a precipitation file (1, 1, H, W) gives tp only: the forecast's channels then lack a climatology
    np.save(tmp_path / "tp_means.npy", np.zeros((1, 1, 17, 32), np.float32))
    with pytest.raises(ForecastError, match=r"no climatology for channel\(s\) \['z500', 't850', 't2m'\]"):
        evaluate.evaluate_forecast(src["fc"], src["store"], None, climatology=str(tmp_path / "tp_means.npy"))


def _tiny_model():
    from fcn_jax.config import ModelConfig

    cfg = ModelConfig(img_size=(16, 32), patch_size=(4, 4), in_channels=3, out_channels=3, embed_dim=8, depth=1,
                      num_blocks=2)
    return random_model(cfg, scale=0.0)  # the weights do not matter here: only the package is scored


def test_model_package_as_climatology_and_default(src, tmp_path):
    """A package whose statistics and climatology are the store's (16 rows) scores like the store, explicitly
    (--climatology DIR) and by default when the forecast names it in its ``model`` attribute."""
    from fcn_jax.data.store import StoreInfo

    info = StoreInfo.read(src["store"])
    pkg = model_ckpt.package_metadata(channels=CHANNELS, mean=info.mean, std=info.std, lat=LAT, lon=LON)
    clim = model_ckpt.climatology_dataset(info.time_mean(CHANNELS)[:, :16], CHANNELS, LAT, LON, source="test")
    mdir = model_ckpt.save_model(tmp_path / "model", _tiny_model(), package=pkg, climatology=clim)
    ref = evaluate.evaluate_forecast(src["fc"], src["store"], None, plots=False)
    got = evaluate.evaluate_forecast(src["fc"], src["h5"], None, climatology=str(mdir), plots=False)
    xr.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-6)
    assert "model package" in got.attrs["climatology"] and "model package" in got.attrs["normalisation"]
    fc2, _ = _forecast(tmp_path / "fc_model.nc", attrs={"model": str(mdir)})
    dflt = evaluate.evaluate_forecast(fc2, src["h5"], None, plots=False)
    xr.testing.assert_allclose(dflt, ref, rtol=1e-5, atol=1e-6)
    assert f"model package {mdir}" in dflt.attrs["climatology"]


def _wb2_climatology(path, lat, lon):
    """A WeatherBench 2-style climatology zarr: dims (hour, dayofyear, level, longitude, latitude), latitude
    ascending, long names; returns {channel: [366, 4, lat, lon] (north first)} of what it holds."""
    rng = np.random.default_rng(4)
    nd, nh = 366, 4
    base = {"z500": 5.4e4, "t850": 275.0, "t2m": 280.0}
    vals = {c: (base[c] + rng.normal(size=(nd, nh, len(lat), len(lon))) * NOISE[k]).astype(np.float32)
            for k, c in enumerate(CHANNELS)}
    levels = [50, 500, 850]

    def pl(c, lev):  # [hour, doy, level, lon, lat_asc]
        arr = np.full((nh, nd, len(levels), len(lon), len(lat)), -1.0, np.float32)
        arr[:, :, levels.index(lev)] = np.swapaxes(vals[c], 0, 1).swapaxes(-1, -2)[..., ::-1]
        return arr

    dims = ("hour", "dayofyear", "level", "longitude", "latitude")
    ds = xr.Dataset({"geopotential": (dims, pl("z500", 500), {"units": "m**2 s**-2"}),
                     "temperature": (dims, pl("t850", 850), {"units": "K"}),
                     "2m_temperature": (dims[:2] + dims[3:], np.swapaxes(vals["t2m"], 0, 1).swapaxes(-1, -2)[..., ::-1],
                                        {"units": "K"})},
                    coords={"hour": [0, 6, 12, 18], "dayofyear": np.arange(1, nd + 1), "level": levels,
                            "longitude": lon, "latitude": lat[::-1]})
    ds.to_zarr(path, mode="w", consolidated=True)
    return vals


def test_wb2_climatology_zarr_in_the_wb2_convention(src, tmp_path):
    """Slots looked up at each valid time (day of year, hour), variables by long name and level, latitude
    reoriented, regridded bilinearly from 9 x 16; ACC and the climatology baseline against NumPy."""
    from fcn_jax import metrics
    from fcn_jax.data.climatology import linear_regrid

    lat9, lon16 = S.grid(9, 16, poles=True)
    zpath = str(tmp_path / "clim.zarr")
    vals = _wb2_climatology(zpath, lat9, lon16)
    s = evaluate.evaluate_forecast(src["fc"], src["h5"], None, climatology=zpath, convention="wb2", plots=False)
    assert "day-of-year x hour climatology at the valid time" in s.attrs["climatology"]
    assert "bilinear" in s.attrs["climatology"]
    truth = _truth17()[:, :16]
    w = metrics.lat_weights(LAT, scheme="wb2").astype(np.float64)[:, None, None]
    acc = np.zeros((len(INIT_IDX), N_LEAD, 3))
    mse_clim = np.zeros_like(acc)
    for i, i0 in enumerate(INIT_IDX):
        for lt in range(N_LEAD):
            t = TIMES[i0 + lt]
            doy = int((t.astype("datetime64[D]") - t.astype("datetime64[Y]")).astype(int)) + 1
            hour = int((t - t.astype("datetime64[D]")) / np.timedelta64(1, "h"))
            c = np.stack([linear_regrid(vals[ch][doy - 1, hour // 6].astype(np.float64), lat9, lon16, LAT, LON)
                          for ch in CHANNELS], -1)
            a, b = src["f"][i, lt] - c, truth[i0 + lt] - c
            acc[i, lt] = (w * a * b).sum((0, 1)) / np.sqrt((w * a * a).sum((0, 1)) * (w * b * b).sum((0, 1)))
            mse_clim[i, lt] = (w * (c - truth[i0 + lt]) ** 2).mean((0, 1))
    np.testing.assert_allclose(s.acc.sel(system="model").values, acc.mean(0).T, rtol=1e-4)
    np.testing.assert_allclose(s.rmse.sel(system="climatology").values, np.sqrt(mse_clim.mean(0)).T, rtol=1e-4)
    # the same day-of-year x hour climatology from a model package's climatology.nc scores the same
    doy_hour = np.stack([linear_regrid(vals[ch], lat9, lon16, LAT, LON) for ch in CHANNELS], 2)  # [366, 4, c, ...]
    clim = model_ckpt.climatology_dataset(doy_hour.mean((0, 1)), CHANNELS, LAT, LON, doy_hour=doy_hour,
                                          hours=[0, 6, 12, 18])
    pkg = model_ckpt.package_metadata(channels=CHANNELS, mean=[5.4e4, 275.0, 280.0], std=[3e3, 20.0, 20.0],
                                      lat=LAT, lon=LON)
    mdir = model_ckpt.save_model(tmp_path / "model", _tiny_model(), package=pkg, climatology=clim)
    p = evaluate.evaluate_forecast(src["fc"], src["h5"], None, climatology=str(mdir), convention="wb2", plots=False)
    xr.testing.assert_allclose(p.drop_attrs(), s.drop_attrs(), rtol=1e-5, atol=1e-5)
    # the fcn convention takes the mean of all slots
    f = evaluate.evaluate_forecast(src["fc"], src["h5"], None, climatology=zpath, convention="fcn", plots=False,
                                   baselines=["climatology"])
    tm = np.stack([linear_regrid(vals[ch].mean((0, 1), dtype=np.float64), lat9, lon16, LAT, LON)
                   for ch in CHANNELS], -1)
    w16 = metrics.lat_weights(LAT, scheme="fcn").astype(np.float64)[:, None, None]
    rm = np.mean([[np.sqrt((w16 * (tm - truth[i0 + lt]) ** 2).mean((0, 1))) for lt in range(N_LEAD)]
                  for i0 in INIT_IDX], axis=0)
    np.testing.assert_allclose(f.rmse.sel(system="climatology").values, rm.T, rtol=1e-4)


def test_climatology_errors(src, tmp_path, capsys):
    bad = tmp_path / "time_means.npy"
    np.save(bad, np.zeros((1, 20, 17, 32), np.float32))
    with pytest.raises(ForecastError, match=r"time_means\.npy: time means of shape \(1, 20, 17, 32\); expected "
                                            r"\(1, 21, H, W\).*\(1, 21, 17, 32\)"):
        evaluate.evaluate_forecast(src["fc"], src["store"], tmp_path / "o1", climatology=str(bad))
    np.save(bad, np.zeros((1, 21, 9, 32), np.float32))  # right channels, wrong grid: both grids named
    with pytest.raises(ForecastError, match=r"grid 9 x 32 .* does not fit the forecast .*grid 16 x 32"):
        evaluate.evaluate_forecast(src["fc"], src["store"], tmp_path / "o1", climatology=str(bad))
    # truth not a store, no --climatology, no model attribute: say what to pass
    with pytest.raises(ForecastError, match=r"no climatology .* is not a prepared store .* pass --climatology"):
        evaluate.evaluate_forecast(src["fc"], src["h5"], tmp_path / "o1")
    assert not (tmp_path / "o1").exists()
    assert evaluate.main([src["fc"], "--truth", src["h5"], "--out", str(tmp_path / "o2")]) == 2
    assert "pass --climatology" in capsys.readouterr().err
    with pytest.raises(ForecastError, match=r"--climatology .*nowhere: not found"):
        evaluate.evaluate_forecast(src["fc"], src["h5"], None, climatology=str(tmp_path / "nowhere"))


def test_cli_truth_file_and_release_climatology(src, tmp_path, capsys):
    np.save(tmp_path / "time_means.npy",
            _release_time_means(xr.open_zarr(src["store"])["time_mean"].sel(channel=CHANNELS).values))
    out = tmp_path / "o"
    assert evaluate.main([src["fc"], "--truth", src["h5"], "--climatology", str(tmp_path / "time_means.npy"),
                          "--climatology", src["store"], "--out", str(out), "--no-plots"]) == 0
    text = capsys.readouterr().out
    assert "persistence" in text and "climatology: z500, t850, t2m: time means" in text
    s = xr.open_dataset(out / "scores.nc")
    assert list(s.system.values) == ["model", "persistence", "climatology"]


def test_member_of_an_ensemble_truth_file(src, tmp_path, capsys):
    """--member N picks one member of an ensemble analysis (CDS netCDF with ``number``); without it: refused."""
    truth = _truth17()  # [t, lat, lon, c]
    rng = np.random.default_rng(6)
    ens = np.stack([truth + rng.normal(size=truth.shape) * NOISE, truth, truth - NOISE])  # member 1 = the truth
    levels = [500, 850]

    def pl(k, lev):
        a = np.zeros(ens.shape[:2] + (2,) + ens.shape[2:4], np.float32)
        a[:, :, levels.index(lev)] = ens[..., k]
        return a

    dims = ("number", "valid_time", "pressure_level", "latitude", "longitude")
    xr.Dataset({"z": (dims, pl(0, 500), {"units": "m**2 s**-2"}), "t": (dims, pl(1, 850), {"units": "K"}),
                "t2m": (dims[:2] + dims[3:], ens[..., 2].astype(np.float32), {"units": "K"})},
               coords={"number": [0, 1, 2], "valid_time": TIMES, "pressure_level": levels, "latitude": LAT17,
                       "longitude": LON}).to_netcdf(tmp_path / "ens.nc")
    ref = evaluate.evaluate_forecast(src["fc"], src["h5"], None, climatology=src["store"], plots=False)
    got = evaluate.evaluate_forecast(src["fc"], str(tmp_path / "ens.nc"), None, climatology=src["store"],
                                     member=1, plots=False)
    xr.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-6)
    assert evaluate.main([src["fc"], "--truth", str(tmp_path / "ens.nc"), "--climatology", src["store"],
                          "--out", str(tmp_path / "o")]) == 2
    assert "'number' has 3 members" in capsys.readouterr().err
