"""Bad input: a clear DataError naming where and what, and no partial store left."""

import os

import numpy as np
import pytest
import xarray as xr

from fcn_jax.data import synthetic as S
from fcn_jax.data.errors import DataError
from fcn_jax.data.prepare import prepare

LAT, LON = S.grid(5, 8)
TIMES = S.six_hourly("2010-01-01T00", 12)
CH = ["z500", "t850", "u10"]


def _prepare_fails(tmp_path, files, match, **kw):
    out = tmp_path / "out" / "store.zarr"
    with pytest.raises(DataError, match=match) as e:
        prepare(files, out, progress=False, **{"channels": CH, **kw})
    assert not out.exists()
    leftovers = os.listdir(out.parent) if out.parent.exists() else []
    assert leftovers == [], leftovers  # no temp or scratch directories either
    return str(e.value)


def test_missing_variable(tmp_path):
    files = S.write_cds(tmp_path, TIMES, CH, LAT, LON)
    msg = _prepare_fails(tmp_path, files, r"channel r850 .*\['r'.*at 850 hPa not found", channels=CH + ["r850"])
    assert "era5_pressure_levels.nc" in msg  # lists what each file has


def test_missing_level(tmp_path):
    files = S.write_cds(tmp_path, TIMES, CH, LAT, LON)
    _prepare_fails(tmp_path, files, r"era5_pressure_levels.nc variable 'z': level 700 hPa missing .*"
                                    r"levels present: \[500.0, 850.0\]", channels=CH + ["z700"])


def test_mismatched_grids(tmp_path):
    f1 = S.write_cds(tmp_path / "a", TIMES, ["z500"], LAT, LON)
    f2 = S.write_cds(tmp_path / "b", TIMES, ["u10"], LAT, S.grid(5, 10)[1])
    _prepare_fails(tmp_path, f1 + f2, r"grid mismatch in longitude: .*z500.* has 8 points .*u10.* has 10",
                   channels=["z500", "u10"])


@pytest.mark.parametrize("bad,word", [(np.nan, "NaN"), (np.inf, "Inf")])
def test_nan_inf(tmp_path, bad, word):
    times = S.six_hourly("2010-01-01T00", 100)  # error in the last block: earlier blocks were written
    x = S.truth(times, CH, LAT, LON)
    x[97, 1, 2, 3] = bad
    files = S.write_cds(tmp_path, times, CH, LAT, LON, values=x)
    _prepare_fails(tmp_path, files, rf"{word} values in channel t850 at time 2010-01-25T06:00 .*lat index 2, "
                                    r"lon index 3.*era5_pressure_levels.nc")


def test_packed_fill_value_is_reported(tmp_path):
    files = S.write_cds(tmp_path, TIMES, CH, LAT, LON, convention="legacy")
    import netCDF4

    with netCDF4.Dataset(files[0], "r+") as nc:  # single-level file: u10
        nc["u10"].set_auto_maskandscale(False)
        raw = nc["u10"][:]
        raw[3, 0, 0] = -32767
        nc["u10"][:] = raw
    _prepare_fails(tmp_path, files, r"NaN values in channel u10 at time 2010-01-01T18:00")


def test_time_gap(tmp_path):
    times = np.delete(TIMES, [5, 6])
    files = S.write_cds(tmp_path, times, CH, LAT, LON)
    _prepare_fails(tmp_path, files, r"time gap between 2010-01-02T00:00 and 2010-01-02T18:00 \(expected a step "
                                    r"of 6 h; 2 steps missing\)")
    # ...accepted when asked for
    out = prepare(files, tmp_path / "ok.zarr", channels=CH, allow_gaps=True, doy_climatology=False, progress=False)
    assert xr.open_zarr(out).sizes["time"] == 10


def test_duplicate_time_within_a_file(tmp_path):
    times = TIMES.copy()
    times[4] = times[3]
    files = S.write_cds(tmp_path, times, CH, LAT, LON)
    _prepare_fails(tmp_path, files, r"duplicate time 2010-01-01T18:00 .*expected strictly increasing")


def test_duplicate_time_across_files(tmp_path):
    f1 = S.write_cds(tmp_path / "a", TIMES[:8], CH, LAT, LON)
    f2 = S.write_cds(tmp_path / "b", TIMES[6:], CH, LAT, LON)
    _prepare_fails(tmp_path, f1 + f2, r"duplicate time 2010-01-02T12:00: present in both .*a/era5.* and .*b/era5")


def test_channels_with_different_times(tmp_path):
    f1 = S.write_cds(tmp_path / "a", TIMES, ["z500"], LAT, LON)
    f2 = S.write_cds(tmp_path / "b", TIMES[:-1], ["u10"], LAT, LON)
    _prepare_fails(tmp_path, f1 + f2, r"channel u10 lacks time 2010-01-03T18:00 that channel z500 has",
                   channels=["z500", "u10"])


def test_unreadable_file(tmp_path):
    bad = tmp_path / "garbage.nc"
    bad.write_bytes(b"this is not netCDF" * 100)
    _prepare_fails(tmp_path, [str(bad)], r"garbage.nc: cannot open as netCDF")
    _prepare_fails(tmp_path, [str(tmp_path / "nope.nc")], r"nope.nc: file not found")


def test_truncated_netcdf(tmp_path):
    files = S.write_cds(tmp_path, S.six_hourly("2010-01-01T00", 200), CH, S.grid(19, 36)[0], S.grid(19, 36)[1])
    data = open(files[1], "rb").read()
    open(files[1], "wb").write(data[: len(data) // 2])
    _prepare_fails(tmp_path, files, r"era5_pressure_levels.nc")


def test_truncated_hdf5(tmp_path):
    files = S.write_fcn_hdf5(tmp_path, [2010], 4, LAT, LON)
    data = open(files[0], "rb").read()
    open(files[0], "wb").write(data[: len(data) // 3])
    _prepare_fails(tmp_path, files, r"2010.h5.*(cannot open as HDF5|cannot read)", channels=["z500"])


def test_hdf5_without_fields(tmp_path):
    import h5py

    with h5py.File(tmp_path / "2010.h5", "w") as f:
        f.create_dataset("other", data=np.zeros(3))
    _prepare_fails(tmp_path, [str(tmp_path / "2010.h5")], r"2010.h5: no dataset 'fields'", channels=["z500"])


def test_empty_or_absent_years(tmp_path):
    files = S.write_cds(tmp_path, TIMES, CH, LAT, LON)
    _prepare_fails(tmp_path, files, r"empty year range '2012-2011'", years="2012-2011")
    _prepare_fails(tmp_path, files, r"years \[1990\] requested but the source covers 2010..2010", years="1990")


def test_unconvertible_units(tmp_path):
    files = S.write_cds(tmp_path, TIMES, CH, LAT, LON)
    import netCDF4

    with netCDF4.Dataset(files[1], "r+") as nc:
        nc["t"].units = "furlongs"
    _prepare_fails(tmp_path, files, r"era5_pressure_levels.nc variable 't': units 'furlongs' cannot be converted "
                                    r"to 'K' \(channel t850")


def test_ensemble_members(tmp_path):
    files = S.write_cds(tmp_path, TIMES, ["u10"], LAT, LON)
    ds = xr.open_dataset(files[0]).load()
    ds.close()
    ds.drop_vars("number").expand_dims(number=[0, 1]).to_netcdf(files[0])
    _prepare_fails(tmp_path, files, r"ensemble dimension 'number' has 2 members", channels=["u10"])
