"""Climatologies of the training store: which one, how it is accumulated, imported.

Three kinds (``prepare(..., climatology=...)``, ``--climatology``):

* ``time-mean``: ``time_mean[channel, lat, lon]`` only (always written; what the
  original FourCastNet's ACC uses).
* ``doy-hour``: also ``clim_doy_hour[dayofyear=366, hour, channel, lat, lon]``,
  the WeatherBench 2 style climatology smoothed along day of year by a
  circular triangular window.
* a path or fsspec URL: a WeatherBench 2-format climatology zarr (variables by
  long name, dims ``(hour, dayofyear, [level,] longitude, latitude)`` in any
  order) imported as ``clim_doy_hour``, regridded bilinearly to the store's grid
  when the grids differ.

``auto`` picks ``doy-hour`` only when the statistics period spans at least
:data:`DOY_HOUR_MIN_YEARS` years, else ``time-mean`` (and says so). Why 3: a
slot of the smoothed climatology averages about ``window / tau`` independent
samples a year (61 days / ~7 days decorrelation = ~9); its sampling error adds
a fraction ``1 / (9 N)`` of the anomaly variance after ``N`` years -- 11 % for
one year (the "climatology" is then mostly that year's weather), under 4 % from
three. Below that the time mean is the honest reference.

Cost. The accumulator never holds full-size float64 arrays: one file per
(day-of-year, hour) slot holds the running *mean* in float32 plus a 16-byte
header (sample count, index of the last time step applied), so the scratch is
the size of the output (366 x hours x channel x lat x lon x 4 bytes). An update
is idempotent -- a slot whose header shows the time step already applied is
skipped, and files are replaced by atomic rename -- so a killed ``prepare``
resumes without double counting. The smoothing then works on latitude bands
that fit ``memory_bytes`` (float64 there): all 366 x hours slots of the band
are read, smoothed with two circular running-sum passes (box ``[-a, b]`` then
``[-b, a]``, together the triangle ``[-m, m]``) and written to band-aligned
output chunks. Time and I/O are linear in the data.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from fcn_jax.data.errors import DataError
from fcn_jax.data.stats import N_DOY, day_of_year_and_hour

#: ``auto`` builds the day-of-year x hour climatology from this many years of statistics data.
DOY_HOUR_MIN_YEARS = 3.0


def span_years(times: np.ndarray, step: np.timedelta64) -> float:
    """Years covered by ``times`` (count x step / 365.25 days): gaps do not count."""
    return float(len(times) * (step / np.timedelta64(1, "h")) / (24 * 365.25))


def resolve_mode(climatology: str, years_covered: float) -> tuple[str, str | None, str]:
    """(kind, path, reason): kind in ``time-mean``, ``doy-hour``, ``import``."""
    c = str(climatology)
    if c == "time-mean":
        return "time-mean", None, "requested (--climatology time-mean)"
    if c == "doy-hour":
        return "doy-hour", None, "requested (--climatology doy-hour)"
    if c == "auto":
        if years_covered >= DOY_HOUR_MIN_YEARS:
            return "doy-hour", None, (f"auto: the statistics period spans {years_covered:.2f} years "
                                      f">= {DOY_HOUR_MIN_YEARS:g}")
        return "time-mean", None, (f"auto: the statistics period spans only {years_covered:.2f} years "
                                   f"(< {DOY_HOUR_MIN_YEARS:g}), too few for a meaningful day-of-year x hour "
                                   "climatology; writing the time mean only (force with --climatology doy-hour)")
    if "://" in c or os.path.exists(c):
        return "import", c, f"imported from {c}"
    raise DataError(f"--climatology {c!r}: expected auto, time-mean, doy-hour, or the path/URL of a "
                    "WeatherBench 2-format climatology zarr (not found)")


# ----------------------------------------------------------- accumulation
_HEADER = 16  # int64 count, int64 index of the last time step applied


class SlotAccumulator:
    """Running means per (day-of-year, hour) slot in files under ``directory``.

    Args:
      directory: scratch directory (created).
      shape_chw: (channel, lat, lon) of one time step.
      hours: hours of day present (e.g. [0, 6, 12, 18]).
    """

    def __init__(self, directory: str | os.PathLike, shape_chw: tuple[int, int, int], hours: Sequence[int]):
        self.dir = Path(directory)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.shape_chw = tuple(int(s) for s in shape_chw)
        self.hours = [int(h) for h in hours]

    def _path(self, d: int, h: int) -> Path:
        return self.dir / f"slot-{d:03d}-{h:02d}.bin"

    def _header(self, p: Path) -> tuple[int, int]:
        try:
            with open(p, "rb") as f:
                n, last = np.frombuffer(f.read(_HEADER), np.int64)
            return int(n), int(last)
        except FileNotFoundError:
            return 0, -1

    def _mean(self, p: Path) -> np.ndarray:
        return np.fromfile(p, np.float32, offset=_HEADER).reshape(self.shape_chw)

    def update(self, x: np.ndarray, times: np.ndarray, t_index: np.ndarray) -> None:
        """x: [time, channel, lat, lon]; ``times`` and global indices ``t_index`` per row."""
        doy, hour = day_of_year_and_hour(times)
        for i in range(x.shape[0]):
            if int(hour[i]) not in self.hours:
                raise DataError(f"hour {int(hour[i])} not among the climatology hours {self.hours}")
            p = self._path(int(doy[i]) - 1, self.hours.index(int(hour[i])))
            n, last = self._header(p)
            if last >= int(t_index[i]):
                continue  # applied before an interruption
            if n == 0:
                new = np.asarray(x[i], np.float32)
            else:
                old = self._mean(p).astype(np.float64)
                new = (old + (x[i].astype(np.float64) - old) / (n + 1)).astype(np.float32)
            tmp = p.with_suffix(".tmp")
            with open(tmp, "wb") as f:
                f.write(np.asarray([n + 1, int(t_index[i])], np.int64).tobytes())
                f.write(np.ascontiguousarray(new).tobytes())
            os.replace(tmp, p)

    def counts(self) -> np.ndarray:
        """[366, hours] samples per slot."""
        out = np.zeros((N_DOY, len(self.hours)), np.int64)
        for d in range(N_DOY):
            for h in range(len(self.hours)):
                out[d, h] = self._header(self._path(d, h))[0]
        return out

    def read_band(self, r0: int, r1: int, counts: np.ndarray) -> np.ndarray:
        """Slot means of rows [r0, r1): [366, hours, channel, r1 - r0, lon] float32 (0 where empty)."""
        c, _, w = self.shape_chw
        out = np.zeros((N_DOY, len(self.hours), c, r1 - r0, w), np.float32)
        for d in range(N_DOY):
            for h in range(len(self.hours)):
                if counts[d, h]:
                    m = np.memmap(self._path(d, h), np.float32, mode="r", offset=_HEADER, shape=self.shape_chw)
                    out[d, h] = m[:, r0:r1]
                    del m
        return out


def _box(a: np.ndarray, lo: int, hi: int) -> np.ndarray:
    """out[d] = sum_{k=lo..hi} a[(d + k) mod n] along axis 0 (running sums)."""
    n = a.shape[0]
    ext = a[np.arange(lo, n + hi) % n]
    c = np.concatenate([np.zeros((1,) + a.shape[1:], a.dtype), np.cumsum(ext, axis=0)])
    return c[hi - lo + 1: hi - lo + 1 + n] - c[:n]


def smooth_band(means: np.ndarray, counts: np.ndarray, window_days: int, fallback: np.ndarray) -> np.ndarray:
    """Triangular circular smoothing of slot means, weighted by their counts.

    means: [366, hours, channel, rows, lon]; counts: [366, hours];
    fallback: [channel, rows, lon] for slots whose window holds no sample.
    Returns float32 of the shape of ``means``: sum_k w_k n_k m_k / sum_k w_k n_k
    with w_k = m + 1 - |k| for |k| <= m = window_days // 2.
    """
    m = window_days // 2
    a, b = m // 2, m - m // 2
    n = counts.astype(np.float64)
    s = means.astype(np.float64) * n[:, :, None, None, None]
    s = _box(_box(s, -a, b), -b, a)
    n = _box(_box(n, -a, b), -b, a)
    n = np.rint(n)  # integer weights: exact zeros stay zero
    ok = n > 0
    out = np.empty(means.shape, np.float32)
    out[ok] = (s[ok] / n[ok][:, None, None, None]).astype(np.float32)
    out[~ok] = fallback.astype(np.float32)
    return out


def band_rows(shape_chw: tuple[int, int, int], n_hours: int, memory_bytes: int) -> int:
    """Latitude rows per smoothing band: ~5 float64 copies of a band fit ``memory_bytes``."""
    c, h, w = shape_chw
    per_row = N_DOY * n_hours * c * w * 8 * 5
    return int(max(1, min(h, memory_bytes // max(per_row, 1))))


def finalize_doy_hour(acc: SlotAccumulator, out_array, window_days: int, fallback: np.ndarray, rows: int,
                      progress: Callable[[int], None] | None = None) -> int:
    """Smooth band by band into ``out_array`` [366, hours, C, lat, lon]; returns the slots filled
    with ``fallback`` (windows without any sample)."""
    counts = acc.counts()
    h_total = acc.shape_chw[1]
    filled = 0
    for r0 in range(0, h_total, rows):
        r1 = min(h_total, r0 + rows)
        means = acc.read_band(r0, r1, counts)
        out = smooth_band(means, counts, window_days, fallback[:, r0:r1])
        out_array[:, :, :, r0:r1, :] = out
        if progress is not None:
            progress(r1 - r0)
    m = window_days // 2
    a, b = m // 2, m - m // 2
    n = np.rint(_box(_box(counts.astype(np.float64), -a, b), -b, a))
    filled = int((n == 0).sum())
    return filled


# ------------------------------------------------------------------ import
def linear_regrid(x: np.ndarray, src_lat, src_lon, dst_lat, dst_lon) -> np.ndarray:
    """Bilinear interpolation of x[..., lat, lon]; periodic in longitude, latitude clamped.

    ``src_lat`` in either order, ``src_lon`` ascending in [0, 360).
    """
    src_lat, src_lon = np.asarray(src_lat, np.float64), np.asarray(src_lon, np.float64)
    dst_lat, dst_lon = np.asarray(dst_lat, np.float64), np.asarray(dst_lon, np.float64)
    if src_lat[0] > src_lat[-1]:
        src_lat, x = src_lat[::-1], x[..., ::-1, :]
    lat_c = np.clip(dst_lat, src_lat[0], src_lat[-1])
    i1 = np.clip(np.searchsorted(src_lat, lat_c), 1, len(src_lat) - 1)
    i0 = i1 - 1
    wl = (lat_c - src_lat[i0]) / np.maximum(src_lat[i1] - src_lat[i0], 1e-12)
    lon_ext = np.concatenate([src_lon, [src_lon[0] + 360.0]])
    dl = np.mod(dst_lon, 360.0)
    dl = np.where(dl < src_lon[0], dl + 360.0, dl)
    j1 = np.clip(np.searchsorted(lon_ext, dl), 1, len(lon_ext) - 1)
    j0 = j1 - 1
    wo = (dl - lon_ext[j0]) / (lon_ext[j1] - lon_ext[j0])
    j0, j1 = j0 % len(src_lon), j1 % len(src_lon)
    x = np.asarray(x, np.float64)
    rows = x[..., i0, :] * (1 - wl)[:, None] + x[..., i1, :] * wl[:, None]
    return rows[..., j0] * (1 - wo) + rows[..., j1] * wo


class WB2Climatology:
    """A WeatherBench 2-format climatology zarr, opened lazily: what both its import and evaluate read.

    Attributes: ``doys`` and ``hours`` (as stored), ``lat_idx``/``lon_idx``
    (putting the grid north -> south, lon in [0, 360)), ``lat``/``lon`` (that
    grid), ``vars``: channel name -> ``(DataArray (dayofyear, hour, lat, lon)
    as stored, scale, offset)``. Variables are found by WB2 long name (CDS
    short name tried next), levels in hPa, units converted as for sources.
    ``missing="raise"``: a channel without a variable is an error naming what
    the file has; ``"skip"``: left out of ``vars``.
    """

    def __init__(self, path: str, channels, *, missing: str = "raise"):
        import xarray as xr

        from fcn_jax.data.channels import resolve_channels
        from fcn_jax.data.readers.grid import orientation_indexers
        from fcn_jax.data.readers.pieces import variable_candidates
        from fcn_jax.data.readers.units import unit_conversion

        try:
            ds = xr.open_zarr(path, chunks=None, decode_timedelta=False)
        except Exception as e:
            raise DataError(f"{path}: cannot open the climatology as a zarr store ({type(e).__name__}: {e})") from e
        ds = ds.rename({k: v for k, v in (("latitude", "lat"), ("longitude", "lon")) if k in ds.dims})
        for need in ("dayofyear", "hour", "lat", "lon"):
            if need not in ds.dims:
                raise DataError(f"{path}: climatology lacks dimension {need!r}; expected WeatherBench 2's "
                                f"(hour, dayofyear, [level,] longitude, latitude), found {dict(ds.sizes)}")
        self.path = path
        self.doys = np.asarray(ds["dayofyear"].values).astype(int)
        self.hours = [int(h) for h in np.asarray(ds["hour"].values)]
        self.lat_idx, self.lon_idx, self.lat, self.lon = orientation_indexers(ds["lat"].values, ds["lon"].values,
                                                                              path)
        self.vars = {}
        chans = channels if channels and not isinstance(channels[0], str) else resolve_channels(list(channels))
        for ch in chans:
            var = next((v for v in variable_candidates(ch, "wb2") if v in ds.data_vars), None)
            where = f"{path} variable {var!r}"
            problem = None
            if var is None:
                problem = (f"{path}: climatology has no variable for channel {ch.name} (tried "
                           f"{variable_candidates(ch, 'wb2')}); it has {sorted(map(str, ds.data_vars))}")
            else:
                da = ds[var]
                if ch.is_pressure_level:
                    lv = np.asarray(da["level"].values, np.float64) if "level" in da.dims else np.array([])
                    hit = np.nonzero(np.isclose(lv, ch.level))[0]
                    if "level" not in da.dims:
                        problem = f"{where}: no level dimension for channel {ch.name}"
                    elif not hit.size:
                        problem = f"{where}: level {ch.level} hPa missing; levels {lv.tolist()}"
                    else:
                        da = da.isel(level=int(hit[0]))
                elif "level" in da.dims:
                    problem = f"{where}: single-level channel {ch.name} but the variable has levels"
            if problem:
                if missing == "raise":
                    raise DataError(problem)
                continue
            scale, offset, _ = unit_conversion(da.attrs.get("units"), ch, where)
            self.vars[ch.name] = (da.transpose("dayofyear", "hour", "lat", "lon"), scale, offset)

    def read(self, name: str, **isel) -> np.ndarray:
        """Channel ``name`` at ``isel`` (dayofyear/hour positions as stored), oriented, in the catalogue's units."""
        da, scale, offset = self.vars[name]
        x = np.asarray(da.isel(**isel).values, np.float64)
        return x[..., self.lat_idx, :][..., self.lon_idx] * scale + offset


