"""``python -m fcn_jax.evaluate``: score a forecast file against the truth and the baselines.

    python -m fcn_jax.evaluate FORECAST --truth SOURCE --out DIR \\
        [--climatology SPEC ...] [--baselines persistence,climatology] [--convention fcn|wb2] \\
        [--member N] [--regrid]

``FORECAST``: any file in the forecast layout of :mod:`fcn_jax.inference.files`
(dims ``(init_time, lead_time, [member], lat, lon)``, one variable per
channel, physical units), also one made elsewhere; ``valid_time`` is derived
from ``init_time + lead_time`` when absent.

``--truth SOURCE``: where the truth at every valid time and the persistence
forecast (the truth at ``init_time``, at every lead) come from -- anything
:func:`fcn_jax.data.analysis.open_analysis` reads: a prepared store,
``world``, a NetCDF/zarr file in fcn_jax's layout, the original FourCastNet
HDF5 year files (``2018.h5``), CDS netCDF, a WeatherBench 2 zarr (path or URL)
or GRIB. It is fitted to the forecast's grid as the original does it (an
ERA5 721-row source gives its first 720 rows to a 720-row forecast); any other
grid is an error naming both grids, unless ``--regrid`` (bilinear). ``--member
N`` picks one member of an ensemble truth file.

``--climatology SPEC`` (repeatable; each channel is taken from the first
source that has it) -- the climatology of ACC and of the climatology baseline:

* a model package (or a run directory): its ``climatology.nc``;
* a prepared store: its ``time_mean`` (and ``clim_doy_hour``);
* the original's ``time_means.npy``, shape ``(1, 21, H, W)`` (channels in
  :data:`fcn_jax.data.channels.FCN_HDF5_LAYOUT`) or ``(1, 1, H, W)``
  (precipitation, ``tp``); the grid is taken to be the original's (latitude 90
  -> -90 with both poles, longitude from 0) and fitted like the truth (721 rows
  -> the first 720); an array already of the forecast's ``H x W`` is used as is;
* a WeatherBench 2 climatology zarr (path or URL; dims ``(hour, dayofyear,
  [level,] longitude, latitude)`` in any order, ERA5 long names, levels in hPa),
  read slot by slot at the valid times (never all 366 days at once) and
  regridded bilinearly when its grid differs (as ``prepare --climatology``
  imports it).

Without ``--climatology``: the truth if it is a store, else the climatology of
the model package named in the forecast file's ``model`` attribute (and
``precip_model`` for ``tp``), else an error asking for ``--climatology``.
Which source and which kind served each channel is recorded in the scores'
``climatology`` attribute.

Writes ``DIR/scores.nc`` with data variables over ``(system, channel,
lead_time)`` -- ``system`` holds ``model`` and each baseline (select with
``scores.rmse.sel(system="model")``), ``channel`` the channel names:

* ``rmse`` -- latitude-weighted RMSE, physical units; for an ensemble, of the
  ensemble mean;
* ``acc`` -- anomaly correlation against the climatology (not re-centred);
  the climatology baseline has no anomaly, so its correlation is undefined:
  reported as 0 (no skill), the conventional value;
* ``bias`` (forecast - truth) and ``mae``, area means, physical units;
* for ensembles: ``crps`` (fair estimator; a deterministic forecast is a
  one-member ensemble, so the baselines' CRPS is their MAE), ``spread``
  (sqrt of the IC-mean area-mean member variance, ddof 1),
  ``ensemble_mean_rmse`` (sqrt of the IC-mean MSE of the ensemble mean) and
  ``spread_skill`` = spread / ensemble_mean_rmse (WeatherBench 2's ratio); the
  baselines have NaN there.

plus ``DIR/scores.csv`` (long format, ``lead_time_hours``) and plots: scores
against lead time, spread-skill and rank histogram (ensembles), and maps of
forecast, truth and error.

Conventions (``--convention``):

* ``fcn`` (FourCastNet, ``inference/inference.py``): per IC, RMSE = sqrt of the
  latitude-weighted mean squared error of the normalised fields x std and ACC =
  sum w a_f a_o / sqrt(sum w a_f^2 sum w a_o^2) with anomalies against the
  climatology's time mean (not re-centred); then the mean over ICs. Latitude
  weights ``cos(lat)``, with the original's assumed-pole-row quirk when the grid
  starts at 90 deg (:func:`fcn_jax.metrics.lat_weights`). With the original's
  ``time_means.npy`` and truth this gives ``inference.py``'s numbers.
* ``wb2`` (WeatherBench 2): RMSE = sqrt of the IC-mean MSE; ACC and the
  climatology baseline use the day-of-year x hour climatology at the valid
  time when the source has one (a WB2 zarr always does; otherwise the time
  mean, stated in the ``climatology`` attribute); cell-area latitude weights.

Normalisation. Scores are computed on normalised fields (better conditioned in
float32) and scaled back by the channel std; ACC does not depend on it, RMSE
only through float32 rounding. Each channel's mean/std come from the first of:
the model package named in the forecast's ``model`` (``precip_model`` for
``tp``) attribute, a model package given as ``--climatology``, the truth if it
is a store, a store given as ``--climatology``; else they are estimated from
the truth at the first initial condition's valid times (up to 8 fields). The
``normalisation`` attribute says which.
"""

from __future__ import annotations

import argparse
import io
import os
import sys
import time
from pathlib import Path
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from fcn_jax import cli, metrics
from fcn_jax.files import atomic_write
from fcn_jax.inference.files import ForecastError, channel_units, forecast_channels, read_forecast
from fcn_jax.normalize import Normalizer

__all__ = [
    "DEFAULT_CHANNELS",
    "BASELINES",
    "evaluate_forecast",
    "format_table",
    "write_scores",
    "initial_condition_starts",
    "open_climatology",
    "main",
]

#: Channels shown by default in tables and plots, in order, when present.
DEFAULT_CHANNELS: tuple[str, ...] = ("z500", "t850", "t2m", "u10", "v10", "msl", "sp", "tcwv", "r500", "tp")

#: Leads (hours) shown by default in the table: 6 h, 1, 2, 3 and 5 days.
DEFAULT_LEADS_H: tuple[int, ...] = (6, 24, 48, 72, 120)

BASELINES: tuple[str, ...] = ("persistence", "climatology")

