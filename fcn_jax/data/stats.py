"""Streaming statistics for the training store: one pass, float64 accumulation.

* :class:`ChannelMoments` - per-channel global mean and standard deviation over
  (time, lat, lon), unweighted, merged block by block with Chan et al.'s
  parallel update (numerically stable; no E[x^2] - E[x]^2 cancellation).
* :class:`TimeMean` - time-mean climatology [channel, lat, lon] (FourCastNet's
  ``time_means.npy``, used by its ACC).
* :func:`day_of_year_and_hour` - the slot keys of day-of-year climatologies
  (built by :mod:`fcn_jax.data.climatology`, without float64 full-size
  accumulators).
"""

from __future__ import annotations

import numpy as np

N_DOY = 366  # day-of-year 1..366 (366 only in leap years)


class ChannelMoments:
    """Per-channel mean / population std over (time, lat, lon), float64."""

    def __init__(self, n_channels: int):
        self.n = 0
        self.mean = np.zeros(n_channels, np.float64)
        self.m2 = np.zeros(n_channels, np.float64)

    def update(self, x: np.ndarray) -> None:
        """x: [time, channel, lat, lon].

        Sums run in float64 through NumPy's buffered casting (no float64 copy
        of the block); the squares are of deviations from the block mean
        rounded to float32, ``K``, corrected exactly by ``n (mean - K)**2``, so
        there is no cancellation.
        """
        if x.shape[0] == 0:
            return
        nb = x.shape[0] * x.shape[2] * x.shape[3]
        mb = x.sum(axis=(0, 2, 3), dtype=np.float64) / nb
        k = mb.astype(x.dtype)
        d = x - k[None, :, None, None]
        np.multiply(d, d, out=d)
        m2b = d.sum(axis=(0, 2, 3), dtype=np.float64) - nb * (mb - k.astype(np.float64)) ** 2
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


def day_of_year_and_hour(times: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Day of year (1..366, as pandas/xarray's ``dt.dayofyear``) and hour of day."""
    t = np.asarray(times).astype("datetime64[ns]")
    days = t.astype("datetime64[D]")
    years = t.astype("datetime64[Y]")
    doy = (days - years.astype("datetime64[D]")).astype(np.int64) + 1
    hour = ((t - days).astype("timedelta64[h]")).astype(np.int64)
    return doy, hour
