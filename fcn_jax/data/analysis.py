"""Analyses: physical fields at given times on a model's grid, from a store or from any source.

Forecast initial conditions and evaluation truth come from here, so neither
needs a training store. :func:`open_analysis` accepts

* a prepared store (or ``world``, the embedded one);
* a file in fcn_jax's own layout: NetCDF/zarr with dims ``time, lat, lon`` and
  one variable per channel (``z500``, ``t2m``, ...) or a store-like ``fields
  (time, channel, lat, lon)``;
* anything :func:`fcn_jax.data.readers.open_source` reads: the original
  HDF5 year files, CDS netCDF (new, legacy and cfgrib-style), WeatherBench 2 /
  ARCO zarr (path or URL) and GRIB (one file, several, or a directory).

The grid is fitted to the model's as the original does it (:func:`fit_grid`):
an identical grid is used as is; a source whose first rows are the model's
latitudes (the 721-row 0.25 deg ERA5 grid feeding the 720-row model) gives its
first rows; anything else is an error naming both grids unless ``regrid`` is
asked for, which interpolates bilinearly (periodic in longitude) and says so in
:attr:`Analysis.grid_note`.

Layout of what :meth:`Analysis.read` returns: ``x: [time, lat, lon, channel]``
float32, physical units, channels in the order asked for.
"""

from __future__ import annotations

import os
from typing import Callable, Sequence

import numpy as np

from fcn_jax.data.errors import DataError

__all__ = ["Analysis", "open_analysis", "fit_grid", "GridFit", "is_store"]

_ATOL_DEG = 1e-4


def _fmt_t(t) -> str:
    return str(np.datetime64(t, "s"))


def _grid_text(lat, lon) -> str:
    lat, lon = np.asarray(lat), np.asarray(lon)
    return (f"{lat.size} x {lon.size} (lat {lat[0]:g} .. {lat[-1]:g}, lon {lon[0]:g} .. {lon[-1]:g})"
            if lat.size and lon.size else f"{lat.size} x {lon.size}")


class GridFit:
    """How a source grid becomes the model grid: ``apply(x: [n, src_lat, src_lon, C]) -> [n, lat, lon, C]``."""

    def __init__(self, method: str, lat: np.ndarray, lon: np.ndarray, apply: Callable[[np.ndarray], np.ndarray],
                 note: str):
        self.method, self.lat, self.lon, self._apply, self.note = method, lat, lon, apply, note

    def __call__(self, x: np.ndarray) -> np.ndarray:
        return self._apply(x)


def _same(a, b) -> bool:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return a.shape == b.shape and bool(np.allclose(a, b, atol=_ATOL_DEG, rtol=0))


def fit_grid(src_lat, src_lon, lat=None, lon=None, *, regrid: bool = False, where: str = "source",
             model: str = "the model") -> GridFit:
    """Fit a source grid (lat north -> south, lon ascending in [0, 360)) to the model's ``lat``/``lon``.

    ``lat``/``lon`` None: the source grid as it is. Raises :class:`DataError`
    naming both grids when they differ and ``regrid`` is false.
    """
    src_lat = np.asarray(src_lat, np.float64)
    src_lon = np.asarray(src_lon, np.float64)
    if lat is None or lon is None:
        return GridFit("identity", src_lat, src_lon, lambda x: x, "the source grid")
    lat = np.asarray(lat, np.float64)
    lon = np.asarray(lon, np.float64)
    if _same(src_lat, lat) and _same(src_lon, lon):
        return GridFit("identity", lat, lon, lambda x: x, "the source grid (same as the model's)")
    h = lat.size
    if _same(src_lon, lon) and src_lat.size > h and _same(src_lat[:h], lat):
        n_drop = src_lat.size - h
        return GridFit("first-rows", lat, lon, lambda x: x[:, :h],
                       f"the source's first {h} of {src_lat.size} latitude rows (as the original: "
                       f"{n_drop} southernmost row{'s' if n_drop > 1 else ''} dropped)")
    if not regrid:
        raise DataError(f"{where}: grid {_grid_text(src_lat, src_lon)} does not fit {model}'s grid "
                        f"{_grid_text(lat, lon)}; give --regrid to interpolate it (bilinear), or a source "
                        f"on that grid")
    return GridFit("bilinear", lat, lon, _bilinear(src_lat, src_lon, lat, lon),
                   f"bilinear interpolation from {_grid_text(src_lat, src_lon)} (periodic in longitude; "
                   f"latitudes beyond the source's outermost rows take those rows)")


