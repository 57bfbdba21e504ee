"""Precipitation sources: hourly CDS tp summed to 6 h accumulations; the original's precip HDF5 files."""

import h5py
import numpy as np

from fcn_jax.data import synthetic as S
from fcn_jax.data.channels import FCN_20
from fcn_jax.data.prepare import prepare
from fcn_jax.data.store import open_store

LAT, LON = S.grid(5, 8)


def test_hourly_cds_tp_sums_into_6h_accumulation_ending_at_stamp(tmp_path):
    hours = np.datetime64("2010-03-01T00", "ns") + np.arange(49) * np.timedelta64(1, "h")  # 00 .. +2 days 00
    rng = np.random.default_rng(0)
    x = np.stack([250 + rng.random((49, 5, 8)), rng.random((49, 5, 8)) * 1e-3], axis=1).astype(np.float32)
    files = S.write_cds(tmp_path / "src", hours, ["t850", "tp"], LAT, LON, values=x)
    out = prepare(files, tmp_path / "s.zarr", channels=["t850", "tp"], progress=False)
    ds = open_store(out)
    t = ds["time"].values
    # the first stamp with six hours of accumulations (00..05 end at 01..05: 00 lacks 19..23 of the day before)
    want_t = np.datetime64("2010-03-01T06", "ns") + np.arange(8) * np.timedelta64(6, "h")
    np.testing.assert_array_equal(t, want_t)
    assert ds.attrs["time_step_hours"] == 6.0 and "trimmed" in ds.attrs["time_trimmed"]
    f = ds["fields"].values
    for k, stamp in enumerate(want_t):
        j = int((stamp - hours[0]) / np.timedelta64(1, "h"))
        np.testing.assert_allclose(f[k, 1], x[j - 5:j + 1, 1].astype(np.float64).sum(axis=0), rtol=1e-6)
        np.testing.assert_array_equal(f[k, 0], x[j, 0])  # states: the value at the stamp


def _precip_file(path, year, n, start_hour):
    times = np.datetime64(f"{year}-01-01T00", "ns") + np.timedelta64(start_hour, "h") + \
        np.arange(n) * np.timedelta64(6, "h")
    tp = S.truth(times, ["tp"], LAT, LON)[:, 0]
    path.parent.mkdir(parents=True, exist_ok=True)
    with h5py.File(path, "w") as f:
        f.create_dataset("tp", data=tp)
    return str(path), times, tp


def test_original_precip_hdf5_files(tmp_path):
    fields = S.write_fcn_hdf5(tmp_path / "train", [1979], 8, LAT, LON)
    # 1979: 1458 samples from 12 UTC (ERA5's accumulations start at 07 UTC)
    p, ptimes, tp = _precip_file(tmp_path / "precip" / "train" / "1979.h5", 1979, 1458, 12)
    out = prepare(fields + [p], tmp_path / "s.zarr", channels=["z500", "t850", "tp"], kind="hdf5",
                  progress=False)
    ds = open_store(out)
    t = ds["time"].values
    np.testing.assert_array_equal(t, S.six_hourly("1979-01-01T12", 6))  # fields 00..+42 h, tp from 12 UTC
    np.testing.assert_allclose(ds["fields"].sel(channel="tp").values, tp[:6])
    np.testing.assert_allclose(ds["fields"].sel(channel="z500").values, S.truth(t, ["z500"], LAT, LON)[:, 0])
    assert "1979-01-01T12:00" in ds.attrs["time_trimmed"]
    # other years start at 00 UTC; the directory form works too
    S.write_fcn_hdf5(tmp_path / "y2000", [2000], 4, LAT, LON)
    _, _, tp2 = _precip_file(tmp_path / "y2000p" / "2000.h5", 2000, 4, 0)
    out2 = prepare([str(tmp_path / "y2000"), str(tmp_path / "y2000p")], tmp_path / "s2.zarr",
                   channels=list(FCN_20[:2]) + ["tp"], progress=False)
    ds2 = open_store(out2)
    np.testing.assert_array_equal(ds2["time"].values, S.six_hourly("2000-01-01T00", 4))
    np.testing.assert_allclose(ds2["fields"].sel(channel="tp").values, tp2)


def test_hourly_tp_without_a_complete_window_is_an_error(tmp_path):
    import pytest

    from fcn_jax.data.errors import DataError

    hours = np.datetime64("2010-03-01T01", "ns") + np.arange(4) * np.timedelta64(1, "h")  # 01..04: no 6 h window
    files = S.write_cds(tmp_path / "src", hours, ["tp"], LAT, LON, values=np.zeros((4, 1, 5, 8), np.float32))
    with pytest.raises(DataError, match="channel tp: no 6-hour window complete"):
        prepare(files, tmp_path / "s.zarr", channels=["tp"], progress=False)