def import_wb2(path: str, channels, lat: np.ndarray, lon: np.ndarray, out_array,
               progress: Callable[[int], None] | None = None) -> list[int]:
    """Copy a WeatherBench 2-format climatology into ``out_array`` [366, hours, C, lat, lon].

    Returns the hours of day (see :class:`WB2Climatology` for the lookup).
    """
    clim = WB2Climatology(path, channels)
    if sorted(clim.doys.tolist()) != list(range(1, N_DOY + 1)):
        raise DataError(f"{path}: dayofyear must be 1..366; found {clim.doys.min()}..{clim.doys.max()} "
                        f"({clim.doys.size})")
    same = clim.lat.shape == lat.shape and clim.lon.shape == lon.shape and np.allclose(clim.lat, lat, atol=1e-4) \
        and np.allclose(clim.lon, lon, atol=1e-4)
    order = np.argsort(clim.doys)
    for d in range(N_DOY):
        k = int(order[d])
        slab = []
        for name in clim.vars:
            x = clim.read(name, dayofyear=k)  # [hours, lat, lon]
            slab.append(x if same else linear_regrid(x, clim.lat, clim.lon, lat, lon))
        out_array[d] = np.stack(slab, axis=1).astype(np.float32)  # [hours, C, lat, lon]
        if progress is not None:
            progress(1)
    return clim.hours


def wb2_hours(path: str) -> list[int]:
    """Hours of day of a WB2 climatology (for sizing the output before importing)."""
    import xarray as xr

    try:
        ds = xr.open_zarr(path, chunks=None, decode_timedelta=False)
    except Exception as e:
        raise DataError(f"{path}: cannot open the climatology as a zarr store ({type(e).__name__}: {e})") from e
    if "hour" not in ds.dims:
        raise DataError(f"{path}: climatology lacks dimension 'hour'; expected WeatherBench 2's format")
    return [int(h) for h in np.asarray(ds["hour"].values)]
