"""Pieces: one channel's data from one file, a lazy reader of a time range.

:func:`collect_pieces` finds every (channel, file) piece in opened xarray
datasets (variable lookup by CDS short name or WB2 long name, level
selection, orientation, unit conversion); the HDF5 reader builds its pieces
directly. Nothing is read until a piece's ``reader(a, b)`` is called.

HDF5 and netCDF-C are not thread-safe (spec/jax-notes.md §9): every read goes
through :data:`HDF5_LOCK`, xarray's own process-wide lock. xarray's netCDF4
backend takes it internally around opens and reads; our h5py reads take it
explicitly, so both libraries' calls into libhdf5 are serialised together.
ecCodes (GRIB) is not thread-safe either: its calls go through cfgrib's own
lock (:func:`fcn_jax.data.readers.grib.grib_lock`), taken by cfgrib around
reads and by the GRIB reader around its scan of a file.
"""

from __future__ import annotations

import dataclasses
from typing import Callable, Sequence

import numpy as np
import xarray as xr

from fcn_jax.data.channels import Channel
from fcn_jax.data.errors import DataError
from fcn_jax.data.readers.grid import LEVEL_NAMES, _as_indexer, orientation_indexers
from fcn_jax.data.readers.units import unit_conversion

try:  # the lock xarray's netCDF4/h5netcdf backends take around libhdf5 calls
    from xarray.backends.locks import HDF5_LOCK
except ImportError:  # pragma: no cover - xarray always has it today
    import threading

    HDF5_LOCK = threading.Lock()


# ---------------------------------------------------------------------- pieces
@dataclasses.dataclass
class Piece:
    """One channel's data from one file: a lazy reader of a time range.

    ``read(a, b)`` returns [b - a, lat, lon] float32 in canonical orientation
    and the catalogue's units, for time indices *local to this piece*.
    """

    channel: Channel
    path: str
    variable: str
    times: np.ndarray  # datetime64[ns], strictly increasing
    lat: np.ndarray  # north -> south
    lon: np.ndarray  # [0, 360)
    reader: Callable[[int, int], np.ndarray]
    note: str = ""

    @property
    def where(self) -> str:
        lvl = f" level {self.channel.level} hPa" if self.channel.level is not None else ""
        return f"{self.path} variable {self.variable!r}{lvl} (channel {self.channel.name})"


def xarray_piece(ds: xr.Dataset, channel: Channel, variable: str, path: str,
                 *, level_required: bool) -> Piece:
    """Build a :class:`Piece` from a standardised dataset (see :func:`standardize`).

    Reads are lazy: ``ds`` must be opened without dask chunks so that
    ``isel(...).values`` reads only the requested slice.
    """
    da = ds[variable]
    where = f"{path} variable {variable!r}"
    if level_required:
        if "level" not in da.dims:
            raise DataError(f"{where}: no pressure-level dimension; expected one of {LEVEL_NAMES} "
                            f"containing {channel.level} hPa (channel {channel.name})")
        levels = np.asarray(da["level"].values, dtype=np.float64)
        # Some files give levels in Pa (e.g. 50000) rather than hPa.
        if levels.size and levels.max() > 2000:
            levels = levels / 100.0
        hit = np.nonzero(np.isclose(levels, channel.level))[0]
        if hit.size == 0:
            raise DataError(
                f"{where}: level {channel.level} hPa missing (channel {channel.name}); "
                f"levels present: {sorted(levels.tolist())}"
            )
        da = da.isel(level=int(hit[0]))
    elif "level" in da.dims:
        if da.sizes["level"] != 1:
            raise DataError(f"{where}: single-level channel {channel.name} but variable has "
                            f"{da.sizes['level']} levels")
        da = da.isel(level=0)
    extra = [d for d in da.dims if d not in ("time", "lat", "lon", "expver")]
    if extra:
        raise DataError(f"{where}: unexpected dimensions {extra}; expected (time, [level], lat, lon)")
    lat_idx, lon_idx, lat, lon = orientation_indexers(da["lat"].values, da["lon"].values, where)
    da = da.isel(lat=_as_indexer(lat_idx), lon=_as_indexer(lon_idx))
    has_expver = "expver" in da.dims
    da = da.transpose("time", *(["expver"] if has_expver else []), "lat", "lon")
    units = da.attrs.get("units")
    if variable in ("gh", "geopotential_height") and units is None:
        units = "m"  # height without units: still height
    scale, offset, note = unit_conversion(units, channel, where)
    times = _decode_times(da["time"].values, where)

    def read(a: int, b: int) -> np.ndarray:
        try:
            # xarray's netCDF4 backend takes HDF5_LOCK itself around each read, and
            # cfgrib its ecCodes lock (taking either here too would deadlock: they
            # are not re-entrant).
            x = np.asarray(da.isel(time=slice(a, b)).values)
        except DataError:
            raise
        except Exception as e:  # truncated / corrupt file surfaces here
            raise DataError(f"{where}: cannot read time steps {a}..{b - 1}: {type(e).__name__}: {e}") from e
        if has_expver:
            # Legacy ERA5/ERA5T mix: each time is valid in exactly one expver.
            merged = x[:, 0]
            for j in range(1, x.shape[1]):
                merged = np.where(np.isnan(merged), x[:, j], merged)
            x = merged
        x = x.astype(np.float64) * scale + offset if (scale != 1.0 or offset != 0.0) else x
        return np.asarray(x, dtype=np.float32)

    return Piece(channel, path, variable, times, lat, lon, read, note)