def _bilinear(src_lat, src_lon, lat, lon):
    from fcn_jax.data.climatology import linear_regrid  # the one bilinear regridder (also WB2 climatologies)

    def apply(x: np.ndarray) -> np.ndarray:
        # x: [n, src_lat, src_lon, C] -> [n, lat, lon, C]
        y = linear_regrid(np.moveaxis(x, -1, 1), src_lat, src_lon, lat, lon)  # [n, C, lat, lon]
        return np.ascontiguousarray(np.moveaxis(y, 1, -1), np.float32)

    return apply


class Analysis:
    """Fields of ``channels`` at the times of a source, on the fitted grid (see the module doc).

    Attributes: ``channels``, ``times`` (datetime64[ns], increasing), ``lat``,
    ``lon`` (the model grid after fitting), ``where`` (the source, for
    messages), ``grid_note`` (how the grid was fitted), ``kind`` (``store``,
    ``fcn_jax-layout`` or the reader's source kind), ``store`` (the store path
    when the source is one, else None).
    """

    def __init__(self, channels, times, read_native: Callable[[np.ndarray], np.ndarray], fit: GridFit,
                 where: str, kind: str, store: str | None = None):
        self.channels = list(channels)
        self.times = np.asarray(times, "datetime64[ns]")
        self._read_native = read_native  # sorted unique time indices -> [n, src_lat, src_lon, C]
        self._fit = fit
        self.lat, self.lon = fit.lat, fit.lon
        self.where, self.kind, self.store = where, kind, store
        self.grid_note = fit.note

    def index(self, times, what: Callable[[np.datetime64], str] | None = None) -> np.ndarray:
        """Indices of ``times`` (any shape) in :attr:`times`; a missing one is a DataError naming it and the range."""
        times = np.asarray(times, "datetime64[ns]")
        flat = times.reshape(-1)
        pos = np.searchsorted(self.times, flat)
        ok = (pos < self.times.size) & (self.times[np.minimum(pos, self.times.size - 1)] == flat)
        if not ok.all():
            bad = flat[~ok][0]
            label = what(bad) if what else "time"
            step = ""
            if self.times.size > 1:
                step = f" every {(self.times[1] - self.times[0]) / np.timedelta64(1, 'h'):g} h"
            raise DataError(f"{label} {_fmt_t(bad)} is not in {self.where}: it has {self.times.size} times "
                            f"{_fmt_t(self.times[0])} .. {_fmt_t(self.times[-1])}{step}")
        return pos.reshape(times.shape)

    def read(self, times) -> np.ndarray:
        """``x: [n, lat, lon, channel]`` float32 physical at ``times`` (a missing time is a DataError)."""
        idx = self.index(np.asarray(times).reshape(-1))
        return self.read_index(idx)

    def read_index(self, idx) -> np.ndarray:
        """``x: [n, lat, lon, channel]`` at time indices ``idx`` (any order, repeats allowed)."""
        idx = np.asarray(idx, np.int64).reshape(-1)
        uniq, inverse = np.unique(idx, return_inverse=True)
        x = self._fit(np.asarray(self._read_native(uniq), np.float32))
        return np.ascontiguousarray(x[inverse])


# --------------------------------------------------------------------------- #
# Opening
# --------------------------------------------------------------------------- #


def is_store(path: str) -> bool:
    """True when ``path`` is a prepared fcn_jax store (a zarr group with its version attribute)."""
    return os.path.isdir(path) and (os.path.exists(os.path.join(path, ".zattrs"))
                                    or os.path.exists(os.path.join(path, "zarr.json"))) and _store_attr(path)


def _store_attr(path: str) -> bool:
    try:
        import zarr

        return zarr.open_group(path, mode="r").attrs.get("fcn_jax_store_version") is not None
    except Exception:  # noqa: BLE001 - not a zarr group: not a store
        return False


def _runs(idx: np.ndarray):
    """Contiguous runs ``(a, b)`` of sorted unique indices."""
    start = 0
    for k in range(1, idx.size + 1):
        if k == idx.size or idx[k] != idx[k - 1] + 1:
            yield int(idx[start]), int(idx[k - 1]) + 1
            start = k


def _own_layout(path: str, channels: Sequence[str]):
    """An xarray Dataset in fcn_jax's own layout (channel-named variables or ``fields``), else None."""
    import xarray as xr

    low = path.lower().rstrip("/")
    if not (low.endswith((".nc", ".nc4", ".zarr")) or os.path.isdir(path)):
        return None
    try:
        ds = xr.open_zarr(path) if os.path.isdir(path) else xr.open_dataset(path)
    except Exception:  # noqa: BLE001 - not ours: the readers will say what is wrong
        return None
    if not all(d in ds.dims for d in ("time", "lat", "lon")):
        return None
    if "fields" in ds and "channel" in ds["fields"].dims:
        return ds
    if all(c in ds.data_vars for c in channels):
        return ds
    return None


