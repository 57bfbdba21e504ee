"""Streaming statistics for the training store: one pass, float64 accumulation.

* :class:`ChannelMoments` - per-channel global mean and standard deviation over
  (time, lat, lon), unweighted, merged block by block with Chan et al.'s
  parallel update (numerically stable; no E[x^2] - E[x]^2 cancellation).
* :class:`TimeMean` - time-mean climatology [channel, lat, lon] (FourCastNet's
  ``time_means.npy``, used by its ACC).
* :class:`DoyHourClimatology` - day-of-year x hour-of-day climatology
  [dayofyear=366, hour, channel, lat, lon] (WeatherBench 2 style), smoothed
  along day-of-year with a circular triangular window. The original's
  statistics script left its climatology at zero (NVlabs/FourCastNet#3); this
  one is computed from the data and tested against NumPy.

The day-of-year sums live in memory when they fit a byte budget, otherwise in
a zarr scratch array with one chunk per (day, hour) slot, so a 0.25-degree
store needs memory for a few slots only. The smoothing is two circular
running-sum (box) passes, which together make a triangle: 2 slot reads per
output slot whatever the window.
"""

from __future__ import annotations

import os
from typing import Callable, Sequence

import numpy as np

N_DOY = 366  # day-of-year 1..366 (366 only in leap years)


class ChannelMoments:
    """Per-channel mean / population std over (time, lat, lon), float64."""

    def __init__(self, n_channels: int):
        self.n = 0
        self.mean = np.zeros(n_channels, np.float64)
        self.m2 = np.zeros(n_channels, np.float64)

    def update(self, x: np.ndarray) -> None:
        """x: [time, channel, lat, lon]."""
        if x.shape[0] == 0:
            return
        xb = x.astype(np.float64)
        nb = x.shape[0] * x.shape[2] * x.shape[3]
        mb = xb.mean(axis=(0, 2, 3))
        m2b = ((xb - mb[None, :, None, None]) ** 2).sum(axis=(0, 2, 3))
        n = self.n + nb
        delta = mb - self.mean
        self.mean = self.mean + delta * (nb / n)
        self.m2 = self.m2 + m2b + delta**2 * (self.n * nb / n)
        self.n = n

    def result(self) -> tuple[np.ndarray, np.ndarray]:
        if self.n == 0:
            raise ValueError("no samples accumulated")
        return self.mean.copy(), np.sqrt(self.m2 / self.n)


class TimeMean:
    """Mean over time per (channel, lat, lon), float64 accumulation."""

    def __init__(self, shape_chw: tuple[int, int, int]):
        self.sum = np.zeros(shape_chw, np.float64)
        self.n = 0

    def update(self, x: np.ndarray) -> None:
        """x: [time, channel, lat, lon]."""
        self.sum += x.sum(axis=0, dtype=np.float64)
        self.n += x.shape[0]

    def result(self) -> np.ndarray:
        if self.n == 0:
            raise ValueError("no samples accumulated")
        return (self.sum / self.n).astype(np.float32)


def _circular_box(get: Callable[[int], np.ndarray], n: int, lo: int, hi: int,
                  emit: Callable[[int, np.ndarray], None]) -> None:
    """emit(d, sum_{k=lo..hi} get((d + k) mod n)) for d = 0..n-1 with a running sum."""
    acc = get(lo % n).astype(np.float64, copy=True)
    for k in range(lo + 1, hi + 1):
        acc += get(k % n)
    emit(0, acc)
    for d in range(1, n):
        acc += get((d + hi) % n)
        acc -= get((d - 1 + lo) % n)
        emit(d, acc)


class _SlotStore:
    """(dayofyear, hour) -> [channel, lat, lon] float64, in memory or in zarr."""

    def __init__(self, n_hours: int, shape_chw: tuple[int, int, int], path: str | None):
        self.shape = (N_DOY, n_hours) + tuple(shape_chw)
        if path is None:
            self._a = np.zeros(self.shape, np.float64)
            self._z = None
        else:
            import zarr

            self._a = None
            self._z = zarr.create_array(store=path, shape=self.shape, chunks=(1, 1) + tuple(shape_chw),
                                        dtype="float64", fill_value=0.0, zarr_format=2, compressors=None)

    def get(self, d: int, h: int) -> np.ndarray:
        return self._a[d, h] if self._a is not None else self._z[d, h]

    def set(self, d: int, h: int, v: np.ndarray) -> None:
        if self._a is not None:
            self._a[d, h] = v
        else:
            self._z[d, h] = v

    def add(self, d: int, h: int, v: np.ndarray) -> None:
        if self._a is not None:
            self._a[d, h] += v
        else:
            self._z[d, h] = self._z[d, h] + v


