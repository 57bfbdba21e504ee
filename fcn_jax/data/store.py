"""The training store: its layout, opening it, reading its description and statistics.

A store is a zarr (format 2) group that ``xarray.open_zarr(STORE)`` opens:

====================  ======================================  =========================================
variable              dims                                    meaning
====================  ======================================  =========================================
``fields``            (time, channel, lat, lon) float32       the data; one time step per chunk
``mean``, ``std``     (channel,) float64                      global per-channel statistics of the
                                                              ``stats_years`` (normalisation)
``time_mean``         (channel, lat, lon) float32             time-mean climatology (FourCastNet ACC)
``clim_doy_hour``     (dayofyear, hour, channel, lat, lon)    day-of-year x hour climatology, smoothed
                      float32 (optional)                      by a ``clim_window_days`` triangle (or
                                                              imported); chunks of latitude bands
====================  ======================================  =========================================

Coordinates: ``time`` (datetime64), ``channel`` (names), ``channel_units``,
``lat`` (north -> south), ``lon`` ([0, 360)), ``dayofyear`` (1..366), ``hour``.
Attributes record provenance and every choice (``south_pole_dropped``,
``years``, ``stats_years``, ``time_step_hours``, ``source_kind``, ...).

``climatology`` records which climatology was built (``time-mean``,
``doy-hour`` or ``import``) and ``climatology_reason`` why; ``clim_doy_hour``
exists only for the last two. :func:`fcn_jax.data.prepare.prepare` writes a
store;
:func:`fcn_jax.data.catalog.resolve_store` turns a store name into a path.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Sequence

import numpy as np
import xarray as xr

from fcn_jax.data.channels import resolve_channels
from fcn_jax.data.errors import DataError
from fcn_jax.data.stats import day_of_year_and_hour
from fcn_jax.normalize import Normalizer

STORE_VERSION = 1


def parse_years(spec: str | int | Sequence[int] | None) -> list[int] | None:
    """'1979-1981,1990' -> [1979, 1980, 1981, 1990]; None -> None (all years)."""
    if spec is None:
        return None
    if isinstance(spec, int):
        return [spec]
    if not isinstance(spec, str):
        return sorted({int(y) for y in spec})
    years: set[int] = set()
    for part in spec.split(","):
        part = part.strip()
        if not part:
            continue
        if "-" in part:
            a, b = (int(s) for s in part.split("-", 1))
            if b < a:
                raise DataError(f"empty year range {part!r}: {b} < {a}")
            years.update(range(a, b + 1))
        else:
            years.add(int(part))
    if not years:
        raise DataError(f"empty year selection {spec!r}")
    return sorted(years)


# ------------------------------------------------------------------- reading
def open_store(path: str | os.PathLike) -> xr.Dataset:
    """Open a prepared store lazily (dask) and check it is one.

    Returns an ``xarray.Dataset`` with ``fields`` [time, channel, lat, lon] and
    the statistics variables described in the module docstring.
    """
    path = str(path)
    if not os.path.isdir(path):
        raise DataError(f"{path}: store not found; create it with `python -m fcn_jax.prepare`")
    try:
        ds = xr.open_zarr(path)
    except Exception as e:
        raise DataError(f"{path}: cannot open as a zarr store ({type(e).__name__}: {e})") from e
    if "fields" not in ds or ds.attrs.get("fcn_jax_store_version") is None:
        raise DataError(f"{path}: not an fcn_jax training store (no 'fields' / version attribute)")
    return ds


def store_stats(path: str | os.PathLike, channels=None) -> tuple[np.ndarray, np.ndarray]:
    """(mean[C], std[C]) float32 in the order of ``channels`` (default: the store's)."""
    return StoreInfo.read(path).stats(channels)


def climatology_at(ds: xr.Dataset, times) -> xr.DataArray:
    """Day-of-year x hour climatology at ``times``: [time, channel, lat, lon].

    Falls back to the time mean when the store has no ``clim_doy_hour``.
    """
    times = np.asarray(times).astype("datetime64[ns]")
    if "clim_doy_hour" not in ds:
        return ds["time_mean"].expand_dims(time=times)
    doy, hour = day_of_year_and_hour(times)
    sel = ds["clim_doy_hour"].sel(dayofyear=xr.DataArray(doy, dims="time"),
                                  hour=xr.DataArray(hour, dims="time"))
    return sel.assign_coords(time=("time", times)).drop_vars(["dayofyear", "hour"])


@dataclasses.dataclass(frozen=True)
class StoreInfo:
    """One description of a store, read once: what a consumer needs before reading data.

    ``channels`` (names, store order), ``times`` (datetime64[ns]), ``lat``
    (north -> south), ``lon``, ``attrs``, ``mean``/``std`` [C] float64, and which
    climatology variables exist. Build with :meth:`read`; pass it to
    :class:`~fcn_jax.data.pipeline.WindowSource` and friends so they do not
    reopen the store.
    """

    path: str
    channels: tuple[str, ...]
    times: np.ndarray
    lat: np.ndarray
    lon: np.ndarray
    attrs: dict
    mean: np.ndarray
    std: np.ndarray
    variables: tuple[str, ...]

    @classmethod
    def read(cls, path: str | os.PathLike) -> "StoreInfo":
        ds = open_store(path)
        return cls(path=str(path), channels=tuple(str(c) for c in ds["channel"].values),
                   times=ds["time"].values.astype("datetime64[ns]"), lat=np.asarray(ds["lat"].values),
                   lon=np.asarray(ds["lon"].values), attrs=dict(ds.attrs),
                   mean=np.asarray(ds["mean"].values, np.float64), std=np.asarray(ds["std"].values, np.float64),
                   variables=tuple(str(v) for v in ds.data_vars))

    @property
    def time_step_hours(self) -> float:
        return float(self.attrs.get("time_step_hours", 6.0))

    def index_of(self, channels) -> np.ndarray:
        """Store indices of ``channels`` (names / set name; None = all); a missing one is a DataError."""
        want = list(self.channels) if channels is None else [c.name for c in resolve_channels(channels)]
        missing = [c for c in want if c not in self.channels]
        if missing:
            raise DataError(f"{self.path}: channels {missing} not in the store; it has {list(self.channels)}")
        return np.asarray([self.channels.index(c) for c in want], np.int64)

    def stats(self, channels=None) -> tuple[np.ndarray, np.ndarray]:
        """(mean[C], std[C]) float32 in the order of ``channels``."""
        idx = self.index_of(channels)
        return self.mean[idx].astype(np.float32), self.std[idx].astype(np.float32)

    def normalizer(self, channels=None) -> Normalizer:
        """The :class:`~fcn_jax.normalize.Normalizer` of ``channels`` (the store's global mean/std)."""
        return Normalizer(*self.stats(channels))

    def time_mean(self, channels=None) -> np.ndarray | None:
        """Time mean [channel, lat, lon] float32 of ``channels``, or None when the store has none."""
        if "time_mean" not in self.variables:
            return None
        import zarr

        arr = zarr.open_array(os.path.join(self.path, "time_mean"), mode="r")
        return np.asarray(arr.get_orthogonal_selection((self.index_of(channels), slice(None), slice(None))),
                          np.float32)

