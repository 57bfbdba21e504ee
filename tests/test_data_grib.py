"""GRIB input: real GRIB 1/2 files written with ecCodes from its bundled samples, read back.

Layouts: ERA5 as the Copernicus store delivers it (GRIB1, pressure- and
single-level files, variables split across files and time across files,
hourly ``tp``), IFS open data and GFS analyses (GRIB2, ``gh`` in gpm, many
unrelated hypercubes, a reduced Gaussian one), ensembles (``number``, control
and perturbed in one file), bad files. Values are compared with ecCodes' own
decoding of the written messages (bitwise), with the values written (to the
16-bit packing's precision) and with what the netCDF reader gives on a cfgrib
conversion of the same files (bitwise).
"""

from __future__ import annotations

import concurrent.futures as cf
import json
import os
import threading

import numpy as np
import pytest
import xarray as xr

cfgrib = pytest.importorskip("cfgrib")
eccodes = pytest.importorskip("eccodes")

from fcn_jax.data import synthetic as S  # noqa: E402
from fcn_jax.data.channels import STANDARD_GRAVITY, resolve_channels  # noqa: E402
from fcn_jax.data.errors import DataError  # noqa: E402
from fcn_jax.data.prepare import prepare  # noqa: E402
from fcn_jax.data.readers import detect_kind, open_source  # noqa: E402
from fcn_jax.data.store import open_store
from fcn_jax.prepare import main as data_main  # noqa: E402
from tests.helpers import write_grib  # noqa: E402

# cfgrib.open_datasets (the netCDF conversion below) merges with xarray's old default
pytestmark = pytest.mark.filterwarnings("ignore:In a future version of xarray the default value for compat")

NJ, NI = 19, 36  # 10-degree grid, poles included
LAT = np.linspace(90.0, -90.0, NJ)
LON = np.arange(NI) * 10.0
TIMES = S.six_hourly("2021-03-01T00", 4)
HOUR = np.timedelta64(1, "h")

# ERA5 short names (GRIB paramId short names) of the channels used here
SFC = {"u10": "10u", "v10": "10v", "t2m": "2t", "sp": "sp", "msl": "msl", "tcwv": "tcwv"}
PL_VARS = ("z", "t", "u", "v", "r")
LEVELS = (1000, 850, 500)
ERA5_CHANNELS = ["u10", "v10", "t2m", "sp", "msl", "t850", "u1000", "v1000", "z1000", "z500", "r850", "tcwv"]


# ------------------------------------------------------------------ writing GRIB
def _grid_keys(lon0: float = 0.0, ni: int = NI, nj: int = NJ, step: float = 10.0) -> dict:
    return dict(gridType="regular_ll", Ni=ni, Nj=nj,
                latitudeOfFirstGridPointInDegrees=90.0, latitudeOfLastGridPointInDegrees=90.0 - step * (nj - 1),
                longitudeOfFirstGridPointInDegrees=lon0,
                longitudeOfLastGridPointInDegrees=lon0 + step * (ni - 1),
                iDirectionIncrementInDegrees=step, jDirectionIncrementInDegrees=step)