class DoyHourClimatology:
    """Day-of-year x hour climatology with a circular triangular smoothing window.

    Args:
      shape_chw: (channel, lat, lon).
      hours: the hours of day present (e.g. [0, 6, 12, 18]).
      window_days: odd full width of the triangular window in days (61 as in
        WeatherBench 2's ERA5 climatology); 1 = no smoothing.
      scratch_dir: where to keep the sums when they exceed ``memory_bytes``.
      memory_bytes: budget for in-memory sums (two slot arrays of float64).
    """

    def __init__(self, shape_chw: tuple[int, int, int], hours: Sequence[int], *, window_days: int = 61,
                 scratch_dir: str | None = None, memory_bytes: int = 2 << 30):
        if window_days < 1 or window_days % 2 == 0 or window_days > N_DOY - 1:
            raise ValueError(f"window_days must be odd and in [1, {N_DOY - 1}], got {window_days}")
        self.hours = [int(h) for h in hours]
        self.window_days = window_days
        self.shape_chw = tuple(shape_chw)
        nbytes = 2 * N_DOY * len(self.hours) * int(np.prod(shape_chw)) * 8
        self.in_memory = nbytes <= memory_bytes or scratch_dir is None
        self._scratch = scratch_dir
        sums_path = None if self.in_memory else os.path.join(scratch_dir, "clim_sums.zarr")
        self.sums = _SlotStore(len(self.hours), self.shape_chw, sums_path)
        self.counts = np.zeros((N_DOY, len(self.hours)), np.float64)

    def update(self, x: np.ndarray, times: np.ndarray) -> None:
        """x: [time, channel, lat, lon]; times: datetime64 per row."""
        doy, hour = day_of_year_and_hour(times)
        for i in range(x.shape[0]):
            if hour[i] not in self.hours:
                raise ValueError(f"hour {hour[i]} not among climatology hours {self.hours}")
            h = self.hours.index(int(hour[i]))
            self.sums.add(int(doy[i]) - 1, h, x[i].astype(np.float64))
            self.counts[int(doy[i]) - 1, h] += 1

    def finalize(self, put: Callable[[int, int, np.ndarray], None], fallback: np.ndarray,
                 progress: Callable[[int], None] | None = None) -> int:
        """Smooth and emit every slot: put(doy_index, hour_index, [C, lat, lon] float32).

        Slots whose window holds no sample get ``fallback`` (the time mean).
        Returns the number of such filled slots.
        """
        m = self.window_days // 2
        a, b = m // 2, m - m // 2  # box [-a, b] then box [-b, a] = triangle [-m, m]
        nh = len(self.hours)
        mid_path = None if self.in_memory else os.path.join(self._scratch, "clim_mid.zarr")
        mid = _SlotStore(nh, self.shape_chw, mid_path)
        filled = 0
        for h in range(nh):
            c1 = np.zeros(N_DOY)
            _circular_box(lambda d: np.asarray(self.counts[d, h]), N_DOY, -a, b,
                          lambda d, v: c1.__setitem__(d, float(v)))
            c2 = np.zeros(N_DOY)
            _circular_box(lambda d: np.asarray(c1[d]), N_DOY, -b, a, lambda d, v: c2.__setitem__(d, float(v)))
            _circular_box(lambda d: self.sums.get(d, h), N_DOY, -a, b, lambda d, v: mid.set(d, h, v))

            def emit(d: int, s: np.ndarray) -> None:
                nonlocal filled
                if c2[d] > 0:
                    put(d, h, (s / c2[d]).astype(np.float32))
                else:
                    filled += 1
                    put(d, h, fallback.astype(np.float32))
                if progress is not None:
                    progress(1)

            _circular_box(lambda d: mid.get(d, h), N_DOY, -b, a, emit)
        return filled


def day_of_year_and_hour(times: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Day of year (1..366, as pandas/xarray's ``dt.dayofyear``) and hour of day."""
    t = np.asarray(times).astype("datetime64[ns]")
    days = t.astype("datetime64[D]")
    years = t.astype("datetime64[Y]")
    doy = (days - years.astype("datetime64[D]")).astype(np.int64) + 1
    hour = ((t - days).astype("timedelta64[h]")).astype(np.int64)
    return doy, hour