_DET = ("mse", "acc", "bias", "mae")

#: Truth fields (at the first IC's valid times) from which mean/std are estimated when nothing provides them.
_N_ESTIMATE = 8


def initial_condition_starts(n_times: int, prediction_length: int, stride: int, num_ics: int = 0) -> np.ndarray:
    """IC start indices of the original: ``range(0, n_times - prediction_length, stride)``.

    The exclusive stop reproduces ``inference.py`` (the last start that would
    still fit is never used). ``num_ics > 0`` keeps the first ``num_ics``.
    """
    starts = np.arange(0, max(n_times - prediction_length, 0), stride)
    return starts[:num_ics] if num_ics > 0 else starts


# --------------------------------------------------------------------------- #
# Per-IC scores (one jitted function per chunk shape)
# --------------------------------------------------------------------------- #


@jax.jit
def _det_scores(pred, truth, clim, w):
    """``{mse, acc, bias, mae}`` each ``[ic, lead, channel]``; fields ``[ic, lead, lat, lon, channel]`` (pred/clim broadcast)."""
    pred, truth = jnp.broadcast_arrays(pred, truth)
    return {
        "mse": metrics.weighted_mse(pred, truth, w),
        "acc": metrics.weighted_acc(pred, truth, clim, w),
        "bias": metrics.weighted_bias(pred, truth, w),
        "mae": metrics.weighted_mae(pred, truth, w),
    }


@jax.jit
def _ens_scores(members, truth, clim, w):
    """Ensemble ``members [ic, lead, member, lat, lon, channel]`` vs ``truth [ic, lead, lat, lon, channel]``."""
    out = _det_scores(jnp.mean(members, axis=2), truth, clim, w)
    out["crps"] = metrics.weighted_crps(members, truth, w, axis=2, estimator="fair")
    out["var"] = metrics.ensemble_variance(members, w, axis=2)
    out["rank"] = jnp.sum(metrics.rank_counts(members, truth, axis=2), axis=0)  # [lead, channel, M+1]
    return out


def _weights(lat, convention: str) -> np.ndarray:
    lat = np.asarray(lat, np.float64)
    if convention == "wb2":
        return metrics.lat_weights(lat, scheme="wb2")
    # FourCastNet's assumed-pole-row weights only where the grid really starts at a pole
    scheme = "fcn" if abs(abs(lat[0]) - 90.0) < 1e-6 else "cos"
    return metrics.lat_weights(lat, scheme=scheme)


def _ts(t) -> str:
    return str(np.datetime64(t, "s"))


# --------------------------------------------------------------------------- #
# Climatology sources (--climatology), fitted to the forecast grid
# --------------------------------------------------------------------------- #

_CLIM_KINDS = ("a model package or run directory, a prepared store, the original's time_means.npy, or a "
               "WeatherBench 2 climatology zarr (path or URL)")


class _Climatology:
    """One climatology source on the forecast grid.

    ``label`` (for messages and attrs), ``channels`` (what it provides),
    ``has_doy`` (a day-of-year x hour climatology), ``grid_note``, ``package`` /
    ``store`` when it is one. :meth:`time_mean` ``-> [lat, lon, c]`` and
    :meth:`at` ``(times) -> [n, lat, lon, c]`` give float32 physical values.
    """

    label = ""
    channels: list = []
    has_doy = False
    grid_note = ""
    package = None
    store = None

    def time_mean(self, chans) -> np.ndarray:
        raise NotImplementedError

    def _slots(self, pairs: np.ndarray, chans) -> np.ndarray:
        """``[u, lat, lon, c]`` at unique (dayofyear, hour) ``pairs [u, 2]``."""
        raise NotImplementedError

    def at(self, times, chans) -> np.ndarray:
        """The day-of-year x hour climatology at ``times`` (the time mean when there is none)."""
        from fcn_jax.data.stats import day_of_year_and_hour

        times = np.asarray(times, "datetime64[ns]").reshape(-1)
        if not self.has_doy:
            tm = self.time_mean(chans)
            return np.broadcast_to(tm[None], (times.size,) + tm.shape)
        doy, hour = day_of_year_and_hour(times)
        uniq, inv = np.unique(np.stack([doy, hour], 1), axis=0, return_inverse=True)
        return self._slots(uniq, chans)[np.asarray(inv).reshape(-1)]

    @staticmethod
    def _positions(values, wanted, what: str, where: str) -> np.ndarray:
        values = [int(v) for v in np.asarray(values).reshape(-1)]
        missing = sorted({int(w) for w in wanted} - set(values))
        if missing:
            raise _data_error(f"{where}: {what} {missing} of the valid times not in the climatology "
                              f"(it has {what} {values[:8]}{' ...' if len(values) > 8 else ''})")
        return np.asarray([values.index(int(w)) for w in wanted], np.int64)


def _data_error(msg):
    from fcn_jax.data.errors import DataError

    return DataError(msg)


class _XarrayClimatology(_Climatology):
    """A store's or a package's ``time_mean (channel, lat, lon)`` [+ ``clim_doy_hour (dayofyear, hour, ...)``]."""

    def __init__(self, ds, label, lat, lon, *, regrid, model, package=None, store=None):
        from fcn_jax.data.analysis import fit_grid

        if "time_mean" not in ds or "channel" not in ds["time_mean"].dims:
            raise _data_error(f"{label}: no time_mean (channel, lat, lon) variable; it has "
                              f"{sorted(map(str, ds.data_vars))}")
        self.ds, self.label, self.package, self.store = ds, label, package, store
        self.channels = [str(c) for c in ds["channel"].values]
        self.has_doy = "clim_doy_hour" in ds
        self.fit = fit_grid(ds["lat"].values, ds["lon"].values, lat, lon, regrid=regrid, where=label, model=model)
        self.grid_note = self.fit.note
        self._tm = {}

    def time_mean(self, chans):
        key = tuple(chans)
        if key not in self._tm:
            ci = [self.channels.index(c) for c in chans]
            x = self.ds["time_mean"].isel(channel=ci).transpose("lat", "lon", "channel").values
            self._tm[key] = self.fit(np.asarray(x, np.float32)[None])[0]
        return self._tm[key]

    def _slots(self, pairs, chans):
        import xarray as xr

        da = self.ds["clim_doy_hour"]
        d = self._positions(da["dayofyear"].values, pairs[:, 0], "day(s) of year", self.label)
        h = self._positions(da["hour"].values, pairs[:, 1], "hour(s)", self.label)
        ci = [self.channels.index(c) for c in chans]
        x = da.isel(dayofyear=xr.DataArray(d, dims="slot"), hour=xr.DataArray(h, dims="slot"), channel=ci)
        return self.fit(np.asarray(x.transpose("slot", "lat", "lon", "channel").values, np.float32))


