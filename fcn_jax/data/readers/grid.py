"""Dimensions and grid of source datasets: canonical names and orientation.

Select dimensions by name, never by position (spec/evaluation.md §8.3):
:func:`standardize` renames them to (time, level, lat, lon) and tidies extra
coordinates; :func:`orientation_indexers` puts latitude north -> south and
longitude into [0, 360).
"""

from __future__ import annotations

import numpy as np
import xarray as xr

from fcn_jax.data.errors import DataError

# select dimensions by name, never by position.
TIME_NAMES = ("valid_time", "time")
LEVEL_NAMES = ("pressure_level", "level", "isobaricInhPa", "plev")
LAT_NAMES = ("latitude", "lat")
LON_NAMES = ("longitude", "lon")


def standardize(ds: xr.Dataset, where: str, *, member: int | None = None) -> xr.Dataset:
    """Rename dimensions/coordinates to (time, level, lat, lon) and tidy extras.

    * ``valid_time``/``time`` -> ``time``; ``pressure_level``/``level`` -> ``level``;
      ``latitude``/``longitude`` -> ``lat``/``lon``.
    * ``number`` (ensemble member): without ``member``, a length-1 dimension is
      dropped and more than one member is an error (prepare one member at a
      time); ``member=N`` selects member N (an error naming the members present
      when absent, or when the file has no ``number``).
    * ``expver`` as a *coordinate* (new CDS) is dropped; as a *dimension*
      (legacy files mixing ERA5 and ERA5T) it is kept and merged at read time,
      taking the first non-missing value.
    * Other non-dimension coordinates are dropped.
    """
    rename: dict[str, str] = {}
    for canon, names in (("time", TIME_NAMES), ("level", LEVEL_NAMES),
                         ("lat", LAT_NAMES), ("lon", LON_NAMES)):  # fmt: skip
        present = [n for n in names if n in ds.dims or n in ds.coords]
        dims_present = [n for n in present if n in ds.dims]
        if len(dims_present) > 1:
            raise DataError(f"{where}: both {dims_present} present; expected one {canon} dimension")
        pick = dims_present[0] if dims_present else (present[0] if present else None)
        if pick is not None and pick != canon:
            if canon in ds.variables:  # e.g. legacy 'time' coord next to 'valid_time'
                ds = ds.drop_vars(canon)
            rename[pick] = canon
    ds = ds.rename(rename)
    ds = select_member(ds, where, member)
    keep_dims = {"time", "level", "lat", "lon", "expver"}
    drop = [c for c in ds.coords if c not in ds.dims or c not in keep_dims]
    drop = [c for c in drop if c not in ("time", "level", "lat", "lon")]
    ds = ds.drop_vars(drop, errors="ignore")
    for need in ("lat", "lon"):
        if need not in ds.dims:
            raise DataError(f"{where}: no {need} dimension; expected one of "
                            f"{LAT_NAMES if need == 'lat' else LON_NAMES} (dims: {dict(ds.sizes)})")
    if "time" not in ds.dims:
        raise DataError(f"{where}: no time dimension; expected one of {TIME_NAMES} (dims: {dict(ds.sizes)})")
    return ds


def select_member(ds: xr.Dataset, where: str, member: int | None) -> xr.Dataset:
    """Drop the ensemble dimension ``number``, keeping ``member`` (see :func:`standardize`)."""
    if member is None and "number" not in ds.dims:
        return ds
    numbers = np.atleast_1d(np.asarray(ds["number"].values)) if "number" in ds.variables else None
    if "number" in ds.dims and numbers is None:
        numbers = np.arange(ds.sizes["number"])
    if member is None:
        if "number" in ds.dims:
            if ds.sizes["number"] != 1:
                raise DataError(
                    f"{where}: ensemble dimension 'number' has {ds.sizes['number']} members "
                    f"{numbers.tolist()}; expected a single (deterministic) member: pick one with "
                    "member=N (--member N)"
                )
            ds = ds.isel(number=0)
        return ds
    if numbers is None:
        raise DataError(f"{where}: member {member} requested but the file has no ensemble dimension 'number'")
    hit = np.nonzero(numbers == member)[0]
    if hit.size == 0:
        raise DataError(f"{where}: member {member} not found; ensemble dimension 'number' holds members "
                        f"{numbers.tolist()}")
    return ds.isel(number=int(hit[0])) if "number" in ds.dims else ds


def original_grid(n_lat: int, n_lon: int) -> tuple[np.ndarray, np.ndarray]:
    """The grid of the original's files, which carry no coordinates: latitude 90 -> -90 with both poles
    (721 rows at 0.25 deg; the model sees the first 720), longitude 0 -> 360 - dx."""
    return np.linspace(90.0, -90.0, n_lat), np.arange(n_lon) * (360.0 / n_lon)


def orientation_indexers(lat: np.ndarray, lon: np.ndarray, where: str) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Index arrays putting lat north->south and lon into [0, 360) ascending.

    Returns (lat_index, lon_index, new_lat, new_lon).
    """
    lat = np.asarray(lat, dtype=np.float64)
    lon = np.asarray(lon, dtype=np.float64)
    if lat.ndim != 1 or lon.ndim != 1:
        raise DataError(f"{where}: expected 1-D latitude/longitude coordinates")
    d = np.diff(lat)
    if len(lat) > 1 and not (np.all(d > 0) or np.all(d < 0)):
        raise DataError(f"{where}: latitude is not monotonic; expected a regular lat-lon grid")
    if lat.size and (lat.max() > 90.0 + 1e-6 or lat.min() < -90.0 - 1e-6):
        raise DataError(f"{where}: latitude outside [-90, 90] ({lat.min()} .. {lat.max()})")
    lat_idx = np.argsort(-lat, kind="stable")
    lon_wrapped = np.mod(lon, 360.0)
    lon_wrapped[np.isclose(lon_wrapped, 360.0)] = 0.0
    lon_idx = np.argsort(lon_wrapped, kind="stable")
    new_lon = lon_wrapped[lon_idx]
    if np.any(np.diff(new_lon) <= 1e-9):
        raise DataError(f"{where}: duplicate longitudes after wrapping to [0, 360) "
                        "(e.g. both 0 and 360 present); expected each meridian once")
    return lat_idx, lon_idx, lat[lat_idx], new_lon


def _is_identity(idx: np.ndarray) -> bool:
    return bool(np.array_equal(idx, np.arange(idx.size)))


def _as_indexer(idx: np.ndarray) -> slice | np.ndarray:
    """A slice where possible: lazy backends index slices without copying."""
    if _is_identity(idx):
        return slice(None)
    if _is_identity(idx[::-1]):
        return slice(None, None, -1)
    return idx
