"""The canonical form every reader produces, and the checks that join pieces into it.

A :class:`CanonicalSource` is a lazy, labelled view of the data as

    fields: [time, channel, lat, lon]   float32, SI units as in ERA5
    lat:    north -> south (descending)
    lon:    0 -> 360 (ascending, [0, 360))
    time:   datetime64[ns], strictly increasing

built from *pieces*, one per (channel, file). Nothing is read until
:meth:`CanonicalSource.read` (a block of time steps) or the dask array behind
:meth:`CanonicalSource.to_xarray` is computed, so a 0.25-degree multi-year
source costs no memory up front and a store can be written streaming.

Why not a single dask graph from the start: concatenating many files lazily
along time and channel builds a graph whose size grows with the data; computing
one block at a time from such a graph costs O(graph) per block. Pieces with
explicit time ranges keep a block read O(1).
"""

from __future__ import annotations

import json
from typing import Callable, Sequence

import numpy as np
import xarray as xr

from fcn_jax.data.channels import Channel
from fcn_jax.data.errors import DataError
from fcn_jax.data.readers.pieces import Piece
from fcn_jax.data.readers.timeaxis import check_regular, check_times_increasing, fmt_time


def check_same_grid(a: Piece, b: Piece) -> None:
    """Pieces must share the lat/lon grid (after orientation) to the float32 rounding."""
    for name, x, y in (("latitude", a.lat, b.lat), ("longitude", a.lon, b.lon)):
        if x.shape != y.shape or not np.allclose(x, y, atol=1e-4, rtol=0):
            raise DataError(
                f"grid mismatch in {name}: {a.where} has {x.size} points "
                f"({x[:1].tolist()}..{x[-1:].tolist()}) but {b.where} has {y.size} "
                f"({y[:1].tolist()}..{y[-1:].tolist()}); expected the same grid in every file"
            )


# ------------------------------------------------------------ canonical source
class CanonicalSource:
    """Lazy canonical data: ``read(t0, t1) -> [T, C, lat, lon]`` float32.

    Built by :func:`assemble` from pieces. Attributes: ``channels`` (list of
    :class:`Channel`), ``times`` (datetime64[ns]), ``lat`` (north -> south),
    ``lon`` ([0, 360)), ``time_step``, ``attrs`` (provenance, for the store).
    """

    def __init__(self, channels: Sequence[Channel], times: np.ndarray, lat: np.ndarray,
                 lon: np.ndarray, segments: dict[str, list[tuple[int, int, Piece]]],
                 time_step: np.timedelta64, attrs: dict):
        self.channels = list(channels)
        self.times = times
        self.lat = lat
        self.lon = lon
        self._segments = segments  # channel -> [(global start, global stop, piece)]
        self.time_step = time_step
        self.attrs = attrs

    @property
    def channel_names(self) -> list[str]:
        return [c.name for c in self.channels]

    @property
    def shape(self) -> tuple[int, int, int, int]:
        return (len(self.times), len(self.channels), len(self.lat), len(self.lon))

    def sources_of(self, channel: str) -> list[str]:
        return [p.where for _, _, p in self._segments[channel]]

    def read(self, t0: int, t1: int) -> np.ndarray:
        """Time steps [t0, t1): x: [t1 - t0, channel, lat, lon] float32."""
        out = np.empty((t1 - t0, len(self.channels), len(self.lat), len(self.lon)), np.float32)
        for ci, ch in enumerate(self.channels):
            for s0, s1, piece in self._segments[ch.name]:
                a, b = max(t0, s0), min(t1, s1)
                if a < b:
                    out[a - t0:b - t0, ci] = piece.reader(a - s0, b - s0)
        return out

    def select_times(self, mask: np.ndarray) -> "CanonicalSource":
        """A view restricted to the time steps where ``mask`` is true."""
        idx = np.nonzero(mask)[0]
        return _SubsetSource(self, idx)

    def drop_last_lat_row(self) -> "CanonicalSource":
        return _RowDropSource(self)

    def to_xarray(self) -> xr.DataArray:
        """The canonical form as a lazy (dask) ``DataArray`` named ``fields``.

        x: [time, channel, lat, lon], one time step per chunk; ``channel`` holds
        the names and ``channel_units`` the units.
        """
        import dask.array as dsa

        arr = dsa.from_array(_BlockView(self), chunks=(1,) + self.shape[1:], asarray=False,
                             fancy=False, lock=False)
        return xr.DataArray(
            arr, dims=("time", "channel", "lat", "lon"), name="fields",
            coords={
                "time": self.times, "channel": self.channel_names,
                "channel_units": ("channel", [c.units for c in self.channels]),
                "lat": ("lat", self.lat, {"units": "degrees_north"}),
                "lon": ("lon", self.lon, {"units": "degrees_east"}),
            },
            attrs={k: v for k, v in self.attrs.items() if isinstance(v, (str, int, float))},
        )


