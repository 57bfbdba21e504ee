"""Checks of a source's time axis: strictly increasing, regular, gaps named."""

from __future__ import annotations

from typing import Callable

import numpy as np

from fcn_jax.data.errors import DataError


def fmt_time(t) -> str:
    return str(np.datetime_as_string(np.datetime64(t, "ns"), unit="m"))


def check_times_increasing(times: np.ndarray, where: str) -> None:
    """Strictly increasing time axis; names the first duplicate or step back."""
    d = np.diff(times.astype("datetime64[ns]").astype(np.int64))
    bad = np.nonzero(d <= 0)[0]
    if bad.size:
        i = int(bad[0])
        what = "duplicate time" if d[i] == 0 else "time goes backwards at"
        raise DataError(f"{where}: {what} {fmt_time(times[i + 1])} (after {fmt_time(times[i])}); "
                        "expected strictly increasing times")


def infer_time_step(times: np.ndarray) -> np.timedelta64:
    """The most common spacing (the nominal step; gaps are larger)."""
    if times.size < 2:
        return np.timedelta64(6, "h").astype("timedelta64[ns]")
    d = np.diff(times.astype("datetime64[ns]")).astype(np.int64)
    vals, counts = np.unique(d, return_counts=True)
    return np.timedelta64(int(vals[np.argmax(counts)]), "ns")


def check_regular(times: np.ndarray, where: str, *, allow_gaps: bool = False,
                  allowed_gap: Callable[[np.datetime64, np.datetime64], bool] | None = None) -> np.timedelta64:
    """Check a regular time axis; returns its step.

    A gap (a spacing larger than the step) is an error unless ``allow_gaps`` or
    ``allowed_gap(before, after)`` says it is expected (e.g. the FourCastNet
    HDF5 leap-year files that stop on 30 December). Irregular spacings smaller
    than the step are always an error.
    """
    check_times_increasing(times, where)
    step = infer_time_step(times)
    d = np.diff(times.astype("datetime64[ns]")).astype(np.int64)
    s = int(step.astype(np.int64))
    for i in np.nonzero(d != s)[0]:
        i = int(i)
        before, after = times[i], times[i + 1]
        if d[i] % s == 0 and (allow_gaps or (allowed_gap is not None and allowed_gap(before, after))):
            continue
        hours = s / 3.6e12
        raise DataError(
            f"{where}: time gap between {fmt_time(before)} and {fmt_time(after)} "
            f"(expected a step of {hours:g} h; {int(d[i] // s) - 1 if d[i] % s == 0 else 'non-integer number of'} "
            f"steps missing)"
        )
    return step