class _NpyClimatology(_Climatology):
    """The original's ``time_means.npy``: ``(1, 21, H, W)`` or ``(1, 1, H, W)`` (tp), physical units."""

    def __init__(self, path, lat, lon, *, regrid, model):
        from fcn_jax.data.analysis import GridFit, fit_grid
        from fcn_jax.data.channels import FCN_HDF5_LAYOUT
        from fcn_jax.data.readers.grid import original_grid

        self.label = f"time means {path}"
        try:
            arr = np.load(path, mmap_mode="r")
        except Exception as e:  # noqa: BLE001 - any unreadable file: say which
            raise _data_error(f"{path}: cannot read as a .npy array ({type(e).__name__}: {e})") from e
        nlat, nlon = len(lat), len(lon)
        n_fcn = len(FCN_HDF5_LAYOUT)
        if arr.ndim != 4 or arr.shape[0] != 1 or arr.shape[1] not in (n_fcn, 1):
            raise _data_error(
                f"{path}: time means of shape {tuple(arr.shape)}; expected (1, {n_fcn}, H, W) with the original's "
                f"{n_fcn} channels (fcn_jax.data.channels.FCN_HDF5_LAYOUT) or (1, 1, H, W) for precipitation (tp), "
                f"H x W the original's grid of the forecast's {nlat} x {nlon}: (1, {n_fcn}, {nlat + 1}, {nlon}) "
                f"or (1, {n_fcn}, {nlat}, {nlon})")
        self.arr = arr
        if arr.shape[1] == 1:
            self.channels, self._index = ["tp"], [0]
        else:
            self._index = [i for i, n in enumerate(FCN_HDF5_LAYOUT) if n]
            self.channels = [FCN_HDF5_LAYOUT[i] for i in self._index]
        h, w = arr.shape[2:]
        if (h, w) == (nlat, nlon):
            self.fit = GridFit("identity", np.asarray(lat), np.asarray(lon), lambda x: x,
                               "taken to be on the forecast's grid (same shape)")
        else:  # the original's grid: 90 -> -90 with both poles, longitude from 0
            self.fit = fit_grid(*original_grid(h, w), lat, lon, regrid=regrid,
                                where=f"{path} (the original's grid, latitude 90 .. -90 with both poles)",
                                model=model)
        self.grid_note = self.fit.note
        self._tm = {}

    def time_mean(self, chans):
        key = tuple(chans)
        if key not in self._tm:
            idx = [self._index[self.channels.index(c)] for c in chans]
            x = np.stack([np.asarray(self.arr[0, i], np.float32) for i in idx], -1)  # [H, W, c]
            self._tm[key] = self.fit(x[None])[0]
        return self._tm[key]


