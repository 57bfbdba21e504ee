"""Sources and climatologies behind fsspec URLs (the in-memory filesystem stands in for gs:// / s3://)."""

import numpy as np
import pytest
import xarray as xr

from fcn_jax.data import synthetic as S
from fcn_jax.data.errors import DataError
from fcn_jax.data.prepare import prepare
from fcn_jax.data.store import climatology_at, open_store

CH = ["z500", "t850", "u10"]
LAT, LON = S.grid(9, 16)
TIMES = S.six_hourly("2001-12-31T00", 8)


def test_wb2_zarr_behind_fsspec_url_prepares(tmp_path):
    url = "memory://bucket/era5-test.zarr"
    S.write_wb2(url, TIMES, CH, LAT, LON, lon_lat_order=True, lat_ascending=True)
    out = prepare([url], tmp_path / "s.zarr", channels=CH, progress=False)
    ds = open_store(out)
    np.testing.assert_array_equal(ds["time"].values, TIMES)
    np.testing.assert_allclose(ds["fields"].values, S.truth(TIMES, CH, LAT, LON), rtol=2e-7)
    assert url in ds.attrs["source_files"]
    with pytest.raises(DataError, match="memory://bucket/missing.zarr"):
        prepare(["memory://bucket/missing.zarr"], tmp_path / "t.zarr", channels=CH, progress=False)


def _wb2_climatology(url, lat, lon):
    """WB2 layout: (hour, dayofyear, [level,] longitude, latitude), latitude ascending, long names."""
    hours = np.array([0, 6, 12, 18])
    doy = np.arange(1, 367)
    la = np.sort(np.asarray(lat))
    base = doy[None, :, None, None] * 1.0 + hours[:, None, None, None] / 100.0
    field = base + np.asarray(lon)[None, None, :, None] * 0 + la[None, None, None, :] * 0
    ds = xr.Dataset(
        {"geopotential": (("hour", "dayofyear", "level", "longitude", "latitude"),
                          np.stack([field * 10, field * 20], axis=2).astype(np.float32), {"units": "m**2 s**-2"}),
         "temperature": (("hour", "dayofyear", "level", "longitude", "latitude"),
                         np.stack([field + 200, field + 250], axis=2).astype(np.float32), {"units": "K"}),
         "10m_u_component_of_wind": (("hour", "dayofyear", "longitude", "latitude"), field.astype(np.float32),
                                     {"units": "m s**-1"})},
        coords={"hour": hours, "dayofyear": doy, "level": np.array([500, 850]), "longitude": np.asarray(lon),
                "latitude": la})
    ds.to_zarr(url, mode="w", zarr_format=2, consolidated=True)
    return ds


def test_import_wb2_climatology_regridded(tmp_path):
    src = str(tmp_path / "s.zarr")
    files = S.write_cds(tmp_path / "src", TIMES, CH, LAT, LON)
    # a coarser climatology grid without poles: the import regrids (fields constant in space -> exact)
    clat, clon = S.grid(4, 8, poles=False)
    _wb2_climatology("memory://clim/wb2-clim.zarr", clat, clon)
    out = prepare(files, src, channels=CH, climatology="memory://clim/wb2-clim.zarr", progress=False)
    ds = open_store(out)
    assert ds.attrs["climatology"] == "import" and "memory://clim" in ds.attrs["climatology_reason"]
    c = ds["clim_doy_hour"]
    assert c.shape == (366, 4, 3, 9, 16)
    got = climatology_at(ds, np.array(["2001-03-01T12"], "datetime64[ns]")).values[0]  # doy 60, hour 12
    want = 60 + 0.12
    np.testing.assert_allclose(got[0], want * 10, rtol=1e-6)  # z500: level 500 of geopotential
    np.testing.assert_allclose(got[1], want + 250, rtol=1e-6)  # t850
    np.testing.assert_allclose(got[2], want, rtol=1e-6)
    with pytest.raises(DataError, match="expected auto, time-mean, doy-hour"):
        prepare(files, tmp_path / "x.zarr", channels=CH, climatology="nowhere/clim.zarr", progress=False)
