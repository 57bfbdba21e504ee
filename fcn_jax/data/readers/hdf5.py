"""Reader for the original FourCastNet HDF5 year files (fourcastnet-model.md §11).

One file per year named ``<year>.h5`` holding one dataset ``fields`` of shape
``(n_time, 21, 721, 1440)`` float32: 6-hourly from 1 January 00 UTC, channels in
the original order (:data:`~fcn_jax.data.channels.FCN_HDF5_LAYOUT`, the 21st
unused), latitude 90 -> -90 (721 rows), longitude 0 -> 359.75. The files carry
no coordinates, so time comes from the year in the file name and the step, and
the grid from the shape. Reads are lazy, per (time block, channel).

The conversion script copied 1460 samples per year, so leap-year files stop on
30 December 18 UTC; that year-end gap is accepted, other gaps are not.

Precipitation files (``precip/<split>/<year>.h5``) hold one dataset ``tp`` of
shape ``(n_time, 721, 1440)``: ERA5 total precipitation in metres accumulated
over the 6 h ending at each time. They carry no channel axis; pass them with the
field files and ask for channel ``tp``. The 1979 file has 1458 samples starting
at 12 UTC (ERA5's accumulations begin at 07 UTC that day), so with the 1979
field file the store starts at 1979-01-01 12 UTC (``time_trimmed``).
"""

from __future__ import annotations

import os
import re
from typing import Sequence

import numpy as np

from fcn_jax.data.channels import Channel
from fcn_jax.data.errors import DataError
from fcn_jax.data.readers.accumulate import trim_to_common_span
from fcn_jax.data.readers.grid import original_grid
from fcn_jax.data.readers.pieces import HDF5_LOCK, Piece
from fcn_jax.data.readers.source import CanonicalSource, assemble

_YEAR = re.compile(r"(\d{4})")


def _year_of(path: str) -> int:
    m = _YEAR.findall(os.path.basename(path))
    if not m:
        raise DataError(f"{path}: cannot infer the year from the file name; "
                        "expected FourCastNet's '<year>.h5' naming (e.g. 1979.h5)")
    return int(m[-1])


class _H5Field:
    """Lazily opened h5py dataset; picklable (the handle is dropped)."""

    def __init__(self, path: str, dataset: str):
        self.path, self.dataset = path, dataset
        self._file = None

    def __getstate__(self):
        return {"path": self.path, "dataset": self.dataset, "_file": None}

    def get(self):
        import h5py

        if self._file is None:
            self._file = h5py.File(self.path, "r")
        return self._file[self.dataset]


#: The original's precipitation files: ``precip/{train,test,out_of_sample}/<year>.h5``.
PRECIP_DATASET = "tp"
PRECIP_CHANNEL = "tp"
#: ERA5's accumulations start on 1979-01-01 07 UTC, so the original's 1979 precipitation file
#: holds 1458 samples from 12 UTC (the first complete 6 h window); other years start at 00 UTC.
FIRST_ERA5_YEAR, FIRST_YEAR_PRECIP_SAMPLES, FIRST_YEAR_PRECIP_START_HOUR = 1979, 1458, 12


def _reader(handle: "_H5Field", index: tuple, path: str, ch: Channel):
    """read(a, b) -> [b - a, lat, lon] float32 of ``handle[a:b, *index]`` under the HDF5 lock."""

    def read(a: int, b: int) -> np.ndarray:
        try:
            with HDF5_LOCK:
                x = handle.get()[(slice(a, b),) + index]
        except Exception as e:
            raise DataError(f"{path} dataset {handle.dataset!r} index {index} ({ch.name}): cannot "
                            f"read time steps {a}..{b - 1}: {type(e).__name__}: {e}") from e
        return np.asarray(x, dtype=np.float32)

    return read


def _precip_piece(path: str, year: int, shape, step_hours: int, ch: Channel) -> Piece:
    """A FourCastNet precipitation year file: ``tp`` (n_time, lat, lon), metres, 6 h accumulations
    ending at each time; 6-hourly from 1 January 00 UTC (1979: 12 UTC, see above)."""
    n, h, w = shape
    hour0 = FIRST_YEAR_PRECIP_START_HOUR if (year == FIRST_ERA5_YEAR and n == FIRST_YEAR_PRECIP_SAMPLES) else 0
    start = np.datetime64(f"{year:04d}-01-01T00:00", "ns") + np.timedelta64(hour0, "h")
    times = start + np.arange(n) * np.timedelta64(step_hours, "h").astype("timedelta64[ns]")
    handle = _H5Field(path, PRECIP_DATASET)
    return Piece(ch, path, PRECIP_DATASET, times, *original_grid(h, w), _reader(handle, (), path, ch))