class _WB2Climatology(_Climatology):
    """A WeatherBench 2 climatology zarr, read one (dayofyear, hour) slot at a time."""

    has_doy = True

    def __init__(self, path, chans, lat, lon, *, model):
        from fcn_jax.data.analysis import fit_grid
        from fcn_jax.data.climatology import WB2Climatology, linear_regrid
        from fcn_jax.data.errors import DataError

        self.label = f"WeatherBench 2 climatology {path}"
        try:
            self.src = src = WB2Climatology(path, self._known(chans), missing="skip")
        except DataError as e:
            raise DataError(f"--climatology {path}: not a model package, store or .npy, and not a WeatherBench 2 "
                            f"climatology zarr ({e}); expected {_CLIM_KINDS}") from e
        self.doys, self.hours = src.doys, np.asarray(src.hours)
        try:
            fit = fit_grid(src.lat, src.lon, lat, lon, where=self.label, model=model)
            self._fit = lambda x: fit(np.moveaxis(x, 1, -1))  # [n, C, slat, slon] -> [n, lat, lon, C]
            self.grid_note = fit.note
        except DataError:
            self._fit = lambda x: np.moveaxis(linear_regrid(x, src.lat, src.lon, lat, lon), 1, -1).astype(np.float32)
            self.grid_note = (f"bilinear interpolation from {src.lat.size} x {src.lon.size} (periodic in longitude, "
                              f"as prepare --climatology imports it)")
        self.channels = list(src.vars)
        self._tm = {}

    @staticmethod
    def _known(chans):
        """The catalogue's channels among ``chans`` (a name it does not know has no WB2 variable)."""
        from fcn_jax.data.channels import get_channel
        from fcn_jax.data.errors import DataError

        out = []
        for c in chans:
            try:
                out.append(get_channel(c))
            except DataError:
                pass
        return out

    def _read(self, name, **isel) -> np.ndarray:
        return self.src.read(name, **isel)

    def _slots(self, pairs, chans):
        d = self._positions(self.doys, pairs[:, 0], "day(s) of year", self.label)
        h = self._positions(self.hours, pairs[:, 1], "hour(s)", self.label)
        x = np.stack([np.stack([self._read(c, dayofyear=int(a), hour=int(b)) for c in chans]) for a, b in zip(d, h)])
        return self._fit(x)  # [u, C, slat, slon] -> [u, lat, lon, C]

    def time_mean(self, chans):
        # the mean over every (dayofyear, hour) slot, accumulated in blocks of days of at most ~256 MB
        per_day = self.hours.size * self.src.lat.size * self.src.lon.size * 8
        block = int(max(1, (1 << 28) // per_day))
        for c in chans:
            if c not in self._tm:
                acc = 0.0
                for k in range(0, self.doys.size, block):
                    acc = acc + self._read(c, dayofyear=slice(k, k + block)).sum(axis=(0, 1))  # [slat, slon]
                self._tm[c] = self._fit((acc / (self.doys.size * self.hours.size))[None, None])[0, ..., 0]
        return np.stack([self._tm[c] for c in chans], -1).astype(np.float32)


def _is_package(p: Path) -> bool:
    return any((d / "model.json").is_file() for d in (p, p / "model_best", p / "model_final"))


def open_climatology(spec, chans, lat, lon, *, regrid: bool = False, model: str = "the forecast",
                     package=None) -> _Climatology:
    """A climatology source (see the module doc) for ``chans`` on the grid ``lat``/``lon``."""
    import xarray as xr

    from fcn_jax.data.analysis import is_store
    from fcn_jax.data.errors import DataError

    s = str(spec)
    remote = "://" in s
    if s == "world":
        from fcn_jax.data.catalog import resolve_store

        s = str(resolve_store("world"))
    p = Path(s)
    if not remote and not p.exists():
        raise DataError(f"--climatology {s}: not found; expected {_CLIM_KINDS}")
    if not remote and p.is_dir() and _is_package(p):
        from fcn_jax.checkpoints.package import CLIMATOLOGY_FILE, read_package

        pkg = package or read_package(p)
        ds = pkg.climatology()
        if ds is None:
            raise DataError(f"--climatology {s}: the model package {pkg.path} has no {CLIMATOLOGY_FILE}")
        return _XarrayClimatology(ds, f"model package {pkg.path} ({CLIMATOLOGY_FILE})", lat, lon, regrid=regrid,
                                  model=model, package=pkg)
    if s.lower().endswith(".npy"):
        return _NpyClimatology(s, lat, lon, regrid=regrid, model=model)
    if not remote and p.is_dir() and is_store(s):
        from fcn_jax.data.store import open_store

        return _XarrayClimatology(open_store(s), f"store {s}", lat, lon, regrid=regrid, model=model, store=s)
    if not remote and p.is_file():
        try:
            ds = xr.open_dataset(s)
        except Exception as e:  # noqa: BLE001
            raise DataError(f"--climatology {s}: cannot open ({type(e).__name__}: {e}); expected {_CLIM_KINDS}") \
                from e
        return _XarrayClimatology(ds, s, lat, lon, regrid=regrid, model=model)
    return _WB2Climatology(s, chans, lat, lon, model=model)


def _forecast_packages(fc, notes: list) -> dict:
    """The model packages named in the forecast's ``model`` / ``precip_model`` attributes that can be read."""
    from fcn_jax.checkpoints.package import read_package

    out = {}
    for key in ("model", "precip_model"):
        v = fc.attrs.get(key)
        if not v or str(v) in ("None", "none"):
            continue
        try:
            out[key] = read_package(str(v))
        except Exception as e:  # noqa: BLE001 - only a default: say why it was skipped
            notes.append(f"the forecast's {key} {v} could not be read ({type(e).__name__}: {e})")
    return out


def _package_stats(pkg) -> dict:
    stats = {}
    if pkg.mean is not None and pkg.std is not None:
        stats.update({c: (float(m), float(s)) for c, m, s in zip(pkg.channels, pkg.mean, pkg.std)})
    pr = pkg.precip or {}
    if "tp_mean" in pr and "tp_std" in pr:
        stats.setdefault("tp", (float(pr["tp_mean"]), float(pr["tp_std"])))
    return stats


def _store_stats(store) -> dict:
    from fcn_jax.data.store import StoreInfo

    info = StoreInfo.read(store)
    return {c: (float(m), float(s)) for c, m, s in zip(info.channels, info.mean, info.std)}


# --------------------------------------------------------------------------- #
# Evaluation of a file
# --------------------------------------------------------------------------- #


def evaluate_forecast(forecast, truth, out=None, *, baselines: Sequence[str] = BASELINES, convention: str = "fcn",
                      channels: Sequence[str] | None = None, climatology=None, member: int | None = None,
                      regrid: bool = False, plots: bool = True, max_chunk_bytes: int = 1 << 29,
                      progress: bool = False, also=None):
    """Score ``forecast`` (path or Dataset in the forecast layout) against ``truth``.

    ``truth``: a store, ``world`` or any source of
    :func:`~fcn_jax.data.analysis.open_analysis` (``member``: one member of an
    ensemble truth file; ``regrid``: interpolate a truth or climatology on
    another grid). ``climatology``: one spec or a list (see the module doc;
    default: the truth store, else the forecast model's package). ``also``:
    ``{name: forecast}`` of other systems scored in the same call against the
    same truth, climatology and normalisation (e.g. the world's twin as the
    ceiling, another model); each needs the forecast's initial times, leads,
    grid and channels (an ensemble counts by its mean).

    Returns the scores ``xarray.Dataset`` (see the module doc); with ``out``
    also writes ``scores.nc``, ``scores.csv``, ``rank_histogram.nc`` (ensembles)
    and the plots there. Everything is checked before any score is computed
    and nothing is written on error. ``max_chunk_bytes`` bounds the forecast
    slice held in memory: as many ICs, leads and channels at once as fit (every
    score is per channel), or, when one lead of one channel of all members is
    larger, that much; the scoring holds a few copies of the slice (normalised,
    sorted members for the CRPS), so memory stays a small multiple of it
    however large the ensemble file (``--chunk-mb``).
    """
    from fcn_jax.data.errors import DataError

    if convention not in ("fcn", "wb2"):
        raise ForecastError(f"--convention must be 'fcn' or 'wb2', got {convention!r}")
    bad = [b for b in baselines if b not in BASELINES]
    if bad:
        raise ForecastError(f"--baselines {bad} unknown; choose from {list(BASELINES)}")
    t0 = time.perf_counter()
    path = forecast if isinstance(forecast, (str, Path)) else "forecast"
    fc = read_forecast(forecast) if isinstance(forecast, (str, Path)) else forecast
    have = forecast_channels(fc)
    if channels is not None:
        missing = [c for c in channels if c not in have]
        if missing:
            raise ForecastError(f"{path}: channels {missing} not in the forecast; it has {have}")
        have = list(channels)
    others = {}
    for name, other in dict(also or {}).items():
        if name in ("model", *BASELINES):
            raise ForecastError(f"--also {name}=...: the name {name!r} is taken; choose another")
        ofc = read_forecast(other) if isinstance(other, (str, Path)) else other
        for coord in ("init_time", "lead_time", "lat", "lon"):
            if ofc.sizes.get(coord) != fc.sizes.get(coord) or not np.array_equal(ofc[coord].values, fc[coord].values):
                raise ForecastError(f"--also {name}={other}: its {coord} ({ofc.sizes.get(coord)} values) is not the "
                                    f"forecast's ({fc.sizes.get(coord)}); both must cover the same initial times, "
                                    f"leads and grid")
        missing = [c for c in have if c not in ofc.data_vars]
        if missing:
            raise ForecastError(f"--also {name}={other}: channels {missing} are not in it")
        others[str(name)] = ofc
    try:
        setup = _setup(fc, path, list(have), truth, climatology, baselines, convention, member, regrid)
    except DataError as e:
        raise ForecastError(str(e)) from e
    setup["others"] = others
    return _score(fc, path, setup, baselines, convention, out, plots, max_chunk_bytes, progress, t0)


def _setup(fc, path, chans, truth, climatology, baselines, convention, member, regrid) -> dict:
    """Everything checked and opened before the first score: truth, indices, climatology, normalisation."""
    from fcn_jax.data.analysis import open_analysis
    from fcn_jax.data.errors import DataError

    lat, lon = fc["lat"].values, fc["lon"].values
    model = f"the forecast {path}"
    try:
        an = open_analysis(truth, chans, lat=lat, lon=lon, regrid=regrid, member=member, model=model)
    except DataError as e:
        raise DataError(str(e) if str(truth) in str(e) else f"--truth {truth}: {e}") from e
    init = fc["init_time"].values.astype("datetime64[ns]")
    lead = fc["lead_time"].values.astype("timedelta64[ns]")
    valid = init[:, None] + lead[None, :]
    lead_h = lead / np.timedelta64(1, "h")

    def what_valid(v):
        i, j = np.argwhere(valid == v)[0]
        return f"{path}: valid time of lead {lead_h[j]:g} h from init {_ts(init[i])} (past the end of the data?):"

    vidx = an.index(valid, what=what_valid)
    iidx = an.index(init, what=lambda v: f"{path}: init_time") if "persistence" in baselines else None

    # climatology: explicit specs, else the truth store, else the forecast model's package
    notes: list[str] = []
    fc_pkgs = _forecast_packages(fc, notes)
    specs = [climatology] if isinstance(climatology, (str, os.PathLike)) else list(climatology or [])
    clims = [open_climatology(s, chans, lat, lon, regrid=regrid, model=model) for s in specs]
    if not specs:
        if an.store is not None:
            clims = [open_climatology(an.store, chans, lat, lon, regrid=regrid, model=model)]
        else:
            clims = [open_climatology(p.path, chans, lat, lon, regrid=regrid, model=model, package=p)
                     for p in fc_pkgs.values() if p.has_climatology]
            if not clims:
                named = fc.attrs.get("model")
                why = (f"the forecast's model {named} has no climatology.nc" if named and "model" in fc_pkgs else
                       "; ".join(notes) if notes else "the forecast file names no model package")
                raise DataError(f"{path}: no climatology for ACC and the climatology baseline: the truth {truth} "
                                f"is not a prepared store and {why}; pass --climatology SPEC ({_CLIM_KINDS})")
    use: dict[int, list[int]] = {}
    missing = []
    for k, c in enumerate(chans):
        j = next((j for j, cl in enumerate(clims) if c in cl.channels), None)
        if j is None:
            missing.append(c)
        else:
            use.setdefault(j, []).append(k)
    if missing:
        have = "; ".join(f"{cl.label} has {cl.channels}" for cl in clims)
        raise DataError(f"{path}: no climatology for channel(s) {missing} ({have}); pass --climatology with a "
                        f"source that has them ({_CLIM_KINDS})")
    doy = {j: convention == "wb2" and clims[j].has_doy for j in use}
    desc = []
    for j, ks in use.items():
        kind = ("day-of-year x hour climatology at the valid time" if doy[j] else
                "time mean" + (" (the source has no day-of-year x hour climatology)" if convention == "wb2" else ""))
        grid = "" if clims[j].grid_note.startswith("the source grid") else f"; grid: {clims[j].grid_note}"
        desc.append(f"{', '.join(chans[k] for k in ks)}: {clims[j].label}, {kind}{grid}")

    # normalisation: model packages, then stores, then an estimate from the truth
    sources = [(f"model package {p.path}", _package_stats(p)) for p in fc_pkgs.values()]
    sources += [(f"model package {cl.package.path}", _package_stats(cl.package)) for cl in clims if cl.package]
    if an.store is not None:
        sources.append((f"truth store {an.store}", _store_stats(an.store)))
    sources += [(f"store {cl.store}", _store_stats(cl.store)) for cl in clims if cl.store and cl.store != an.store]
    mean = np.zeros(len(chans), np.float64)
    std = np.ones(len(chans), np.float64)
    got: dict[str, list[str]] = {}
    todo = []
    for k, c in enumerate(chans):
        src = next(((label, st[c]) for label, st in sources if c in st), None)
        if src is None:
            todo.append(k)
            continue
        mean[k], std[k] = src[1]
        got.setdefault(src[0], []).append(c)
    if todo:
        n = min(_N_ESTIMATE, vidx.shape[1])
        x = np.asarray(an.read_index(vidx[0, :n]), np.float64)[..., todo]  # [n, lat, lon, len(todo)]
        m, s = x.mean(axis=(0, 1, 2)), x.std(axis=(0, 1, 2))
        s = np.where(np.isfinite(s) & (s > 0), s, np.maximum(np.abs(m), 1.0))
        mean[todo], std[todo] = m, s
        got[f"estimated from the truth at the first {n} valid time(s)"] = [chans[k] for k in todo]
    return {"an": an, "chans": chans, "init": init, "lead": lead, "valid": valid, "vidx": vidx, "iidx": iidx,
            "clims": clims, "use": use, "doy": doy, "mean": mean.astype(np.float32), "std": std.astype(np.float32),
            "clim_desc": "; ".join(desc), "norm_desc": "; ".join(f"{', '.join(v)}: {k}" for k, v in got.items()),
            "notes": notes}


def _score(fc, path, S, baselines, convention, out, plots, max_chunk_bytes, progress, t0):
    import xarray as xr

    an, chans, init, lead, valid = S["an"], S["chans"], S["init"], S["lead"], S["valid"]
    vidx, iidx, mean, std = S["vidx"], S["iidx"], S["mean"], S["std"]
    lead_h = lead / np.timedelta64(1, "h")
    ensemble = "member" in fc.dims
    n_mem = int(fc.sizes.get("member", 0))
    w = _weights(fc["lat"].values, convention)
    nlat, nlon = fc.sizes["lat"], fc.sizes["lon"]

    norm = Normalizer(mean, std).normalize  # x: [..., channel], scores in normalised units
    tmean = np.zeros((nlat, nlon, len(chans)), np.float32)
    for j, ks in S["use"].items():
        tmean[..., ks] = S["clims"][j].time_mean([chans[k] for k in ks])
    tmean_n = norm(tmean)
    any_doy = any(S["doy"].values())

    def clim_at(times):  # [n, lat, lon, ch] normalised
        x = np.broadcast_to(tmean, (len(times),) + tmean.shape).copy()
        for j, ks in S["use"].items():
            if S["doy"][j]:
                x[..., ks] = S["clims"][j].at(times, [chans[k] for k in ks])
        return norm(x)

    # Memory: the forecast is read in chunks of at most max_chunk_bytes -- ICs x leads x channels, every
    # score being per channel -- or, when one lead of one channel of all members is larger, that much.
    per_lead_ch = nlat * nlon * 4 * max(n_mem, 1)  # one lead, one channel, every member
    group = int(max(1, min(len(chans), max_chunk_bytes // per_lead_ch)))
    groups = [np.arange(k, min(k + group, len(chans))) for k in range(0, len(chans), group)]
    per_lead = per_lead_ch * group
    lc = int(max(1, min(len(lead), max_chunk_bytes // per_lead)))
    others = S.get("others", {})
    systems = ["model"] + list(others) + list(baselines)
    acc_store = {m: {k: np.zeros((len(init), len(lead), len(chans)), np.float64) for k in _DET} for m in systems}
    ens_store = {k: np.zeros((len(init), len(lead), len(chans)), np.float64) for k in ("crps", "var")}
    ranks = np.zeros((len(lead), len(chans), n_mem + 1), np.int64) if ensemble else None

    def read_truth(tidx, g):  # [n, lat, lon, ch of group g] normalised
        return norm(an.read_index(np.asarray(tidx).reshape(-1)))[..., g]

    n_init = len(init)
    ic_chunk = int(max(1, max_chunk_bytes // (per_lead * len(lead)))) if lc == len(lead) else 1
    chunks = [(g, i0, min(i0 + ic_chunk, n_init)) for g in groups for i0 in range(0, n_init, ic_chunk)]
    if progress:
        from tqdm.auto import tqdm

        chunks = tqdm(chunks, desc="evaluate")
    for g, i0, i1 in chunks:  # channel group x ICs [i0, i1) x leads in chunks of lc: one truth read per chunk
        n = i1 - i0
        norm_g = Normalizer(mean[g], std[g]).normalize
        pers = read_truth(iidx[i0:i1], g)[:, None] if iidx is not None else None  # [n, 1, lat, lon, ch]
        for l0 in range(0, len(lead), lc):
            sl = slice(l0, min(l0 + lc, len(lead)))
            L = sl.stop - sl.start
            f = np.stack([np.asarray(fc[chans[k]].isel(init_time=slice(i0, i1), lead_time=sl).values, np.float32)
                          for k in g], -1)
            f = norm_g(f)  # [n, L, (M), lat, lon, ch]
            y = read_truth(vidx[i0:i1, sl], g).reshape((n, L) + f.shape[-3:])  # [n, L, lat, lon, ch]
            if any_doy:
                clim = clim_at(valid[i0:i1, sl].reshape(-1))[..., g].reshape(y.shape)
            else:
                clim = tmean_n[None, None][..., g]
            res = jax.device_get(_ens_scores(f, y, clim, w) if ensemble else _det_scores(f, y, clim, w))
            for k in _DET:
                acc_store["model"][k][i0:i1, sl, g] = res[k]
            if ensemble:
                ens_store["crps"][i0:i1, sl, g] = res["crps"]
                ens_store["var"][i0:i1, sl, g] = res["var"]
                ranks[sl, g] += np.asarray(res["rank"], np.int64)
            for name, ofc in others.items():  # other systems: the same truth and normalisation
                fo = np.stack([np.asarray(ofc[chans[k]].isel(init_time=slice(i0, i1), lead_time=sl).values,
                                          np.float32) for k in g], -1)
                fo = norm_g(fo.mean(axis=2) if "member" in ofc[chans[g[0]]].dims else fo)
                ro = jax.device_get(_det_scores(fo, y, clim, w))
                for k in _DET:
                    acc_store[name][k][i0:i1, sl, g] = ro[k]
            for b in baselines:
                pred = pers if b == "persistence" else clim
                rb = jax.device_get(_det_scores(pred, y, clim, w))
                for k in _DET:
                    acc_store[b][k][i0:i1, sl, g] = rb[k]
    scores = _assemble(acc_store, ens_store if ensemble else None, systems, chans, lead, std, convention)
    scores.attrs.update({"n_ic": len(init), "convention": convention, "members": n_mem,
                         "lat_weights": "wb2 cell area" if convention == "wb2" else
                         ("fcn" if abs(abs(float(fc['lat'].values[0])) - 90) < 1e-6 else "cos"),
                         "forecast": str(path), "truth": str(an.store or an.where), "truth_grid": an.grid_note,
                         "climatology": S["clim_desc"], "normalisation": S["norm_desc"]})
    if S["notes"]:
        scores.attrs["notes"] = "; ".join(S["notes"])
    if out is not None:
        out = Path(out)
        write_scores(scores, out / "scores")
        if ensemble:
            rh = xr.Dataset({"rank_histogram": (("lead_time", "channel", "rank"), ranks)},
                            coords={"lead_time": lead, "channel": chans, "rank": np.arange(n_mem + 1)})
            atomic_write(out / "rank_histogram.nc", lambda tmp: rh.to_netcdf(tmp, engine="netcdf4"))
        if plots:
            from fcn_jax import plots as P

            show = [c for c in DEFAULT_CHANNELS if c in chans][:4] or chans[:4]
            P.plot_scores(scores, out / "scores_vs_lead.png", channels=show)
            if ensemble:
                P.plot_spread_skill(scores, out / "spread_skill.png", channels=show)
                P.plot_rank_histogram(ranks, lead, chans, out / "rank_histogram.png", channels=show)
            j = int(min(4, len(lead) - 1))  # 24 h at 6-hourly leads
            c = show[0]
            fmap = fc[c].isel(init_time=0, lead_time=j)
            if ensemble:
                fmap = fmap.mean("member")
            tmap = an.read_index([int(vidx[0, j])])[0, :, :, chans.index(c)]
            P.plot_map_triplet(np.asarray(fmap.values), np.asarray(tmap), fc["lat"].values,
                               fc["lon"].values, out / f"map_{c}.png",
                               title=f"{c}{' ensemble mean' if ensemble else ''}, init {init[0]}, lead "
                                     f"{lead_h[j]:g} h", units=channel_units([c])[0])
    if progress:
        print(f"scored {len(init)} ICs x {len(lead)} leads x {len(chans)} channels"
              f"{f' x {n_mem} members' if ensemble else ''} ({time.perf_counter() - t0:.1f} s)")
    return scores


def _named(pairs) -> dict[str, str]:
    out = {}
    for text in pairs:
        name, sep, path = text.partition("=")
        if not sep or not name or not path:
            raise ForecastError(f"--also {text!r}: give NAME=FORECAST, e.g. ceiling=twin.nc")
        out[name] = path
    return out


def _assemble(det, ens, systems, chans, lead, std, convention):
    """The scores Dataset from per-IC normalised sums ``[n_ic, lead, channel]``."""
    import xarray as xr

    std = np.asarray(std, np.float64)
    dims = ("system", "channel", "lead_time")

    def t(a):  # [system, lead, ch] -> [system, ch, lead]
        return np.swapaxes(np.asarray(a, np.float64), -1, -2).astype(np.float32)

    mse = np.stack([det[m]["mse"] for m in systems])  # [system, ic, lead, ch]
    rmse = np.sqrt(mse).mean(axis=1) * std if convention == "fcn" else np.sqrt(mse.mean(axis=1)) * std
    acc = np.stack([det[m]["acc"] for m in systems]).mean(axis=1)
    if "climatology" in systems:
        acc[systems.index("climatology")] = 0.0  # no anomaly: undefined correlation, reported as no skill
    data = {
        "rmse": (dims, t(rmse), {"long_name": "latitude-weighted RMSE" + (" of the ensemble mean" if ens else ""),
                                 "convention": "sqrt per IC, then mean" if convention == "fcn" else
                                 "sqrt of the IC-mean MSE"}),
        "acc": (dims, t(acc), {"long_name": "latitude-weighted anomaly correlation", "units": "1"}),
        "bias": (dims, t(np.stack([det[m]["bias"] for m in systems]).mean(axis=1) * std),
                 {"long_name": "area-mean forecast - truth"}),
        "mae": (dims, t(np.stack([det[m]["mae"] for m in systems]).mean(axis=1) * std),
                {"long_name": "area-mean absolute error"}),
    }
    if ens is not None:
        nan = np.full((len(lead), len(chans)), np.nan)
        crps = [ens["crps"].mean(axis=0) * std] + [det[m]["mae"].mean(axis=0) * std for m in systems[1:]]
        spread = np.sqrt(ens["var"].mean(axis=0)) * std
        em_rmse = np.sqrt(det["model"]["mse"].mean(axis=0)) * std
        with np.errstate(divide="ignore", invalid="ignore"):
            ssr = spread / em_rmse
        pad = [nan] * (len(systems) - 1)
        data.update({
            "crps": (dims, t(np.stack(crps)), {"long_name": "fair CRPS (baselines: one-member ensembles, = MAE)"}),
            "spread": (dims, t(np.stack([spread] + pad)), {"long_name": "sqrt of mean ensemble variance (ddof 1)"}),
            "ensemble_mean_rmse": (dims, t(np.stack([em_rmse] + pad)),
                                   {"long_name": "sqrt of the IC-mean MSE of the ensemble mean"}),
            "spread_skill": (dims, t(np.stack([ssr] + pad)),
                             {"long_name": "spread / ensemble_mean_rmse", "units": "1"}),
        })
    units = [u or "?" for u in channel_units(chans)]
    ds = xr.Dataset(data, coords={"system": ("system", systems), "channel": ("channel", chans),
                                  "lead_time": ("lead_time", np.asarray(lead, "timedelta64[ns]")),
                                  "units": ("channel", units)})
    for v in ("rmse", "bias", "mae", "crps", "spread", "ensemble_mean_rmse"):
        if v in ds:
            ds[v].attrs["units"] = "channel units (see the units coordinate)"
    return ds


# --------------------------------------------------------------------------- #
# Reporting
# --------------------------------------------------------------------------- #


def _hours(scores) -> np.ndarray:
    return scores["lead_time"].values / np.timedelta64(1, "h")


def _lead_label(h) -> str:
    h = float(h)
    return f"{int(h // 24)} d" if h >= 24 and h % 24 == 0 else f"{h:g} h"


def _fmt(x: float) -> str:
    if not np.isfinite(x):
        return "nan"
    return f"{x:.4g}" if abs(x) < 1e4 else f"{x:.0f}"


def format_table(scores, channels: Sequence[str] | None = None, leads_h: Sequence[float] = DEFAULT_LEADS_H) -> str:
    """Plain-text table: RMSE and ACC per system, and for ensembles CRPS per system and the spread-skill ratio."""
    names = [str(c) for c in scores.channel.values]
    channels = [c for c in (channels or DEFAULT_CHANNELS) if c in names] or names[:4]
    systems = [str(m) for m in scores.system.values]
    hours = list(_hours(scores))
    leads = [l for l in leads_h if float(l) in hours]
    units = dict(zip(names, map(str, scores.units.values))) if "units" in scores.coords else {}
    ens = "crps" in scores
    w = max(11, max(len(m) for m in systems) + 1)
    blocks = [("RMSE", "rmse"), ("ACC", "acc")] + ([("CRPS", "crps")] if ens else [])
    head1 = f"{'channel':<8} {'units':<10} {'lead':>5} | " + " | ".join(t.center(w * len(systems)) for t, _ in blocks)
    head2 = f"{'':<8} {'':<10} {'':>5} | " + " | ".join("".join(f"{m:>{w}}" for m in systems) for _ in blocks)
    if ens:
        head1 += " | " + "spread/skill".rjust(12)
        head2 += " | " + "model".rjust(12)
    lines = [head1, head2, "-" * len(head2)]
    for c in channels:
        for l in leads:
            j = hours.index(float(l))
            row = f"{c:<8} {units.get(c, ''):<10} {_lead_label(l):>5} | "
            cells = []
            for _, v in blocks:
                vals = scores[v].sel(channel=c).isel(lead_time=j)
                fmt = (lambda x: f"{x:.3f}") if v == "acc" else _fmt
                cells.append("".join(f"{fmt(float(vals.sel(system=m))):>{w}}" for m in systems))
            row += " | ".join(cells)
            if ens:
                row += " | " + f"{float(scores['spread_skill'].sel(system='model', channel=c).isel(lead_time=j)):>12.3f}"
            lines.append(row)
    n_ic = scores.attrs.get("n_ic")
    lines.append(f"({scores.attrs.get('convention', '?')} convention, {scores.attrs.get('lat_weights', '?')} "
                 f"latitude weights" + (f", {n_ic} ICs" if n_ic is not None else "")
                 + (f", {scores.attrs.get('members')} members, fair CRPS" if ens else "") + ")")
    return "\n".join(lines)


def write_scores(scores, path_stem) -> tuple[Path, Path]:
    """Write ``<stem>.nc`` and ``<stem>.csv`` (long format with ``lead_time_hours``), each atomically."""
    stem = Path(path_stem)
    if stem.suffix in (".csv", ".nc"):
        stem = stem.with_suffix("")
    df = scores.to_dataframe().reset_index()
    df.insert(df.columns.get_loc("lead_time"), "lead_time_hours", df["lead_time"] / np.timedelta64(1, "h"))
    df = df.drop(columns=["lead_time"])
    buf = io.StringIO()
    df.to_csv(buf, index=False, float_format="%.7g")
    text = buf.getvalue()
    csv = atomic_write(stem.with_name(stem.name + ".csv"), lambda tmp: Path(tmp).write_text(text))
    nc = atomic_write(stem.with_name(stem.name + ".nc"), lambda tmp: scores.to_netcdf(tmp, engine="netcdf4"))
    return csv, nc


# --------------------------------------------------------------------------- #
# CLI
# --------------------------------------------------------------------------- #


_EPILOG = """\
Without --climatology the truth is the climatology if it is a store, else the climatology.nc of the model
package named in the forecast file's 'model' attribute, else it is an error. Scores are computed on
normalised fields and scaled back by the std; mean/std come from the forecast's model package, else a
--climatology package, else the truth store (or a --climatology store), else they are estimated from the
truth. Writes DIR/scores.nc and scores.csv over (system, channel, lead_time), system = model and each
baseline, and plots; the scores' attributes say which climatology and normalisation served each channel."""


def main(argv=None) -> int:
    ap = cli.parser("evaluate", __doc__, raw=False)
    ap.epilog = _EPILOG
    ap.formatter_class = argparse.RawDescriptionHelpFormatter
    ap.add_argument("forecast", help="forecast file (.nc or .zarr) in the forecast layout")
    ap.add_argument("--truth", required=True, metavar="SOURCE",
                    help="the verifying data: a prepared store, 'world', a NetCDF/zarr in fcn_jax's layout, the "
                         "original HDF5 year files (2018.h5), CDS netCDF, a WeatherBench 2 zarr (path or URL) or "
                         "GRIB; fitted to the forecast grid (721 -> its first 720 rows)")
    ap.add_argument("--climatology", action="append", default=None, metavar="SPEC",
                    help="climatology for ACC and the climatology baseline (repeatable; each channel from the first "
                         "that has it): a model package or run directory (climatology.nc), a prepared store, the "
                         "original's time_means.npy (1, 21|1, H, W), or a WeatherBench 2 climatology zarr (path or "
                         "URL). Default: the truth if it is a store, else the forecast model's package")
    ap.add_argument("--out", required=True, help="output directory")
    ap.add_argument("--baselines", default="persistence,climatology", help="comma list, or 'none'")
    ap.add_argument("--convention", choices=["fcn", "wb2"], default="fcn",
                    help="fcn: FourCastNet's (sqrt per IC, ACC against the time mean, its latitude weights); wb2: "
                         "WeatherBench 2's (sqrt after the IC mean, day-of-year x hour climatology at the valid "
                         "time where the source has one, cell-area weights)")
    ap.add_argument("--channels", default=None, help="comma list (default: every forecast channel)")
    ap.add_argument("--member", type=int, default=None, metavar="N",
                    help="member N of an ensemble truth file (a 'number' dimension)")
    ap.add_argument("--regrid", action="store_true",
                    help="interpolate a truth or climatology on another grid to the forecast's (bilinear) "
                         "instead of refusing it")
    ap.add_argument("--no-plots", action="store_true")
    ap.add_argument("--also", action="append", default=[], metavar="NAME=FORECAST",
                    help="another forecast file scored in the same call as system NAME (repeatable), e.g. "
                         "--also ceiling=twin.nc for the world's own dynamical core")
    ap.add_argument("--chunk-mb", type=float, default=512,
                    help="forecast data held at a time, MB (default 512): ICs x leads x channels of an ensemble, "
                         "or one lead and channel of all members when that is larger")
    cli.add_experiment(ap, positional=False,
                       help="the experiment whose world --truth world means (its data.world_seed; default: the "
                            "world experiment's)")
    args = cli.parse(ap, argv)

    def body() -> None:
        baselines = [] if args.baselines in ("", "none") else [b.strip() for b in args.baselines.split(",")]
        truth = args.truth
        if truth == "world":
            truth = str(cli.resolve_store("world", cli.load_experiment(args, required=False)))
        scores = evaluate_forecast(args.forecast, truth, args.out, baselines=baselines,
                                   convention=args.convention,
                                   channels=args.channels.split(",") if args.channels else None,
                                   climatology=args.climatology, member=args.member, regrid=args.regrid,
                                   plots=not args.no_plots, progress=True,
                                   max_chunk_bytes=int(args.chunk_mb * 2**20), also=_named(args.also))
        print(format_table(scores))
        print(f"climatology: {scores.attrs.get('climatology')}")
        print(f"scores in {Path(args.out) / 'scores.nc'}")

    return cli.run(body)


if __name__ == "__main__":
    sys.exit(main())
