"""Hourly sources -> the 6-hourly store: sum accumulations, subsample states, trim edges.

ERA5 on the CDS (and the hourly WeatherBench 2 / ARCO stores) gives total
precipitation ``tp`` as *hourly* accumulations: the value at ``t`` is the rain of
the hour ending at ``t``. The store, like the original FourCastNet, holds the
6-hour accumulation ending at each time stamp (fourcastnet-model.md §11.1), so
for a stamp ``t`` (00, 06, 12, 18 UTC)::

    tp6(t) = tp1(t - 5 h) + tp1(t - 4 h) + ... + tp1(t)

summed in float64. A stamp is produced only when all six hours are present;
hourly instantaneous channels are subsampled to the same stamps; and the edges
of the time axis are trimmed to the span every channel covers (the first stamp
of a download starting at 00 UTC is 06 UTC, whose six hours are all there),
recorded in the store's ``time_trimmed`` attribute. Interior mismatches stay
errors (:func:`~fcn_jax.data.readers.source.assemble`).
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

from fcn_jax.data.errors import DataError
from fcn_jax.data.readers.pieces import Piece
from fcn_jax.data.readers.timeaxis import check_times_increasing, fmt_time

#: Channels whose values are accumulations over the interval ending at the time stamp.
ACCUMULATED = ("tp",)
HOUR = np.timedelta64(1, "h").astype("timedelta64[ns]")
TARGET_STEP_HOURS = 6


def _runs(idx: np.ndarray) -> list[tuple[int, int, int]]:
    """(position in idx, first, last + 1) of each run of consecutive integers."""
    out, start = [], 0
    for k in range(1, idx.size + 1):
        if k == idx.size or idx[k] != idx[k - 1] + 1:
            out.append((start, int(idx[start]), int(idx[k - 1]) + 1))
            start = k
    return out


def subset_piece(p: Piece, idx: np.ndarray, note: str = "") -> Piece:
    """The piece restricted to its local time indices ``idx`` (sorted), reading runs only."""
    idx = np.asarray(idx, np.int64)

    def read(a: int, b: int) -> np.ndarray:
        sel = idx[a:b]
        parts = [p.reader(s, e) for _, s, e in _runs(sel)]
        return np.concatenate(parts, axis=0) if parts else np.empty((0, p.lat.size, p.lon.size), np.float32)

    return Piece(p.channel, p.path, p.variable, p.times[idx], p.lat, p.lon, read, p.note or note)


class _Series:
    """One channel's pieces joined along time: read(i0, i1) across files."""

    def __init__(self, pieces: Sequence[Piece]):
        self.pieces = sorted(pieces, key=lambda p: p.times[0])
        self.times = np.concatenate([p.times for p in self.pieces])
        check_times_increasing(self.times, f"channel {self.pieces[0].channel.name} in {[p.path for p in pieces]}")
        self.bounds = np.cumsum([0] + [p.times.size for p in self.pieces])

    def read(self, i0: int, i1: int) -> np.ndarray:
        parts = []
        for k, p in enumerate(self.pieces):
            a, b = max(i0, int(self.bounds[k])), min(i1, int(self.bounds[k + 1]))
            if a < b:
                parts.append(p.reader(a - int(self.bounds[k]), b - int(self.bounds[k])))
        return np.concatenate(parts, axis=0)


def _is_hourly(times: np.ndarray) -> bool:
    if times.size < 2:
        return False
    d = np.diff(times.astype("datetime64[ns]"))
    return bool(np.median(d.astype(np.int64)) == HOUR.astype(np.int64))