def _year_end_gap(before: np.datetime64, after: np.datetime64) -> bool:
    """The leap-year gap of the original files: Dec 30/31 -> Jan 1 00 UTC next year."""
    b = before.astype("datetime64[D]").item()
    a = after.astype("datetime64[ns]")
    return (a == a.astype("datetime64[Y]").astype("datetime64[ns]")
            and b.month == 12 and b.day >= 30 and b.year + 1 == a.astype("datetime64[Y]").item().year)


def open_fcn_hdf5(paths: Sequence[str], channels: Sequence[Channel], *,
                  layout: Sequence[str | None] | None = None, dataset: str = "fields",
                  step_hours: int = 6, allow_gaps: bool = False) -> CanonicalSource:
    """Open FourCastNet HDF5 year files as one :class:`CanonicalSource`.

    Args:
      paths: ``<year>.h5`` files.
      channels: channels wanted (must all be in ``layout``).
      layout: channel name at each index of the file's channel axis (``None`` =
        unused); default the original 21-channel layout.
      dataset: HDF5 dataset name.
      step_hours: time step of the samples.
    """
    import h5py

    from fcn_jax.data.channels import FCN_HDF5_LAYOUT, get_channel

    layout = list(FCN_HDF5_LAYOUT if layout is None else layout)
    canon_layout = [get_channel(n).name if n else None for n in layout]
    pieces: list[Piece] = []
    want_tp = any(ch.name == PRECIP_CHANNEL for ch in channels)
    precip_files = []
    for path in map(str, paths):
        if not os.path.exists(path):
            raise DataError(f"{path}: file not found")
        year = _year_of(path)
        try:
            with HDF5_LOCK, h5py.File(path, "r") as f:
                if dataset in f:
                    name = dataset
                elif PRECIP_DATASET in f:
                    name = PRECIP_DATASET
                else:
                    raise DataError(f"{path}: no dataset {dataset!r} (or {PRECIP_DATASET!r}); expected FourCastNet's "
                                    f"'{dataset}' of shape (n_time, {len(layout)}, lat, lon) or a precipitation "
                                    f"file's '{PRECIP_DATASET}' (n_time, lat, lon); found {list(f)}")
                shape = f[name].shape
        except DataError:
            raise
        except Exception as e:
            raise DataError(f"{path}: cannot open as HDF5 ({type(e).__name__}: {e}); "
                            "expected a complete FourCastNet year file (truncated copy?)") from e
        if name == PRECIP_DATASET:
            if len(shape) != 3:
                raise DataError(f"{path}: dataset {name!r} has shape {shape}; expected (n_time, lat, lon)")
            precip_files.append(path)
            if want_tp:
                pieces.append(_precip_piece(path, year, shape, step_hours, get_channel(PRECIP_CHANNEL)))
            continue
        if len(shape) != 4 or shape[1] != len(layout):
            raise DataError(f"{path}: dataset {dataset!r} has shape {shape}; expected "
                            f"(n_time, {len(layout)}, lat, lon) for channel layout {layout}")
        n, _, h, w = shape
        start = np.datetime64(f"{year:04d}-01-01T00:00", "ns")
        times = start + np.arange(n) * np.timedelta64(step_hours, "h").astype("timedelta64[ns]")
        lat, lon = original_grid(h, w)
        handle = _H5Field(path, dataset)
        for ch in channels:
            if ch.name == PRECIP_CHANNEL and ch.name not in canon_layout:
                continue  # from the precipitation files
            if ch.name not in canon_layout:
                raise DataError(f"{path}: channel {ch.name} is not in the HDF5 channel layout "
                                f"{layout}; expected one of {[n for n in canon_layout if n]}")
            ci = canon_layout.index(ch.name)
            pieces.append(Piece(ch, path, f"{dataset}[:, {ci}]", times, lat, lon, _reader(handle, (ci,), path, ch)))
    if want_tp and PRECIP_CHANNEL not in canon_layout and not precip_files:
        raise DataError(f"channel {PRECIP_CHANNEL} requested but no FourCastNet precipitation file (dataset "
                        f"{PRECIP_DATASET!r}, e.g. precip/train/<year>.h5) among {list(map(str, paths))}")
    note = ""
    if precip_files and want_tp and len(channels) > 1:
        pieces, note = trim_to_common_span(pieces)  # 1979: the fields start 12 h before tp
    extra = {"hdf5_layout": ",".join(n or "-" for n in layout)}
    if note:
        extra["time_trimmed"] = note
    return assemble(channels, pieces, source_kind="fcn-hdf5", files=list(map(str, paths)),
                    allow_gaps=allow_gaps, allowed_gap=_year_end_gap, extra_attrs=extra)