def _date_keys(t) -> dict:
    t = np.datetime64(t, "m")
    day = t.astype("datetime64[D]")
    minutes = int((t - day).astype(int))
    return dict(dataDate=int(str(day).replace("-", "")), dataTime=(minutes // 60) * 100 + minutes % 60)


def _decoded(path, *keys: str) -> dict:
    """ecCodes' own decoding of every message: {(key values...): float32 [nj, ni]}."""
    out = {}
    with open(path, "rb") as f:
        while (h := eccodes.codes_grib_new_from_file(f)) is not None:
            try:
                k = tuple(eccodes.codes_get(h, key) for key in keys)
                x = eccodes.codes_get_values(h).astype(np.float32)
                if eccodes.codes_get(h, "gridType") == "regular_ll":
                    x = x.reshape(eccodes.codes_get(h, "Nj"), eccodes.codes_get(h, "Ni"))
                out[k] = x
            finally:
                eccodes.codes_release(h)
    return out


def _valid(t) -> str:
    return str(np.datetime64(t, "m"))


def _vt_keys(path) -> dict:
    """Decoded fields keyed by (shortName, level, valid time as 'YYYY-MM-DDTHH:MM')."""
    out = {}
    for (sn, lev, vd, vt), x in _decoded(path, "shortName", "level", "validityDate", "validityTime").items():
        t = np.datetime64(f"{str(vd)[:4]}-{str(vd)[4:6]}-{str(vd)[6:]}T{vt // 100:02d}:{vt % 100:02d}")
        out[(sn, lev, _valid(t))] = x
    return out


def _era5_files(d) -> tuple[list[str], np.ndarray]:
    """ERA5 GRIB1 as the CDS delivers it: two pressure-level files (split in time), one single-level file."""
    chans = resolve_channels(list(SFC) + [f"{v}{lev}" for v in PL_VARS for lev in LEVELS])
    truth = S.truth(TIMES, chans, LAT, LON)
    truth = truth + np.random.default_rng(0).normal(scale=0.01 * (truth.std(axis=(2, 3), keepdims=True) + 1))
    col = {c.name: i for i, c in enumerate(chans)}
    pl = []
    for half in (TIMES[:2], TIMES[2:]):
        msgs = []
        for t in half:
            ti = int(np.nonzero(TIMES == t)[0][0])
            for v in PL_VARS:
                for lev in LEVELS:
                    keys = dict(_grid_keys(), **_date_keys(t), shortName=v, typeOfLevel="isobaricInhPa", level=lev)
                    msgs.append(("regular_ll_pl_grib1", keys, truth[ti, col[f"{v}{lev}"]]))
        pl.append(write_grib(d / f"era5_pl_{len(pl)}.grib", msgs))
    msgs = []
    for ti, t in enumerate(TIMES):
        for ch, sn in SFC.items():
            msgs.append(("regular_ll_sfc_grib1", dict(_grid_keys(), **_date_keys(t), shortName=sn), truth[ti, col[ch]]))
    sfc = write_grib(d / "era5_sfc.grib", msgs)
    return pl + [sfc], truth[:, [col[c] for c in ERA5_CHANNELS]]


@pytest.fixture(scope="module")
def era5(tmp_path_factory):
    d = tmp_path_factory.mktemp("era5_grib")
    files, written = _era5_files(d)
    # The netCDF conversion cfgrib users make: one netCDF file per hypercube.
    nc = []
    for f in files:
        for i, ds in enumerate(cfgrib.open_datasets(f, backend_kwargs={"indexpath": ""})):
            out = d / f"{os.path.basename(f)}.{i}.nc"
            ds.to_netcdf(out)
            ds.close()
            nc.append(str(out))
    return files, nc, written


def _expected_era5(files) -> np.ndarray:
    dec = {}
    for f in files:
        dec.update(_vt_keys(f))
    out = np.empty((len(TIMES), len(ERA5_CHANNELS), NJ, NI), np.float32)
    for c, ch in enumerate(resolve_channels(ERA5_CHANNELS)):
        sn, lev = (ch.cds_short, ch.level) if ch.is_pressure_level else (SFC[ch.name], 0)
        for ti, t in enumerate(TIMES):
            out[ti, c] = dec[(sn, lev, _valid(t))]
    return out


# ------------------------------------------------------------------------ tests
def test_era5_pressure_and_single_level_files(era5):
    files, nc, written = era5
    assert all(detect_kind(f) == "grib" for f in files)
    src = open_source(files, ERA5_CHANNELS)
    assert src.attrs["source_kind"] == "grib" and src.shape == (len(TIMES), len(ERA5_CHANNELS), NJ, NI)
    assert np.array_equal(src.times, TIMES)
    np.testing.assert_allclose(src.lat, LAT)
    np.testing.assert_allclose(src.lon, LON)
    x = src.read(0, len(TIMES))
    # bitwise what ecCodes decodes from each message ...
    assert np.array_equal(x, _expected_era5(files))
    # ... which is what was written, to the 16-bit packing's precision
    span = written.max(axis=(2, 3), keepdims=True) - written.min(axis=(2, 3), keepdims=True)
    assert np.all(np.abs(x - written) <= span / (2**16 - 1) + 1e-6 * np.abs(written))
    assert json.loads(src.attrs["unit_conversions"]) == {}
    sources = json.loads(src.attrs["channel_sources"])
    assert "era5_pl_0.grib" in sources["z500"][0] and "era5_pl_1.grib" in sources["z500"][1]
    assert "era5_sfc.grib" in sources["t2m"][0]
    # the netCDF conversion of the same GRIB through the CDS reader: the same values, bitwise
    ref = open_source(nc, ERA5_CHANNELS)
    assert ref.attrs["source_kind"] == "cds-netcdf"
    assert np.array_equal(ref.times, src.times) and np.array_equal(ref.lat, src.lat)
    assert np.array_equal(ref.lon, src.lon)
    assert np.array_equal(ref.read(0, len(TIMES)), x)
    assert np.array_equal(src.read(1, 3), x[1:3])  # a block across the two pressure-level files
    assert not [f for f in os.listdir(os.path.dirname(files[0])) if f.endswith(".idx")]  # nothing beside the data


def test_prepare_grib_equals_prepare_netcdf(era5, tmp_path):
    files, nc, _ = era5
    a = open_store(prepare(files, tmp_path / "grib.zarr", channels=ERA5_CHANNELS, progress=False))
    b = open_store(prepare(nc, tmp_path / "nc.zarr", channels=ERA5_CHANNELS, progress=False))
    assert a.attrs["source_kind"] == "grib" and b.attrs["source_kind"] == "cds-netcdf"
    for v in ("fields", "mean", "std", "time_mean"):
        assert np.array_equal(a[v].values, b[v].values), v
    assert np.array_equal(a["time"].values, b["time"].values)
    assert list(a["channel"].values) == ERA5_CHANNELS


def _gh_file(path, kind: str) -> tuple[str, dict]:
    """IFS open data (ecmf, lon -180..170) or GFS (kwbc, lon 0..350) analyses, GRIB2, with gh in gpm."""
    rng = np.random.default_rng(1)
    lon0, centre = (-180.0, "ecmf") if kind == "ifs" else (0.0, "kwbc")
    names = {"msl": "msl", "tcwv": "tcwv"} if kind == "ifs" else {"msl": "prmsl", "tcwv": "pwat"}
    msgs = []
    for t in TIMES[:2]:
        base = dict(_grid_keys(lon0), **_date_keys(t), centre=centre)

        def add(sn, tol, level=None, values=None, sample="regular_ll_sfc_grib2", **extra):
            keys = dict(base, shortName=sn, typeOfLevel=tol, **extra)
            if level is not None:
                keys["level"] = level
            msgs.append((sample, keys, rng.normal(280.0, 10.0, (NJ, NI)) if values is None else values))

        for lev in LEVELS:
            add("gh", "isobaricInhPa", lev, 5500.0 + lev + rng.normal(0.0, 50.0, (NJ, NI)))
            add("t", "isobaricInhPa", lev)
        add(names["msl"], "meanSea", values=rng.normal(101000.0, 900.0, (NJ, NI)))
        add(names["tcwv"], "entireAtmosphere", values=rng.gamma(2.0, 10.0, (NJ, NI)))
        add("2t", "heightAboveGround", 2)
        add("10u", "heightAboveGround", 10, values=rng.normal(0.0, 5.0, (NJ, NI)))
        add("sp", "surface", values=rng.normal(98000.0, 900.0, (NJ, NI)))
        # unrelated hypercubes a GFS file carries
        add("t", "heightAboveGround", 80)
        add("t", "heightAboveGround", 100)
        add("t", "surface")
        add("t", "tropopause")
        add("gh", "cloudTop")
        add("gh", "isobaricInPa", 1)
        msgs.append(("regular_ll_sfc_grib2", dict(_grid_keys(0.0, 18, 10, 20.0), **_date_keys(t), centre=centre,
                                                  shortName="2d", typeOfLevel="heightAboveGround", level=2),
                     rng.normal(280.0, 10.0, (10, 18))))  # another grid
        h = eccodes.codes_grib_new_from_samples("reduced_gg_pl_32_grib2")
        n = eccodes.codes_get(h, "numberOfValues")
        eccodes.codes_release(h)
        msgs.append(("reduced_gg_pl_32_grib2", dict(_date_keys(t), centre=centre, shortName="w",
                                                    typeOfLevel="isobaricInhPa", level=500),
                     rng.normal(0.0, 0.1, n)))  # a reduced Gaussian grid
    return write_grib(path, msgs), names


@pytest.mark.parametrize("kind", ["ifs", "gfs"])
def test_gh_in_gpm_becomes_geopotential_among_unrelated_hypercubes(tmp_path, kind):
    path, names = _gh_file(tmp_path / f"{kind}.grib2", kind)
    chans = ["u10", "t2m", "sp", "msl", "z1000", "t850", "z500", "tcwv"]
    src = open_source([path], chans)
    dec = _vt_keys(path)
    x = src.read(0, 2)
    lon_order = np.argsort(np.mod(-180.0 + np.arange(NI) * 10.0, 360.0)) if kind == "ifs" else np.arange(NI)
    np.testing.assert_allclose(src.lon, LON)  # IFS's -180..170 put into [0, 360)
    for ti, t in enumerate(TIMES[:2]):
        for lev in (1000, 500):
            gh = dec[("gh", lev, _valid(t))][:, lon_order]
            z = x[ti, chans.index(f"z{lev}")]
            assert np.array_equal(z, (gh.astype(np.float64) * STANDARD_GRAVITY).astype(np.float32))
            np.testing.assert_allclose(z, gh * 9.80665, rtol=1e-6)
        assert np.array_equal(x[ti, chans.index("msl")], dec[(names["msl"], 0, _valid(t))][:, lon_order])
        assert np.array_equal(x[ti, chans.index("tcwv")], dec[(names["tcwv"], 0, _valid(t))][:, lon_order])
        assert np.array_equal(x[ti, chans.index("t2m")], dec[("2t", 2, _valid(t))][:, lon_order])
        assert np.array_equal(x[ti, chans.index("t850")], dec[("t", 850, _valid(t))][:, lon_order])
    conv = json.loads(src.attrs["unit_conversions"])
    assert {k.split(" variable ")[1]: v for k, v in conv.items()} == {
        "'gh' level 1000 hPa (channel z1000)": "geopotential height (gpm) x g",
        "'gh' level 500 hPa (channel z500)": "geopotential height (gpm) x g"}
    # a channel only on the reduced Gaussian grid: the error names the file and the hypercube set aside
    with pytest.raises(DataError, match=r"channel w500 .*not found.*set aside.*reduced_gg.*not a regular"):
        open_source([path], ["w500"])
    if kind == "gfs":  # the store records the conversion too
        ds = open_store(prepare([path], tmp_path / "s.zarr", channels=["z500", "msl"], progress=False))
        assert "geopotential height (gpm) x g" in ds.attrs["unit_conversions"]
        assert "'prmsl'" in ds.attrs["channel_sources"]


def _ensemble_file(path, members, control: bool = False) -> str:
    rng = np.random.default_rng(2)
    msgs = []
    for n in members:
        is_cf = control and n == 0
        for t in TIMES[:2]:
            keys = dict(_grid_keys(), **_date_keys(t), productDefinitionTemplateNumber=1, shortName="gh",
                        typeOfLevel="isobaricInhPa", level=500, perturbationNumber=n,
                        numberOfForecastsInEnsemble=len(members), typeOfEnsembleForecast=1 if is_cf else 3,
                        typeOfProcessedData=3 if is_cf else 4)
            msgs.append(("regular_ll_pl_grib2", keys, 5500.0 + 100.0 * n + rng.normal(0.0, 30.0, (NJ, NI))))
    return write_grib(path, msgs)


def test_ensemble_member(tmp_path):
    path = _ensemble_file(tmp_path / "ens.grib2", [1, 2, 3])
    with pytest.raises(DataError, match=r"ens.grib2: ensemble dimension 'number' has 3 members \[1, 2, 3\]"):
        open_source([path], ["z500"])
    dec = _decoded(path, "number", "dataTime")
    src = open_source([path], ["z500"], member=1)
    assert src.attrs["ensemble_member"] == 1
    x = src.read(0, 2)[:, 0]
    for ti, hhmm in enumerate((0, 600)):
        assert np.array_equal(x[ti], (dec[(1, hhmm)].astype(np.float64) * STANDARD_GRAVITY).astype(np.float32))
    assert not np.array_equal(x, open_source([path], ["z500"], member=2).read(0, 2)[:, 0])
    with pytest.raises(DataError, match=r"ens.grib2: member 7 not found; .*'number' holds members \[1, 2, 3\]"):
        open_source([path], ["z500"], member=7)
    # IFS ensembles: control (cf, number 0) and perturbed (pf) forecasts in one file
    both = _ensemble_file(tmp_path / "cfpf.grib2", [0, 1, 2], control=True)
    with pytest.raises(DataError, match=r"'number' has 3 members \[0, 1, 2\]"):
        open_source([both], ["z500"])
    dec = _decoded(both, "number", "dataTime")
    for m in (0, 2):
        x = open_source([both], ["z500"], member=m).read(0, 1)[0, 0]
        assert np.array_equal(x, (dec[(m, 0)].astype(np.float64) * STANDARD_GRAVITY).astype(np.float32))
    # a deterministic file asked for a member
    files = write_grib(tmp_path / "det.grib2", [("regular_ll_pl_grib2", dict(_grid_keys(), **_date_keys(TIMES[0]),
                   shortName="z", typeOfLevel="isobaricInhPa", level=500), np.zeros((NJ, NI)))])
    with pytest.raises(DataError, match=r"det.grib2: member 1 requested but the file has no ensemble dimension"):
        open_source([files], ["z500"], member=1)


def test_member_for_netcdf(tmp_path):
    """--member works for netCDF too (grid.standardize): refused without it, selected with it."""
    x = np.random.default_rng(3).normal(size=(3, 2, NJ, NI)).astype(np.float32) + 280.0
    ds = xr.Dataset({"t2m": (("number", "valid_time", "latitude", "longitude"), x, {"units": "K"})},
                    coords={"number": [0, 1, 2], "valid_time": TIMES[:2], "latitude": LAT, "longitude": LON})
    path = str(tmp_path / "ens.nc")
    ds.to_netcdf(path)
    with pytest.raises(DataError, match=r"ens.nc: ensemble dimension 'number' has 3 members"):
        open_source([path], ["t2m"])
    assert np.array_equal(open_source([path], ["t2m"], member=2).read(0, 2)[:, 0], x[2])
    with pytest.raises(DataError, match=r"member 5 not found; ensemble dimension 'number' holds members \[0, 1, 2\]"):
        open_source([path], ["t2m"], member=5)


def test_hourly_tp_summed_into_six_hour_accumulations(tmp_path):
    """ERA5 hourly tp in GRIB: forecasts from 06/18 UTC, steps 1..12, each the hour ending at its valid time."""
    rng = np.random.default_rng(4)
    start = np.datetime64("2021-03-01T18:00")
    tp, t2m = [], []
    for run in (start, start + 12 * HOUR, start + 24 * HOUR):
        for s in range(1, 13):
            keys = dict(_grid_keys(), **_date_keys(run), shortName="tp", stepType="accum", startStep=s - 1, endStep=s)
            tp.append(("regular_ll_sfc_grib1", keys, rng.gamma(0.5, 2e-4, (NJ, NI))))
    for h in range(0, 37):  # hourly analyses of 2t from 18 UTC: its 18 UTC stamp is trimmed
        t = start + h * HOUR
        t2m.append(("regular_ll_sfc_grib1", dict(_grid_keys(), **_date_keys(t), shortName="2t"),
                    rng.normal(280.0, 5.0, (NJ, NI))))
    f_tp = write_grib(tmp_path / "tp.grib", tp)
    f_t2m = write_grib(tmp_path / "t2m.grib", t2m)
    src = open_source([f_t2m, f_tp], ["t2m", "tp"])
    # 6 h windows complete from 19 UTC: stamps 00 UTC 2 March ... 06 UTC 3 March
    stamps = np.datetime64("2021-03-02T00:00") + np.arange(6) * 6 * HOUR
    assert np.array_equal(src.times, stamps.astype("datetime64[ns]"))
    x = src.read(0, len(stamps))
    d_tp, d_t = _vt_keys(f_tp), _vt_keys(f_t2m)
    for i, t in enumerate(stamps):
        acc = sum(d_tp[("tp", 0, _valid(t - k * HOUR))].astype(np.float64) for k in range(6))
        assert np.array_equal(x[i, 1], acc.astype(np.float32))
        assert np.array_equal(x[i, 0], d_t[("2t", 0, _valid(t))])
    assert "1 step(s) dropped" in src.attrs["time_trimmed"]


def test_single_time_file_has_a_time_axis(tmp_path):
    path = write_grib(tmp_path / "one.grb2", [("regular_ll_sfc_grib2", dict(_grid_keys(), **_date_keys(TIMES[0]),
                  shortName="msl", typeOfLevel="meanSea"), np.full((NJ, NI), 101325.0))])
    src = open_source([path], ["msl"])
    assert src.shape == (1, 1, NJ, NI) and src.times[0] == TIMES[0]
    np.testing.assert_allclose(src.read(0, 1), 101325.0)


def test_bad_input_names_the_file(era5, tmp_path):
    files, _, _ = era5
    fake = tmp_path / "fake.grib"
    fake.write_text("this is not GRIB at all\n")
    with pytest.raises(DataError, match=r"fake.grib: not a GRIB file"):
        open_source([str(fake)], ["t2m"])
    data = open(files[2], "rb").read()
    cut = tmp_path / "cut.grib"
    cut.write_bytes(data[: len(data) // 2 + 100])  # ends inside a message
    with pytest.raises(DataError, match=r"cut.grib: cannot read as GRIB .*truncated"):
        open_source([str(cut)], ["t2m"])
    with pytest.raises(DataError, match=r"missing.grib: file not found"):
        open_source([str(tmp_path / "missing.grib")], ["t2m"])
    with pytest.raises(DataError, match=r"channel q850 .*not found in any source file.*era5_pl_0.grib"):
        open_source(files, ["t2m", "q850"])
    with pytest.raises(DataError, match=r"level 700 hPa missing .*levels present: \[500.0, 850.0, 1000.0\]"):
        open_source(files, ["z700"])
    twice = tmp_path / "twice.grib"
    twice.write_bytes(data + data)  # the same download concatenated twice
    with pytest.raises(DataError, match=r"twice.grib: no usable GRIB hypercube.*'t2m': 8 GRIB messages for 4 distinct"):
        open_source([str(twice)], ["t2m"])
    # prepare: the same error, nothing left behind
    out = tmp_path / "o" / "s.zarr"
    with pytest.raises(DataError, match="fake.grib"):
        prepare([str(fake)], out, channels=["t2m"], progress=False)
    assert not out.exists()


def test_detection_by_name_and_content(era5, tmp_path):
    files, _, _ = era5
    data = open(files[2], "rb").read()
    for name in ("analysis.dat", "download.nc", "noext", "x.grb", "x.grib1", "x.grib2", "x.grb2"):
        p = tmp_path / "d" / name
        p.parent.mkdir(exist_ok=True)
        p.write_bytes(data)
        assert detect_kind(str(p)) == "grib", name
    (tmp_path / "d" / "README.txt").write_text("notes")
    one = tmp_path / "one"
    one.mkdir()
    (one / "sfc").write_bytes(data)  # no extension: found by its content
    (one / "README.txt").write_text("notes")
    src = open_source([str(one)], ["t2m", "msl"])
    assert src.shape[:2] == (len(TIMES), 2)
    assert json.loads(src.attrs["source_files"]) == [str(one / "sfc")]
    with pytest.raises(DataError, match=r"cannot tell the source format; .*GRIB \(\*\.grib"):
        detect_kind(str(tmp_path / "d" / "README.txt"))
    with pytest.raises(DataError, match="mixed source formats"):
        open_source([str(tmp_path / "d" / "x.grb"), str(tmp_path / "d" / "other.nc")], ["t2m"])


class _CountingLock:
    """A non-reentrant lock that counts its holders and fails (rather than hangs) on a deadlock."""

    def __init__(self):
        self._lock, self.n = threading.Lock(), 0

    def __enter__(self):
        if not self._lock.acquire(timeout=60):
            raise RuntimeError("lock not released in 60 s (re-entered?)")
        self.n += 1

    def __exit__(self, *exc):
        self._lock.release()


def test_threaded_reads_are_serialised_and_agree(era5, monkeypatch):
    files, _, _ = era5
    from fcn_jax.data.readers import grib

    assert grib.grib_lock() is cfgrib.xarray_plugin.ECCODES_LOCK  # shared with every cfgrib user
    lock = _CountingLock()
    monkeypatch.setattr(grib, "grib_lock", lambda: lock)
    src = open_source(files, ERA5_CHANNELS)
    n_open = lock.n
    assert n_open == len(files)  # each file's scan
    ref = src.read(0, len(TIMES))
    assert lock.n > n_open  # cfgrib takes the same lock around every read

    def work(i):
        if i % 5 == 0:  # opening (scanning a file) while other threads read
            open_source(files[:1], ["z500"])
        t0 = i % len(TIMES)
        return t0, src.read(t0, len(TIMES))

    with cf.ThreadPoolExecutor(6) as pool:
        for t0, x in pool.map(work, range(30), timeout=120):
            assert np.array_equal(x, ref[t0:])


def test_cli_member_option(tmp_path, capsys):
    path = _ensemble_file(tmp_path / "ens.grib2", [1, 2, 3])
    out = tmp_path / "s.zarr"
    assert data_main([path, "--out", str(out), "--channels", "z500", "--quiet"]) == 2
    assert "'number' has 3 members" in capsys.readouterr().err and not out.exists()
    assert data_main([path, "--out", str(out), "--channels", "z500", "--member", "2",
                      "--kind", "grib", "--quiet"]) == 0
    ds = open_store(out)
    assert ds.attrs["ensemble_member"] == 2 and ds.attrs["source_kind"] == "grib"
    ref = open_source([path], ["z500"], member=2).read(0, 2)
    assert np.array_equal(ds["fields"].values, ref)


# ------------------------------------------------------------------ a real ERA5 GRIB file
REAL_ERA5 = os.path.join(os.path.dirname(__file__), "fixtures", "era5-levels-members.grib")


def test_real_era5_grib_prepares_like_its_netcdf_conversion(tmp_path):
    """ECMWF's ERA5 sample (10 EDA members, z/t at 500/850 hPa, 12-hourly, 3 deg): prepare on the GRIB
    equals prepare on cfgrib's netCDF conversion of it; the ensemble is refused naming 'number'."""
    chans = ["z500", "t500", "z850", "t850"]
    with pytest.raises(DataError, match=r"'number' has 10 members"):
        open_source(REAL_ERA5, chans)
    conv = tmp_path / "era5-levels-members.nc"
    ds = xr.open_dataset(REAL_ERA5, engine="cfgrib", backend_kwargs={"indexpath": ""})
    ds.to_netcdf(conv)
    ref = ds.sel(number=3)
    ds.close()
    a = open_store(prepare([REAL_ERA5], tmp_path / "grib.zarr", channels=chans, member=3, progress=False))
    b = open_store(prepare([str(conv)], tmp_path / "nc.zarr", channels=chans, member=3, progress=False))
    assert a.sizes["time"] == 4 and a.sizes["lat"] == 61 and a.sizes["lon"] == 120
    assert a.attrs["time_step_hours"] == 12.0
    for v in ("fields", "mean", "std", "time_mean"):
        np.testing.assert_array_equal(a[v].values, b[v].values, err_msg=v)
    # the values are the file's: member 3, z500 at every time (cfgrib's own decoding)
    np.testing.assert_array_equal(a["fields"].sel(channel="z500").values,
                                  ref["z"].sel(isobaricInhPa=500).values.astype(np.float32))
    assert 4.5e4 < float(a["mean"].sel(channel="z500")) < 6e4  # geopotential, m2 s-2