class _SubsetSource(CanonicalSource):
    def __init__(self, parent: CanonicalSource, idx: np.ndarray):
        self._parent = parent
        self._idx = idx
        super().__init__(parent.channels, parent.times[idx], parent.lat, parent.lon,
                         parent._segments, parent.time_step, dict(parent.attrs))

    def read(self, t0: int, t1: int) -> np.ndarray:
        sel = self._idx[t0:t1]
        if sel.size == 0:
            return np.empty((0,) + self.shape[1:], np.float32)
        # Read contiguous runs of the parent in one go.
        out = []
        start = 0
        for k in range(1, sel.size + 1):
            if k == sel.size or sel[k] != sel[k - 1] + 1:
                out.append(self._parent.read(int(sel[start]), int(sel[k - 1]) + 1))
                start = k
        return np.concatenate(out, axis=0)

    def sources_of(self, channel: str) -> list[str]:
        return self._parent.sources_of(channel)


class _RowDropSource(CanonicalSource):
    def __init__(self, parent: CanonicalSource):
        self._parent = parent
        super().__init__(parent.channels, parent.times, parent.lat[:-1], parent.lon,
                         parent._segments, parent.time_step, dict(parent.attrs))

    def read(self, t0: int, t1: int) -> np.ndarray:
        return self._parent.read(t0, t1)[:, :, :-1, :]

    def sources_of(self, channel: str) -> list[str]:
        return self._parent.sources_of(channel)


class _BlockView:
    """Array-like over a CanonicalSource for dask.array.from_array (time slices only)."""

    def __init__(self, src: CanonicalSource):
        self._src = src
        self.shape = src.shape
        self.dtype = np.dtype(np.float32)
        self.ndim = 4

    def __getitem__(self, key):
        if not isinstance(key, tuple):
            key = (key,)
        t = key[0] if key else slice(None)
        t0, t1, step = t.indices(self.shape[0])
        block = self._src.read(t0, t1)[::step]
        return block[(slice(None),) + tuple(key[1:])]


def assemble(channels: Sequence[Channel], pieces: Sequence[Piece], *, source_kind: str,
             files: Sequence[str], allow_gaps: bool = False,
             allowed_gap: Callable[[np.datetime64, np.datetime64], bool] | None = None,
             extra_attrs: dict | None = None) -> CanonicalSource:
    """Check pieces against each other and build a :class:`CanonicalSource`.

    Checks: same grid everywhere; per channel, pieces do not overlap in time
    (a duplicate names both files); every channel has the same time axis
    (a missing time names the channel and its files); the joint axis is
    regular (gaps named unless allowed).
    """
    by_channel: dict[str, list[Piece]] = {c.name: [] for c in channels}
    for p in pieces:
        by_channel[p.channel.name].append(p)
    ref = pieces[0]
    for p in pieces[1:]:
        check_same_grid(ref, p)
    segments: dict[str, list[tuple[int, int, Piece]]] = {}
    axes: dict[str, np.ndarray] = {}
    for c in channels:
        ps = sorted(by_channel[c.name], key=lambda p: p.times[0] if p.times.size else np.datetime64("NaT"))
        for p in ps:
            check_times_increasing(p.times, p.where)
        for p, q in zip(ps, ps[1:]):
            dup = np.intersect1d(p.times, q.times)
            if dup.size:
                raise DataError(f"duplicate time {fmt_time(dup[0])}: present in both {p.where} and {q.where}; "
                                "expected each time step in exactly one file")
            if q.times.size and p.times.size and q.times[0] < p.times[-1]:
                raise DataError(f"files interleave in time: {p.where} and {q.where} overlap "
                                f"({fmt_time(q.times[0])} < {fmt_time(p.times[-1])})")
        segs, start = [], 0
        for p in ps:
            segs.append((start, start + p.times.size, p))
            start += p.times.size
        segments[c.name] = segs
        axes[c.name] = np.concatenate([p.times for p in ps]) if ps else np.array([], "datetime64[ns]")
    names = [c.name for c in channels]
    t_ref = axes[names[0]]
    for n in names[1:]:
        t = axes[n]
        if t.shape != t_ref.shape or not np.array_equal(t, t_ref):
            only_ref = np.setdiff1d(t_ref, t)
            only_n = np.setdiff1d(t, t_ref)
            if only_ref.size:
                msg = (f"channel {n} lacks time {fmt_time(only_ref[0])} that channel {names[0]} has "
                       f"({only_ref.size} missing)")
            else:
                msg = (f"channel {n} has time {fmt_time(only_n[0])} that channel {names[0]} lacks "
                       f"({only_n.size} extra)")
            raise DataError(f"{msg}; sources of {n}: {[p.where for *_, p in segments[n]]}; "
                            f"sources of {names[0]}: {[p.where for *_, p in segments[names[0]]]}")
    if t_ref.size == 0:
        raise DataError(f"no time steps in {list(files)}")
    step = check_regular(t_ref, f"{source_kind} sources {list(files)}", allow_gaps=allow_gaps,
                         allowed_gap=allowed_gap)
    attrs = {
        "source_kind": source_kind,
        "source_files": json.dumps([str(f) for f in files]),
        "channel_sources": json.dumps({c.name: [p.where for *_, p in segments[c.name]] for c in channels}),
        "unit_conversions": json.dumps({p.where: p.note for p in pieces if p.note}),
    }
    attrs.update(extra_attrs or {})
    return CanonicalSource(channels, t_ref, ref.lat, ref.lon, segments, step, attrs)