def sum_hourly(pieces: Sequence[Piece], hours: int = TARGET_STEP_HOURS) -> Piece:
    """One piece of ``hours``-hour accumulations ending at each stamp (hour % hours == 0)."""
    s = _Series(pieces)
    t = s.times.astype("datetime64[ns]")
    hod = (t - t.astype("datetime64[D]")).astype("timedelta64[h]").astype(np.int64)
    on_stamp = np.nonzero((hod % hours == 0) & ((t - t.astype("datetime64[h]")).astype(np.int64) == 0))[0]
    ends = on_stamp[on_stamp >= hours - 1]
    ok = t[ends - (hours - 1)] == t[ends] - (hours - 1) * HOUR  # all six hours there (strictly increasing)
    ends = ends[ok]
    if ends.size == 0:
        raise DataError(f"channel {s.pieces[0].channel.name}: no {hours}-hour window complete in the hourly "
                        f"accumulations {[p.path for p in s.pieces]} ({fmt_time(t[0])}..{fmt_time(t[-1])})")

    def read(a: int, b: int) -> np.ndarray:
        sel = ends[a:b]
        out = []
        # consecutive stamps (6 h apart in the hourly series) are read as one range
        k = 0
        while k < sel.size:
            j = k
            while j + 1 < sel.size and sel[j + 1] == sel[j] + hours:
                j += 1
            x = s.read(int(sel[k]) - hours + 1, int(sel[j]) + 1).astype(np.float64)
            out.append(x.reshape(j - k + 1, hours, *x.shape[1:]).sum(axis=1).astype(np.float32))
            k = j + 1
        return np.concatenate(out, axis=0)

    p0 = s.pieces[0]
    paths = ",".join(dict.fromkeys(p.path for p in s.pieces))
    return Piece(p0.channel, paths, p0.variable, t[ends], p0.lat, p0.lon, read,
                 f"sum of {hours} hourly accumulations ending at each time stamp")


def trim_to_common_span(pieces: Sequence[Piece]) -> tuple[list[Piece], str]:
    """Drop each channel's times outside the span all channels cover; returns (pieces, note)."""
    by: dict[str, list[Piece]] = {}
    for p in pieces:
        by.setdefault(p.channel.name, []).append(p)
    first = max(min(p.times[0] for p in ps) for ps in by.values())
    last = min(max(p.times[-1] for p in ps) for ps in by.values())
    if first > last:
        raise DataError(f"the channels' time spans do not overlap: {[(n, fmt_time(min(p.times[0] for p in ps)), fmt_time(max(p.times[-1] for p in ps))) for n, ps in by.items()]}")  # noqa: E501
    out, dropped = [], 0
    for p in pieces:
        keep = np.nonzero((p.times >= first) & (p.times <= last))[0]
        dropped += p.times.size - keep.size
        if keep.size == p.times.size:
            out.append(p)
        elif keep.size:
            out.append(subset_piece(p, keep))
    note = f"edges trimmed to {fmt_time(first)}..{fmt_time(last)} ({dropped} step(s) dropped)" if dropped else ""
    return out, note


def to_six_hourly(pieces: Sequence[Piece]) -> tuple[list[Piece], str]:
    """If an accumulated channel comes hourly: sum it, subsample hourly states, trim the edges.

    Returns (pieces, note); pieces unchanged (note "") when nothing is hourly-accumulated.
    """
    acc = {}
    for p in pieces:
        if p.channel.name in ACCUMULATED:
            acc.setdefault(p.channel.name, []).append(p)
    hourly = {n: ps for n, ps in acc.items() if _is_hourly(np.concatenate([q.times for q in ps]))}
    if not hourly:
        return list(pieces), ""
    out: list[Piece] = [sum_hourly(ps) for ps in hourly.values()]
    for p in pieces:
        if p.channel.name in hourly:
            continue
        if _is_hourly(p.times):
            t = p.times.astype("datetime64[ns]")
            hod = (t - t.astype("datetime64[D]")).astype("timedelta64[h]").astype(np.int64)
            exact = (t - t.astype("datetime64[h]")).astype(np.int64) == 0
            p = subset_piece(p, np.nonzero((hod % TARGET_STEP_HOURS == 0) & exact)[0],
                             note="hourly, subsampled to 00/06/12/18 UTC")
        out.append(p)
    out, note = trim_to_common_span(out)
    return out, note
