"""Reader for Copernicus Climate Data Store (CDS) ERA5 netCDF downloads.

Both conventions (spec/evaluation.md §8.1) are accepted, file by file:

============  ===============================  ===============================
aspect        new CDS (since 2024)             legacy CDS / MARS netCDF
============  ===============================  ===============================
time          ``valid_time``                   ``time``
levels        ``pressure_level``               ``level``
extras        ``number``, ``expver`` coords    ``expver`` *dimension* (ERA5T mix)
packing       float32                          int16 + scale_factor/add_offset/_FillValue
============  ===============================  ===============================

Surface and pressure-level variables usually come in separate files, and often
one file per year or month; pass them all. Variables are found by their CDS
short names (``u10``, ``t``, ``z`` ...; long names are tried too), packed
values are CF-decoded by xarray (fill values become NaN, which ``prepare``
then reports), geopotential height (``gh``) becomes geopotential.

Precipitation: CDS ``tp`` is hourly (the hour ending at each time); given
hourly, it is summed into the 6 h accumulation ending at 00/06/12/18 UTC, the
store's convention, and hourly instantaneous variables are subsampled to the
same stamps (:mod:`fcn_jax.data.readers.accumulate`).
"""

from __future__ import annotations

import os
from typing import Sequence

import xarray as xr

from fcn_jax.data.channels import Channel
from fcn_jax.data.errors import DataError
from fcn_jax.data.readers.accumulate import to_six_hourly
from fcn_jax.data.readers.grid import standardize
from fcn_jax.data.readers.pieces import collect_pieces
from fcn_jax.data.readers.source import CanonicalSource, assemble


def open_netcdf(path: str, *, member: int | None = None) -> xr.Dataset:
    """Open one netCDF file lazily (no dask, no caching), standardised.

    Raises:
      DataError: the file is missing, unreadable or truncated.
    """
    if not os.path.exists(path):
        raise DataError(f"{path}: file not found")
    try:
        # xarray takes HDF5_LOCK itself inside open_dataset and every read.
        ds = xr.open_dataset(path, engine="netcdf4", chunks=None, cache=False,
                             mask_and_scale=True, decode_times=True, decode_timedelta=False)
    except Exception as e:
        raise DataError(f"{path}: cannot open as netCDF ({type(e).__name__}: {e}); "
                        "expected a complete netCDF4/HDF5 file (truncated download?)") from e
    return standardize(ds, path, member=member)


def open_cds(paths: Sequence[str], channels: Sequence[Channel], *, allow_gaps: bool = False,
             member: int | None = None) -> CanonicalSource:
    """Open CDS netCDF files as one :class:`CanonicalSource` with ``channels``.

    ``member`` picks one ensemble member (dimension ``number``) from ensemble files.
    """
    datasets = [(str(p), open_netcdf(str(p), member=member)) for p in paths]
    pieces = collect_pieces(datasets, channels, prefer="cds")
    pieces, note = to_six_hourly(pieces)  # hourly tp -> 6 h sums (no-op for 6-hourly sources)
    return assemble(channels, pieces, source_kind="cds-netcdf", files=[p for p, _ in datasets],
                    allow_gaps=allow_gaps, extra_attrs=provenance_attrs(note, member))


def provenance_attrs(note: str, member: int | None) -> dict | None:
    """Provenance for the store: edges trimmed, ensemble member read."""
    extra: dict = {"time_trimmed": note} if note else {}
    if member is not None:
        extra["ensemble_member"] = int(member)
    return extra or None
