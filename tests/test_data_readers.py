"""Every source format and convention prepares into the same canonical store.

Files are written by the tests themselves (fcn_jax.data.synthetic) with values
from an analytic function of (time, channel, lat, lon), so a flipped latitude,
rolled longitude, swapped channel or missed unit conversion shows up.
"""

import numpy as np
import pytest
import xarray as xr

from fcn_jax.data import synthetic as S
from fcn_jax.data.channels import FCN_20
from fcn_jax.data.prepare import prepare
from fcn_jax.data.readers import open_source
from fcn_jax.data.store import open_store

LAT, LON = S.grid(9, 16)  # with poles, 90 -> -90
TIMES = S.six_hourly("2001-12-31T00", 8)  # crosses a year boundary
CH = ["z500", "t850", "u10", "sp", "r850", "tcwv", "msl", "v1000", "z50"]


def _check_store(path, channels, times=TIMES, lat=LAT, lon=LON, atol=None):
    ds = open_store(path)
    assert list(ds["channel"].values) == list(channels)
    assert ds["fields"].dims == ("time", "channel", "lat", "lon")
    assert ds["fields"].dtype == np.float32
    assert ds["fields"].encoding["chunks"][0] == 1  # one time step per chunk
    np.testing.assert_array_equal(ds["time"].values, times)
    np.testing.assert_allclose(ds["lat"].values, lat)  # north -> south
    np.testing.assert_allclose(ds["lon"].values, lon)  # 0 -> 360
    want = S.truth(times, channels, lat, lon)
    got = ds["fields"].values
    if atol is None:
        np.testing.assert_allclose(got, want, rtol=2e-7, atol=0)
    else:
        np.testing.assert_allclose(got, want, rtol=0, atol=atol)
    from fcn_jax.data.channels import get_channel
    assert list(ds["channel_units"].values) == [get_channel(c).units for c in channels]
    return ds


def test_cds_new_convention(tmp_path):
    files = S.write_cds(tmp_path / "src", TIMES, CH, LAT, LON, convention="new")
    ds0 = xr.open_dataset(files[1])
    assert "valid_time" in ds0.dims and "pressure_level" in ds0.dims and "number" in ds0.coords
    ds0.close()
    _check_store(prepare(files, tmp_path / "s.zarr", channels=CH, progress=False, doy_climatology=False), CH)


def test_cds_legacy_packed_ascending_lat(tmp_path):
    files = S.write_cds(tmp_path / "src", TIMES, CH, LAT, LON, convention="legacy", lat_ascending=True)
    import netCDF4

    from fcn_jax.data.channels import get_channel

    scales = {}
    for f in files:
        with netCDF4.Dataset(f) as nc:
            assert "time" in nc.dimensions and nc["latitude"][0] < nc["latitude"][-1]
            for v in nc.variables.values():
                if hasattr(v, "scale_factor"):
                    assert v.dtype == np.int16 and v._FillValue == -32767
                    scales[v.name] = float(v.scale_factor)
            assert "level" in nc.dimensions or "u10" in nc.variables
    out = prepare(files, tmp_path / "s.zarr", channels=CH, progress=False, doy_climatology=False)
    ds = open_store(out)
    want = S.truth(TIMES, CH, LAT, LON)
    # int16 packing: error up to half a quantisation step (plus float32 rounding)
    for i, c in enumerate(CH):
        tol = 0.5 * scales[get_channel(c).cds_short] + 1e-6 * np.abs(want[:, i]).max()
        np.testing.assert_allclose(ds["fields"].values[:, i], want[:, i], rtol=0, atol=tol, err_msg=c)
    np.testing.assert_allclose(ds["lat"].values, LAT)


def test_cds_lon_180_and_geopotential_height(tmp_path):
    files = S.write_cds(tmp_path / "src", TIMES, CH, LAT, LON, convention="new", lon_180=True,
                        geopotential_height=True)
    ds0 = xr.open_dataset(files[1])
    assert "gh" in ds0 and ds0["longitude"].values.min() < 0
    ds0.close()
    # geopotential = height x 9.80665; float32 rounding of the division/multiplication
    _check_store(prepare(files, tmp_path / "s.zarr", channels=CH, progress=False, doy_climatology=False), CH,
                 atol=0.01)