def open_analysis(source: str | os.PathLike | Sequence[str], channels: Sequence[str], *, lat=None, lon=None,
                  regrid: bool = False, member: int | None = None, model: str = "the model",
                  world_seed: int = 0) -> Analysis:
    """An :class:`Analysis` of ``channels`` from ``source`` (see the module doc), fitted to ``lat``/``lon``."""
    channels = [str(c) for c in channels]
    paths = [str(source)] if isinstance(source, (str, os.PathLike)) else [str(p) for p in source]
    if not paths:
        raise DataError("no analysis source given")
    if len(paths) == 1 and paths[0] == "world":
        from fcn_jax.data.catalog import resolve_store

        paths = [str(resolve_store("world", world_seed=world_seed))]
    p0 = paths[0]
    if len(paths) == 1 and "://" not in p0 and not os.path.exists(p0):
        raise DataError(f"{p0}: not found (expected a store, a source file or directory, or 'world')")
    if len(paths) == 1 and is_store(p0):
        return _from_store(p0, channels, lat, lon, regrid, model)
    if len(paths) == 1 and "://" not in p0:
        ds = _own_layout(p0, channels)
        if ds is not None:
            return _from_own_layout(p0, ds, channels, lat, lon, regrid, model)
    from fcn_jax.data.readers import open_source

    kwargs = {"member": member} if member is not None else {}
    src = open_source(paths, channels, allow_gaps=True, **kwargs)
    where = paths[0] if len(paths) == 1 else f"{paths[0]} (+{len(paths) - 1} more)"
    fit = fit_grid(src.lat, src.lon, lat, lon, regrid=regrid, where=where, model=model)

    def read_native(idx: np.ndarray) -> np.ndarray:  # [n, C, lat, lon] -> [n, lat, lon, C]
        blocks = [src.read(a, b) for a, b in _runs(idx)]
        return np.concatenate(blocks, axis=0).transpose(0, 2, 3, 1)

    return Analysis(src.channel_names, src.times, read_native, fit, where, str(src.attrs.get("source_kind", "source")))


def _from_store(path: str, channels, lat, lon, regrid, model) -> Analysis:
    from fcn_jax.data.store import open_store

    ds = open_store(path)
    names = [str(c) for c in ds["channel"].values]
    missing = [c for c in channels if c not in names]
    if missing:
        raise DataError(f"{path}: channels {missing} are not in the store; it has {names}")
    ci = [names.index(c) for c in channels]
    fields = ds["fields"]
    fit = fit_grid(ds["lat"].values, ds["lon"].values, lat, lon, regrid=regrid, where=f"store {path}", model=model)

    def read_native(idx: np.ndarray) -> np.ndarray:
        x = fields.isel(time=idx, channel=ci).transpose("time", "lat", "lon", "channel").values
        return np.asarray(x, np.float32)

    return Analysis(channels, ds["time"].values, read_native, fit, f"store {path}", "store", store=path)


def _from_own_layout(path: str, ds, channels, lat, lon, regrid, model) -> Analysis:
    from fcn_jax.data.readers.grid import orientation_indexers

    if "fields" in ds and "channel" in ds["fields"].dims:
        names = [str(c) for c in ds["channel"].values]
        missing = [c for c in channels if c not in names]
        if missing:
            raise DataError(f"{path}: channels {missing} missing; it has {names}")
        da = ds["fields"].sel(channel=list(channels)).transpose("time", "lat", "lon", "channel")
    else:
        da = ds[list(channels)].to_array("channel").transpose("time", "lat", "lon", "channel")
    li, oi, src_lat, src_lon = orientation_indexers(ds["lat"].values, ds["lon"].values, path)
    times = ds["time"].values.astype("datetime64[ns]")
    if times.size > 1 and np.any(np.diff(times) <= np.timedelta64(0, "ns")):
        raise DataError(f"{path}: time is not strictly increasing")
    fit = fit_grid(src_lat, src_lon, lat, lon, regrid=regrid, where=path, model=model)

    def read_native(idx: np.ndarray) -> np.ndarray:
        return np.asarray(da.isel(time=idx).values, np.float32)[:, li][:, :, oi]

    return Analysis(channels, times, read_native, fit, path, "fcn_jax-layout")
