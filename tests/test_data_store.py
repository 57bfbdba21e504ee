"""Store statistics and climatologies against direct NumPy computations."""

import numpy as np
import pytest
import xarray as xr

from fcn_jax.data import synthetic as S
from fcn_jax.data.prepare import prepare
from fcn_jax.data.stats import day_of_year_and_hour
from fcn_jax.data.store import climatology_at, open_store, parse_years, store_stats

CH = ["t850", "z500", "u10"]


@pytest.fixture(scope="module")
def two_years(tmp_path_factory):
    """6-hourly 2003-06-01 .. 2005-03-01 on a 4 x 6 grid, with noise so stats are non-trivial."""
    d = tmp_path_factory.mktemp("two_years")
    lat, lon = S.grid(4, 6, poles=False)
    times = S.six_hourly("2003-06-01T00", 4 * 640)
    x = S.truth(times, CH, lat, lon)
    x = x + np.random.default_rng(0).normal(size=x.shape).astype(np.float32) * x.std(axis=(0, 2, 3), keepdims=True)
    files = S.write_cds(d / "src", times, CH, lat, lon, values=x)
    return d, files, times, x.astype(np.float32)


def _triangular_clim(x, times, window, fallback):
    """Reference: per (doy, hour) sums, circular triangular weights over doy."""
    doy, hour = day_of_year_and_hour(times)
    hours = sorted(set(hour.tolist()))
    S_ = np.zeros((366, len(hours)) + x.shape[1:])
    N_ = np.zeros((366, len(hours)))
    for i in range(len(times)):
        S_[doy[i] - 1, hours.index(hour[i])] += x[i]
        N_[doy[i] - 1, hours.index(hour[i])] += 1
    m = window // 2
    out = np.zeros_like(S_)
    for d in range(366):
        s = np.zeros_like(S_[0])
        n = np.zeros(len(hours))
        for k in range(-m, m + 1):
            w = m + 1 - abs(k)
            s += w * S_[(d + k) % 366]
            n += w * N_[(d + k) % 366]
        for h in range(len(hours)):
            out[d, h] = s[h] / n[h] if n[h] > 0 else fallback
    return out


