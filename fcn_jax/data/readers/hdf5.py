"""Reader for the original FourCastNet HDF5 year files (fourcastnet-model.md §11).

One file per year named ``<year>.h5`` holding one dataset ``fields`` of shape
``(n_time, 21, 721, 1440)`` float32: 6-hourly from 1 January 00 UTC, channels in
the original order (:data:`~fcn_jax.data.channels.FCN_HDF5_LAYOUT`, the 21st
unused), latitude 90 -> -90 (721 rows), longitude 0 -> 359.75. The files carry
no coordinates, so time comes from the year in the file name and the step, and
the grid from the shape. Reads are lazy, per (time block, channel).

The conversion script copied 1460 samples per year, so leap-year files stop on
30 December 18 UTC; that year-end gap is accepted, other gaps are not.
"""

from __future__ import annotations

import os
import re
from typing import Sequence

import numpy as np

from fcn_jax.data.channels import Channel
from fcn_jax.data.errors import DataError
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
    for path in map(str, paths):
        if not os.path.exists(path):
            raise DataError(f"{path}: file not found")
        year = _year_of(path)
        try:
            with HDF5_LOCK, h5py.File(path, "r") as f:
                if dataset not in f:
                    raise DataError(f"{path}: no dataset {dataset!r}; expected FourCastNet's "
                                    f"'{dataset}' of shape (n_time, {len(layout)}, lat, lon); found {list(f)}")
                shape = f[dataset].shape
        except DataError:
            raise
        except Exception as e:
            raise DataError(f"{path}: cannot open as HDF5 ({type(e).__name__}: {e}); "
                            "expected a complete FourCastNet year file (truncated copy?)") from e
        if len(shape) != 4 or shape[1] != len(layout):
            raise DataError(f"{path}: dataset {dataset!r} has shape {shape}; expected "
                            f"(n_time, {len(layout)}, lat, lon) for channel layout {layout}")
        n, _, h, w = shape
        start = np.datetime64(f"{year:04d}-01-01T00:00", "ns")
        times = start + np.arange(n) * np.timedelta64(step_hours, "h").astype("timedelta64[ns]")
        lat = np.linspace(90.0, -90.0, h)
        lon = np.arange(w) * (360.0 / w)
        handle = _H5Field(path, dataset)
        for ch in channels:
            if ch.name not in canon_layout:
                raise DataError(f"{path}: channel {ch.name} is not in the HDF5 channel layout "
                                f"{layout}; expected one of {[n for n in canon_layout if n]}")
            ci = canon_layout.index(ch.name)

            def read(a: int, b: int, _ci=ci, _h=handle, _path=path, _ch=ch) -> np.ndarray:
                try:
                    with HDF5_LOCK:
                        x = _h.get()[a:b, _ci]
                except Exception as e:
                    raise DataError(f"{_path} dataset 'fields' channel index {_ci} ({_ch.name}): cannot "
                                    f"read time steps {a}..{b - 1}: {type(e).__name__}: {e}") from e
                return np.asarray(x, dtype=np.float32)

            pieces.append(Piece(ch, path, f"{dataset}[:, {ci}]", times, lat, lon, read))
    return assemble(channels, pieces, source_kind="fcn-hdf5", files=list(map(str, paths)),
                    allow_gaps=allow_gaps, allowed_gap=_year_end_gap,
                    extra_attrs={"hdf5_layout": ",".join(n or "-" for n in layout)})
