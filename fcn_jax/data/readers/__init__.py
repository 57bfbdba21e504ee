"""Readers: every source format -> one :class:`CanonicalSource`.

:func:`open_source` picks the reader from the paths: ``*.nc`` (CDS netCDF),
``*.zarr`` directories (WeatherBench 2 / ARCO), ``*.h5``/``*.hdf5`` (the
original FourCastNet year files), ``*.grib``/``*.grb``/``*.grib2``/... or any
file starting with ``GRIB`` (GRIB 1/2: ERA5, IFS open data, GFS). A directory
that is not a zarr store stands for the source files inside it.
"""

from __future__ import annotations

import os
from typing import Iterable, Sequence

from fcn_jax.data.channels import Channel, resolve_channels
from fcn_jax.data.errors import DataError
from fcn_jax.data.readers.cds import open_cds
from fcn_jax.data.readers.grib import GRIB_EXTENSIONS, is_grib_file, open_grib
from fcn_jax.data.readers.hdf5 import open_fcn_hdf5
from fcn_jax.data.readers.source import CanonicalSource
from fcn_jax.data.readers.wb2 import open_wb2

__all__ = ["CanonicalSource", "open_source", "open_cds", "open_wb2", "open_fcn_hdf5", "open_grib",
           "detect_kind", "KINDS"]

_NC = (".nc", ".nc4", ".netcdf", ".cdf")
_H5 = (".h5", ".hdf5", ".hdf")
_GRIB = GRIB_EXTENSIONS
#: Source kinds accepted by open_source (besides ``auto``).
KINDS = ("cds", "wb2", "hdf5", "grib")


def _is_zarr(path: str) -> bool:
    return path.rstrip("/").endswith(".zarr") or any(
        os.path.exists(os.path.join(path, m)) for m in (".zgroup", "zarr.json"))


def _expand(paths: Iterable[str]) -> list[str]:
    out: list[str] = []
    for p in map(str, paths):
        if os.path.isdir(p) and not _is_zarr(p):
            names = sorted(os.listdir(p))
            inner = [os.path.join(p, f) for f in names
                     if f.lower().endswith(_NC + _H5 + _GRIB) or is_grib_file(os.path.join(p, f))]
            if not inner:
                raise DataError(f"{p}: directory holds no {_NC + _H5 + _GRIB} files (nor files starting with GRIB)")
            out.extend(inner)
        else:
            out.append(p)
    return out


def detect_kind(path: str) -> str:
    """'cds', 'wb2', 'hdf5' or 'grib' from a path's form (a file starting with ``GRIB`` is GRIB)."""
    low = path.lower().rstrip("/")
    if "://" not in path and is_grib_file(path):
        return "grib"  # whatever its name (e.g. a GRIB download saved as .nc)
    if _is_zarr(path) or "://" in path:
        return "wb2"
    if low.endswith(_NC):
        return "cds"
    if low.endswith(_H5):
        return "hdf5"
    if low.endswith(_GRIB):
        return "grib"
    raise DataError(f"{path}: cannot tell the source format; expected *.nc (CDS netCDF), "
                    "*.zarr (WeatherBench 2 / ARCO), *.h5 (FourCastNet year file) or "
                    f"GRIB ({', '.join('*' + e for e in _GRIB)}, or any file starting with 'GRIB')")


def open_source(paths: Sequence[str] | str, channels: str | Sequence[str] | Sequence[Channel], *,
                kind: str = "auto", allow_gaps: bool = False,
                hdf5_layout: Sequence[str | None] | None = None,
                member: int | None = None) -> CanonicalSource:
    """Open source files of one format as a :class:`CanonicalSource`.

    Args:
      paths: files, zarr stores, or directories of files.
      channels: channel names / set name (see :func:`fcn_jax.data.channels.resolve_channels`)
        or resolved :class:`Channel` objects, in the order wanted.
      kind: ``auto``, ``cds``, ``wb2``, ``hdf5`` or ``grib``.
      allow_gaps: accept gaps in time (else a gap is an error naming it).
      hdf5_layout: channel at each index of an HDF5 file's channel axis.
      member: the ensemble member (dimension / GRIB key ``number``) to read;
        ``None`` refuses sources with more than one member.
    """
    if isinstance(paths, (str, os.PathLike)):
        paths = [str(paths)]
    files = _expand(paths)
    if not files:
        raise DataError("no source files given")
    chans = list(channels) if channels and isinstance(list(channels)[0], Channel) else resolve_channels(channels)  # type: ignore[arg-type]
    kinds = {detect_kind(f) for f in files} if kind == "auto" else {kind}
    if len(kinds) > 1:
        raise DataError(f"mixed source formats {sorted(kinds)} in {files}; prepare one format at a time")
    k = kinds.pop()
    if member is not None and (isinstance(member, bool) or int(member) != member):
        raise DataError(f"member={member!r}: expected an integer ensemble member number")
    if k == "cds":
        return open_cds(files, chans, allow_gaps=allow_gaps, member=member)
    if k == "wb2":
        return open_wb2(files, chans, allow_gaps=allow_gaps, member=member)
    if k == "grib":
        return open_grib(files, chans, allow_gaps=allow_gaps, member=member)
    if k == "hdf5":
        if member is not None:
            raise DataError(f"member={member}: FourCastNet HDF5 year files hold no ensemble members {files}")
        return open_fcn_hdf5(files, chans, layout=hdf5_layout, allow_gaps=allow_gaps)
    raise DataError(f"unknown source kind {k!r}; expected auto, {', '.join(KINDS)}")
