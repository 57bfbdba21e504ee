"""Readers: every source format -> one :class:`CanonicalSource`.

:func:`open_source` picks the reader from the paths: ``*.nc`` (CDS netCDF),
``*.zarr`` directories (WeatherBench 2 / ARCO), ``*.h5``/``*.hdf5`` (the
original FourCastNet year files). A directory that is not a zarr store stands
for the source files inside it.
"""

from __future__ import annotations

import os
from typing import Iterable, Sequence

from fcn_jax.data.channels import Channel, resolve_channels
from fcn_jax.data.errors import DataError
from fcn_jax.data.readers.cds import open_cds
from fcn_jax.data.readers.source import CanonicalSource
from fcn_jax.data.readers.hdf5 import open_fcn_hdf5
from fcn_jax.data.readers.wb2 import open_wb2

__all__ = ["CanonicalSource", "open_source", "open_cds", "open_wb2", "open_fcn_hdf5", "detect_kind"]

_NC = (".nc", ".nc4", ".netcdf", ".cdf")
_H5 = (".h5", ".hdf5", ".hdf")


def _is_zarr(path: str) -> bool:
    return path.rstrip("/").endswith(".zarr") or any(
        os.path.exists(os.path.join(path, m)) for m in (".zgroup", "zarr.json"))


def _expand(paths: Iterable[str]) -> list[str]:
    out: list[str] = []
    for p in map(str, paths):
        if os.path.isdir(p) and not _is_zarr(p):
            inner = sorted(os.path.join(p, f) for f in os.listdir(p) if f.lower().endswith(_NC + _H5))
            if not inner:
                raise DataError(f"{p}: directory holds no {_NC + _H5} files")
            out.extend(inner)
        else:
            out.append(p)
    return out


def detect_kind(path: str) -> str:
    """'cds', 'wb2' or 'hdf5' from a path's form."""
    low = path.lower().rstrip("/")
    if _is_zarr(path) or "://" in path:
        return "wb2"
    if low.endswith(_NC):
        return "cds"
    if low.endswith(_H5):
        return "hdf5"
    raise DataError(f"{path}: cannot tell the source format; expected *.nc (CDS netCDF), "
                    "*.zarr (WeatherBench 2 / ARCO) or *.h5 (FourCastNet year file)")


def open_source(paths: Sequence[str] | str, channels: str | Sequence[str] | Sequence[Channel], *,
                kind: str = "auto", allow_gaps: bool = False,
                hdf5_layout: Sequence[str | None] | None = None) -> CanonicalSource:
    """Open source files of one format as a :class:`CanonicalSource`.

    Args:
      paths: files, zarr stores, or directories of files.
      channels: channel names / set name (see :func:`fcn_jax.data.channels.resolve_channels`)
        or resolved :class:`Channel` objects, in the order wanted.
      kind: ``auto``, ``cds``, ``wb2`` or ``hdf5``.
      allow_gaps: accept gaps in time (else a gap is an error naming it).
      hdf5_layout: channel at each index of an HDF5 file's channel axis.
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
    if k == "cds":
        return open_cds(files, chans, allow_gaps=allow_gaps)
    if k == "wb2":
        return open_wb2(files, chans, allow_gaps=allow_gaps)
    if k == "hdf5":
        return open_fcn_hdf5(files, chans, layout=hdf5_layout, allow_gaps=allow_gaps)
    raise DataError(f"unknown source kind {k!r}; expected auto, cds, wb2 or hdf5")
