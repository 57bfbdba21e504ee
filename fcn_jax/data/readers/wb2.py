"""Reader for WeatherBench 2 / ARCO-ERA5 zarr stores (spec/evaluation.md §8.2).

Variables have long names (``geopotential``, ``2m_temperature``), pressure
levels are a ``level`` dimension in hPa, latitude may be ascending (the 64x32
stores) and the dimension order may be ``(..., longitude, latitude)``; all are
handled by name. Reads are lazy and one time step at a time, matching the
stores' one-step chunks.
"""

from __future__ import annotations

import os
from typing import Sequence

import xarray as xr

from fcn_jax.data.channels import Channel
from fcn_jax.data.errors import DataError
from fcn_jax.data.readers.accumulate import to_six_hourly
from fcn_jax.data.readers.cds import provenance_attrs
from fcn_jax.data.readers.grid import standardize
from fcn_jax.data.readers.pieces import collect_pieces
from fcn_jax.data.readers.source import CanonicalSource, assemble


def open_wb2_zarr(path: str, *, member: int | None = None) -> xr.Dataset:
    """Open a WB2/ARCO zarr store lazily (no dask), standardised."""
    if "://" not in path and not os.path.exists(path):
        raise DataError(f"{path}: zarr store not found")
    try:
        ds = xr.open_zarr(path, chunks=None, decode_timedelta=False)
    except Exception as e:
        raise DataError(f"{path}: cannot open as a zarr store ({type(e).__name__}: {e})") from e
    return standardize(ds, path, member=member)


def open_wb2(paths: Sequence[str], channels: Sequence[Channel], *, allow_gaps: bool = False,
             member: int | None = None) -> CanonicalSource:
    """Open one or more WB2-style zarr stores as one :class:`CanonicalSource` (``member``: see open_cds)."""
    datasets = [(str(p), open_wb2_zarr(str(p), member=member)) for p in paths]
    pieces = collect_pieces(datasets, channels, prefer="wb2")
    pieces, note = to_six_hourly(pieces)  # hourly tp -> 6 h sums (no-op for 6-hourly sources)
    return assemble(channels, pieces, source_kind="wb2-zarr", files=[p for p, _ in datasets],
                    allow_gaps=allow_gaps, extra_attrs=provenance_attrs(note, member))