def test_cds_multiple_files_per_variable_and_legacy_expver_dimension(tmp_path):
    # Two yearly files per level type, and an ERA5/ERA5T 'expver' dimension.
    f1 = S.write_cds(tmp_path / "a", TIMES[:4], CH, LAT, LON, prefix="y2001")
    f2 = S.write_cds(tmp_path / "b", TIMES[4:], CH, LAT, LON, prefix="y2002")
    ds = xr.open_dataset(f2[0]).load()
    ds.close()
    a = ds.drop_vars("expver").expand_dims(expver=[1, 5]).copy(deep=True)
    for v in a.data_vars:  # first two times valid in expver 1, the rest in expver 5
        arr = a[v].values
        arr[0, 2:] = np.nan
        arr[1, :2] = np.nan
        a[v].values = arr
    a.to_netcdf(f2[0])
    src = open_source(f1 + f2, CH)
    assert src.shape == (8, len(CH), 9, 16)
    np.testing.assert_allclose(src.read(0, 8), S.truth(TIMES, CH, LAT, LON), rtol=2e-7)
    np.testing.assert_allclose(src.to_xarray().values, S.truth(TIMES, CH, LAT, LON), rtol=2e-7)


@pytest.mark.parametrize("lon_lat,ascending", [(True, True), (False, False)])
def test_wb2_zarr(tmp_path, lon_lat, ascending):
    path = S.write_wb2(tmp_path / "wb2.zarr", TIMES, CH, LAT, LON, lon_lat_order=lon_lat, lat_ascending=ascending)
    raw = xr.open_zarr(path)
    assert "geopotential" in raw and "2m_temperature" not in raw
    if lon_lat:
        assert raw["geopotential"].dims == ("time", "level", "longitude", "latitude")
    _check_store(prepare([path], tmp_path / "s.zarr", channels=CH, progress=False, doy_climatology=False), CH)


def test_fcn_hdf5_lazy(tmp_path):
    lat, lon = S.grid(9, 16)
    files = S.write_fcn_hdf5(tmp_path, [2016, 2017], 6, lat, lon)
    src = open_source(files, "fcn20", allow_gaps=True)
    assert src.channel_names == list(FCN_20) and src.shape == (12, 20, 9, 16)
    times = np.concatenate([S.six_hourly("2016-01-01T00", 6), S.six_hourly("2017-01-01T00", 6)])
    # 2016 ends after 6 steps: a gap to 2017 that is not the leap-year year-end gap -> error
    from fcn_jax.data.errors import DataError
    with pytest.raises(DataError, match="time gap between 2016-01-02T06:00 and 2017-01-01T00:00"):
        prepare(files, tmp_path / "s.zarr", channels="fcn20", progress=False)
    out = prepare(files, tmp_path / "s.zarr", channels=["z500", "u10", "tcwv"], allow_gaps=True,
                  progress=False, doy_climatology=False, drop_south_pole=True)
    ds = open_store(out)
    assert ds.attrs["south_pole_dropped"] == 1 and ds.attrs["n_lat_source"] == 9 and ds.sizes["lat"] == 8
    np.testing.assert_allclose(ds["fields"].values, S.truth(times, ["z500", "u10", "tcwv"], lat, lon)[:, :, :8],
                               rtol=2e-7)


def test_fcn_hdf5_leap_year_end_gap_accepted(tmp_path):
    # A full leap-year file of 1460 samples stops on 30 Dec 18 UTC; the next year follows.
    lat, lon = S.grid(3, 4)
    files = S.write_fcn_hdf5(tmp_path, [2016], 1460, lat, lon)
    files += S.write_fcn_hdf5(tmp_path, [2017], 2, lat, lon)
    src = open_source(files, ["t850"])
    assert src.shape[0] == 1462
    assert str(src.times[1459])[:16] == "2016-12-30T18:00"


def test_all_formats_give_the_same_store(tmp_path):
    """CDS new, CDS legacy (up to packing), WB2 and HDF5 agree on the canonical values."""
    lat, lon = S.grid(9, 16)
    times = S.six_hourly("2001-01-01T00", 4)
    chans = list(FCN_20)
    stores = {
        "new": prepare(S.write_cds(tmp_path / "n", times, chans, lat, lon), tmp_path / "n.zarr",
                       progress=False, doy_climatology=False),
        "wb2": prepare([S.write_wb2(tmp_path / "w.zarr", times, chans, lat, lon, lon_lat_order=True)],
                       tmp_path / "w_s.zarr", progress=False, doy_climatology=False),
        "h5": prepare(S.write_fcn_hdf5(tmp_path / "h", [2001], 4, lat, lon), tmp_path / "h.zarr",
                      progress=False, doy_climatology=False),
    }
    ref = open_store(stores["new"])["fields"].values
    for k, p in stores.items():
        ds = open_store(p)
        np.testing.assert_array_equal(ds["fields"].values, ref, err_msg=k)
        assert list(ds["channel"].values) == chans