def test_stats_and_climatologies_match_numpy(two_years, tmp_path):
    _, files, times, x = two_years
    out = prepare(files, tmp_path / "s.zarr", channels=CH, stats_years=[2003, 2004], clim_window_days=9,
                  climatology="doy-hour", progress=False)
    ds = open_store(out)
    assert ds.attrs["stats_years"] == "[2003, 2004]"
    np.testing.assert_array_equal(ds["fields"].values, x)
    sel = np.isin(times.astype("datetime64[Y]").astype(int) + 1970, [2003, 2004])
    xs = x[sel].astype(np.float64)
    mean, std = store_stats(out)
    np.testing.assert_allclose(mean, xs.mean(axis=(0, 2, 3)), rtol=1e-6)
    np.testing.assert_allclose(std, xs.std(axis=(0, 2, 3)), rtol=1e-6)
    assert mean.dtype == np.float32 and std.dtype == np.float32
    m2, s2 = store_stats(out, ["u10", "t850"])  # subset, in the order asked
    np.testing.assert_array_equal(m2, mean[[2, 0]])
    np.testing.assert_allclose(ds["time_mean"].values, xs.mean(axis=0), rtol=1e-6)
    clim = ds["clim_doy_hour"].values
    assert clim.shape == (366, 4, 3, 4, 6) and np.all(np.abs(clim).max(axis=(2, 3, 4)) > 0)  # never all-zero
    ref = _triangular_clim(xs, times[sel], 9, xs.mean(axis=0))
    # slot means are kept in float32: errors of float32 rounding of the channel's magnitude
    scale = np.abs(xs).max(axis=(0, 2, 3))[None, None, :, None, None]
    assert np.all(np.abs(clim - ref) <= 1e-5 * np.abs(ref) + 1e-6 * scale)
    # lookup by time
    t = times[[5, 700]]
    got = climatology_at(ds, t).values
    doy, hour = day_of_year_and_hour(t)
    np.testing.assert_allclose(got, ref[doy - 1, hour // 6], rtol=1e-5, atol=1e-6 * float(scale.max()))


def test_unsmoothed_climatology(two_years, tmp_path):
    _, files, times, x = two_years
    a = open_store(prepare(files, tmp_path / "a.zarr", channels=CH, clim_window_days=1, climatology="doy-hour",
                               progress=False))
    # window 1: the plain mean of each (day-of-year, hour) slot
    doy, hour = day_of_year_and_hour(times)
    for d, h in [(152, 0), (1, 18), (60, 6), (366, 12)]:
        sel = (doy == d) & (hour == h)
        want = x[sel].astype(np.float64).mean(axis=0) if sel.any() else a["time_mean"].values
        np.testing.assert_allclose(a["clim_doy_hour"].sel(dayofyear=d, hour=h).values, want, rtol=1e-6)
    assert a.attrs["clim_filled_slots"] == 0  # 2004 is a leap year: all 366 x 4 slots have data


@pytest.mark.slow
def test_climatology_bands_match_whole_field(two_years, tmp_path):
    _, files, _, _ = two_years
    kw = dict(channels=["u10"], years="2003", clim_window_days=15, climatology="doy-hour", progress=False)
    a = open_store(prepare(files, tmp_path / "a.zarr", **kw))
    b = open_store(prepare(files, tmp_path / "b.zarr", clim_memory_bytes=0, **kw))  # one-row bands
    assert b["clim_doy_hour"].encoding["chunks"] == (1, 1, 1, 1, 6)
    np.testing.assert_array_equal(a["clim_doy_hour"].values, b["clim_doy_hour"].values)
    assert a.attrs["clim_filled_slots"] > 0  # Jan-May have no 2003 data: filled with the time mean
    np.testing.assert_array_equal(a["clim_doy_hour"].sel(dayofyear=60, hour=0).values, a["time_mean"].values)


def test_years_selection_and_attrs(two_years, tmp_path):
    _, files, times, x = two_years
    out = prepare(files, tmp_path / "s.zarr", channels=CH, years="2004", doy_climatology=False, progress=False,
                  lat_chunks=2)
    ds = open_store(out)
    assert set(ds["time"].dt.year.values.tolist()) == {2004}
    assert ds.sizes["time"] == 366 * 4
    assert ds["fields"].encoding["chunks"] == (1, 3, 2, 6)
    assert "clim_doy_hour" not in ds and ds.attrs["years"] == "[2004]"
    assert ds.attrs["lat_order"] == "north_to_south" and ds.attrs["south_pole_dropped"] == 0
    assert xr.open_zarr(out)["fields"].shape == (1464, 3, 4, 6)  # plain xarray opens it


def test_overwrite_replaces_only_when_complete(two_years, tmp_path):
    _, files, _, _ = two_years
    out = prepare(files, tmp_path / "s.zarr", channels=["t850"], years="2004", doy_climatology=False,
                  progress=False)
    from fcn_jax.data.errors import DataError

    with pytest.raises(DataError, match="already exists"):
        prepare(files, out, channels=["t850"], progress=False)
    with pytest.raises(DataError, match="not found"):
        prepare(files, out, channels=["r850"], overwrite=True, progress=False)
    assert list(open_store(out)["channel"].values) == ["t850"]  # old store intact
    prepare(files, out, channels=["z500"], years="2004", overwrite=True, doy_climatology=False, progress=False)
    assert list(open_store(out)["channel"].values) == ["z500"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["s.zarr"]


def test_parse_years():
    assert parse_years("1979-1981,1990") == [1979, 1980, 1981, 1990]
    assert parse_years(None) is None and parse_years(2000) == [2000]