def _decode_times(values: np.ndarray, where: str) -> np.ndarray:
    values = np.asarray(values)
    if not np.issubdtype(values.dtype, np.datetime64):
        raise DataError(f"{where}: time coordinate is not decodable to dates (dtype {values.dtype}); "
                        "expected CF units such as 'hours since 1900-01-01'")
    return values.astype("datetime64[ns]")


# ------------------------------------------------------------ variable lookup
#: Names a geopotential *height* variable goes by (converted x g on read).
GEOPOTENTIAL_HEIGHT_NAMES = ("gh", "geopotential_height")
#: Other names a single-level field goes by, tried last: GFS's pressure reduced
#: to mean sea level and precipitable water (its total column water vapour).
OTHER_NAMES: dict[str, tuple[str, ...]] = {"msl": ("prmsl",), "tcwv": ("pwat",)}


def variable_candidates(channel: Channel, prefer: str) -> list[str]:
    """Variable names to try for a channel, most likely first.

    ``prefer`` is ``"cds"`` (short names such as ``z``) or ``"wb2"`` (long
    names such as ``geopotential``); the other spelling is tried next, so
    hand-made files in either style work with either reader.
    """
    names = [channel.cds_short, channel.wb2_name, channel.cds_request]
    if prefer == "wb2":
        names = [channel.wb2_name, channel.cds_request, channel.cds_short]
    if channel.cds_short == "z":
        names += list(GEOPOTENTIAL_HEIGHT_NAMES)
    if not channel.is_pressure_level:
        names += list(OTHER_NAMES.get(channel.name, ()))
    out: list[str] = []
    for n in names:
        if n not in out:
            out.append(n)
    return out


def collect_pieces(datasets: Sequence[tuple[str, xr.Dataset]], channels: Sequence[Channel],
                   *, prefer: str) -> list[Piece]:
    """Find every (channel, file) piece; a channel absent from all files is an error."""
    pieces: list[Piece] = []
    for ch in channels:
        found = False
        wrong_shape: list[str] = []
        for path, ds in datasets:
            for var in variable_candidates(ch, prefer):
                if var not in ds.data_vars:
                    continue
                has_level = "level" in ds[var].dims
                if ch.is_pressure_level and not has_level:
                    wrong_shape.append(f"{path} variable {var!r} (no pressure-level dimension)")
                    continue
                if not ch.is_pressure_level and has_level and ds.sizes["level"] > 1:
                    wrong_shape.append(f"{path} variable {var!r} (has {ds.sizes['level']} levels)")
                    continue
                pieces.append(xarray_piece(ds, ch, var, path, level_required=ch.is_pressure_level))
                found = True
                break
        if not found:
            lvl = f" at {ch.level} hPa" if ch.is_pressure_level else ""
            hint = f"; unsuitable candidates: {wrong_shape}" if wrong_shape else ""
            present: dict[str, list[str]] = {}
            for p, ds in datasets:  # several datasets may share a path (GRIB hypercubes)
                present[p] = sorted(set(present.get(p, [])) | set(map(str, ds.data_vars)))
            raise DataError(
                f"channel {ch.name} ({ch.long_name}): variable {variable_candidates(ch, prefer)}{lvl} "
                f"not found in any source file{hint}; variables present: {present}"
            )
    return pieces
