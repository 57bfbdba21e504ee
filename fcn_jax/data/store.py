"""The training store: prepare it from sources, open it, read its statistics.

A store is a zarr (format 2) group that ``xarray.open_zarr(STORE)`` opens:

====================  ======================================  =========================================
variable              dims                                    meaning
====================  ======================================  =========================================
``fields``            (time, channel, lat, lon) float32       the data; one time step per chunk
``mean``, ``std``     (channel,) float64                      global per-channel statistics of the
                                                              ``stats_years`` (normalisation)
``time_mean``         (channel, lat, lon) float32             time-mean climatology (FourCastNet ACC)
``clim_doy_hour``     (dayofyear, hour, channel, lat, lon)    day-of-year x hour climatology, smoothed
                      float32                                 by a ``clim_window_days`` triangle
====================  ======================================  =========================================

Coordinates: ``time`` (datetime64), ``channel`` (names), ``channel_units``,
``lat`` (north -> south), ``lon`` ([0, 360)), ``dayofyear`` (1..366), ``hour``.
Attributes record provenance and every choice (``south_pole_dropped``,
``years``, ``stats_years``, ``time_step_hours``, ``source_kind``, ...).

:func:`prepare` writes everything into ``STORE.tmp-*`` beside the target and
renames it into place only when complete: a failure (bad input, Ctrl-C) leaves
no partial store.
"""

from __future__ import annotations

import json
import os
import shutil
import uuid
from pathlib import Path
from typing import Sequence

import numpy as np
import xarray as xr

from fcn_jax.data.channels import resolve_channels
from fcn_jax.data.errors import DataError
from fcn_jax.data.readers import open_source
from fcn_jax.data.readers.common import CanonicalSource, fmt_time
from fcn_jax.data.stats import N_DOY, ChannelMoments, DoyHourClimatology, TimeMean, day_of_year_and_hour

STORE_VERSION = 1


def parse_years(spec: str | int | Sequence[int] | None) -> list[int] | None:
    """'1979-1981,1990' -> [1979, 1980, 1981, 1990]; None -> None (all years)."""
    if spec is None:
        return None
    if isinstance(spec, int):
        return [spec]
    if not isinstance(spec, str):
        return sorted({int(y) for y in spec})
    years: set[int] = set()
    for part in spec.split(","):
        part = part.strip()
        if not part:
            continue
        if "-" in part:
            a, b = (int(s) for s in part.split("-", 1))
            if b < a:
                raise DataError(f"empty year range {part!r}: {b} < {a}")
            years.update(range(a, b + 1))
        else:
            years.add(int(part))
    if not years:
        raise DataError(f"empty year selection {spec!r}")
    return sorted(years)


def _years_of(times: np.ndarray) -> np.ndarray:
    return times.astype("datetime64[Y]").astype(np.int64) + 1970


def select_years(src: CanonicalSource, years: Sequence[int] | None) -> CanonicalSource:
    """Restrict a source to ``years``; every requested year must be present."""
    if years is None:
        return src
    ys = _years_of(src.times)
    have = sorted(set(ys.tolist()))
    missing = [y for y in years if y not in have]
    if missing:
        span = f"{have[0]}..{have[-1]}" if have else "nothing"
        raise DataError(f"years {missing} requested but the source covers {span} "
                        f"(years present: {have}); expected years within the source")
    return src.select_times(np.isin(ys, years))


def _block_steps(src: CanonicalSource, target_bytes: int = 256 << 20) -> int:
    per_step = int(np.prod(src.shape[1:])) * 4
    return int(max(1, min(64, target_bytes // max(per_step, 1))))


def _check_finite(x: np.ndarray, t0: int, src: CanonicalSource) -> None:
    ok = np.isfinite(x)
    if ok.all():
        return
    bad = np.argwhere(~ok)
    t, c = int(bad[0][0]), int(bad[0][1])
    ch = src.channel_names[c]
    n_bad = int((~ok[t, c]).sum())
    kind = "NaN" if np.isnan(x[t, c][~ok[t, c]]).any() else "Inf"
    raise DataError(
        f"{kind} values in channel {ch} at time {fmt_time(src.times[t0 + t])} "
        f"({n_bad} of {ok[t, c].size} grid points, first at lat index {int(bad[0][2])}, lon index "
        f"{int(bad[0][3])}); source: {src.sources_of(ch)}; expected finite values (a packed file's "
        "_FillValue decodes to NaN)"
    )


def prepare(sources: Sequence[str] | str | CanonicalSource, out: str | os.PathLike, *, channels=None,
            years=None, stats_years=None, kind: str = "auto", drop_south_pole: bool = False,
            allow_gaps: bool = False, doy_climatology: bool = True, clim_window_days: int = 61,
            overwrite: bool = False, lat_chunks: int = 1, compression: str = "lz4",
            progress: bool = True, hdf5_layout: Sequence[str | None] | None = None,
            clim_memory_bytes: int = 2 << 30) -> Path:
    """Prepare a training store from source files (see the module docstring).

    Args:
      sources: CDS netCDF files, WB2 zarr stores, FourCastNet HDF5 year files
        (one format), or directories of them; or an already opened
        :class:`~fcn_jax.data.readers.CanonicalSource`.
      out: the store path (``*.zarr``).
      channels: names or a set name, in the order wanted (default ``fcn20``;
        for a CanonicalSource, its channels).
      years: years to keep (``'1979-2015'``, list, or None for all).
      stats_years: years the statistics and climatologies are computed from
        (default: all kept years). Use the training years.
      drop_south_pole: drop the last latitude row (-90), 721 -> 720 rows as the
        original model grid; recorded as ``south_pole_dropped``.
      allow_gaps: accept gaps in the source time axis.
      doy_climatology: also compute ``clim_doy_hour`` (as large as one year of
        data).
      clim_window_days: odd width of its triangular day-of-year window.
      overwrite: replace an existing store (only once the new one is complete).
      lat_chunks: split each time step into this many latitude bands per chunk,
        so domain-decomposed readers fetch only their rows (1 = whole field).
      compression: ``lz4`` (blosc), ``zstd`` (blosc) or ``none``.

    Returns:
      The store path.

    Raises:
      DataError: bad input; nothing is left at ``out``.
    """
    out = Path(out)
    if out.exists() and not overwrite:
        raise DataError(f"{out}: already exists; pass overwrite=True (--overwrite) to replace it")
    years_l = parse_years(years)
    stats_l = parse_years(stats_years)
    if isinstance(sources, CanonicalSource):
        src = sources
        if channels is not None and [c.name for c in resolve_channels(channels)] != src.channel_names:
            raise DataError(f"channels {channels} differ from the source's {src.channel_names}")
    else:
        chans = resolve_channels("fcn20" if channels is None else channels)
        src = open_source(sources, chans, kind=kind, allow_gaps=allow_gaps, hdf5_layout=hdf5_layout)
    n_lat_source = len(src.lat)
    src = select_years(src, years_l)
    kept_years = sorted(set(_years_of(src.times).tolist()))
    if stats_l is None:
        stats_l = kept_years
    bad = [y for y in stats_l if y not in kept_years]
    if bad:
        raise DataError(f"stats_years {bad} are not among the prepared years {kept_years}")
    if drop_south_pole:
        if not np.isclose(src.lat[-1], -90.0):
            raise DataError(f"drop_south_pole: the southernmost latitude is {src.lat[-1]}, not -90; "
                            "expected a grid that includes the pole row (e.g. 721 rows)")
        src = src.drop_last_lat_row()
    if lat_chunks < 1 or len(src.lat) % lat_chunks:
        raise DataError(f"lat_chunks={lat_chunks} must divide the {len(src.lat)} latitude rows")

    out.parent.mkdir(parents=True, exist_ok=True)
    tag = uuid.uuid4().hex[:8]
    tmp = out.parent / f".{out.name}.tmp-{tag}"
    work = out.parent / f".{out.name}.work-{tag}"
    try:
        work.mkdir()
        _write_store(src, tmp, work, stats_years=stats_l, kept_years=kept_years,
                     n_lat_source=n_lat_source, drop_south_pole=drop_south_pole,
                     doy_climatology=doy_climatology, clim_window_days=clim_window_days,
                     lat_chunks=lat_chunks, compression=compression, progress=progress,
                     clim_memory_bytes=clim_memory_bytes)
        if out.exists():  # overwrite: swap in only now that the new store is complete
            trash = out.parent / f".{out.name}.old-{tag}"
            os.rename(out, trash)
            os.rename(tmp, out)
            shutil.rmtree(trash, ignore_errors=True)
        else:
            os.rename(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return out


def _compressors(name: str):
    if name == "none":
        return None
    from numcodecs import Blosc

    if name in ("lz4", "zstd"):
        return (Blosc(cname=name, clevel=5 if name == "lz4" else 3, shuffle=Blosc.SHUFFLE),)
    raise DataError(f"unknown compression {name!r}; expected lz4, zstd or none")


def _write_store(src: CanonicalSource, tmp: Path, work: Path, *, stats_years, kept_years, n_lat_source,
                 drop_south_pole, doy_climatology, clim_window_days, lat_chunks, compression, progress,
                 clim_memory_bytes) -> None:
    import dask.array as dsa
    import zarr
    from tqdm.auto import tqdm

    T, C, H, W = src.shape
    step_h = float(src.time_step / np.timedelta64(1, "h"))
    coords = {
        "time": src.times,
        "channel": src.channel_names,
        "channel_units": ("channel", [c.units for c in src.channels]),
        "channel_long_name": ("channel", [c.long_name for c in src.channels]),
        "lat": ("lat", src.lat, {"units": "degrees_north", "long_name": "latitude"}),
        "lon": ("lon", src.lon, {"units": "degrees_east", "long_name": "longitude"}),
    }
    attrs = {
        "fcn_jax_store_version": STORE_VERSION,
        "channels": ",".join(src.channel_names),
        "time_step_hours": step_h,
        "lat_order": "north_to_south",
        "lon_convention": "0_to_360",
        "south_pole_dropped": int(drop_south_pole),
        "n_lat_source": n_lat_source,
        "years": json.dumps(kept_years),
        "stats_years": json.dumps(list(stats_years)),
        "normalisation": "x_norm = (x - mean[channel]) / std[channel]; mean/std over (time, lat, lon) "
                         "of stats_years, unweighted, all stored rows, float64 accumulation",
        "clim_window_days": clim_window_days if doy_climatology else 0,
    }
    attrs.update({k: v for k, v in src.attrs.items() if isinstance(v, (str, int, float))})
    chunks = (1, C, H // lat_chunks, W)
    # The skeleton's dask array is one lazy chunk (a tiny graph: nothing is
    # computed with compute=False); the zarr chunks come from the encoding.
    skeleton = xr.Dataset(
        {"fields": (("time", "channel", "lat", "lon"), dsa.zeros((T, C, H, W), chunks=-1, dtype=np.float32),
                    {"long_name": "fields", "layout": "[time, channel, lat, lon]"})},
        coords=coords, attrs=attrs,
    )
    enc = {"fields": {"chunks": chunks, "compressors": _compressors(compression)},
           "time": {"units": "hours since 1900-01-01 00:00:00", "dtype": "int64"}}
    skeleton.to_zarr(tmp, mode="w", compute=False, zarr_format=2, consolidated=False, encoding=enc)
    fields = zarr.open_array(str(tmp / "fields"), mode="r+")

    stats_mask = np.isin(_years_of(src.times), stats_years)
    moments = ChannelMoments(C)
    tmean = TimeMean((C, H, W))
    clim = None
    if doy_climatology:
        _, hours = day_of_year_and_hour(src.times[stats_mask])
        clim = DoyHourClimatology((C, H, W), sorted(set(hours.tolist())), window_days=clim_window_days,
                                  scratch_dir=str(work), memory_bytes=clim_memory_bytes)
    bs = _block_steps(src)
    with tqdm(total=T, desc=f"prepare {tmp.name.split('.tmp-')[0].lstrip('.')}", unit="step",
              disable=not progress, leave=False) as bar:
        for t0 in range(0, T, bs):
            t1 = min(T, t0 + bs)
            x = src.read(t0, t1)  # x: [time, channel, lat, lon]
            _check_finite(x, t0, src)
            fields[t0:t1] = x
            m = stats_mask[t0:t1]
            if m.any():
                xs = x[m]
                moments.update(xs)
                tmean.update(xs)
                if clim is not None:
                    clim.update(xs, src.times[t0:t1][m])
            bar.update(t1 - t0)

    mean, std = moments.result()
    if np.any(std <= 0):
        flat = [src.channel_names[i] for i in np.nonzero(std <= 0)[0]]
        raise DataError(f"channels {flat} are constant over the stats years {list(stats_years)}; "
                        "expected varying fields (std > 0) to normalise by")
    time_mean = tmean.result()
    stats = xr.Dataset(
        {"mean": ("channel", mean, {"long_name": "global mean per channel", "units": "channel units"}),
         "std": ("channel", std, {"long_name": "global standard deviation per channel"}),
         "time_mean": (("channel", "lat", "lon"), time_mean, {"long_name": "time-mean climatology"})},
        coords={"channel": src.channel_names},
    )
    stats.to_zarr(tmp, mode="a", zarr_format=2, consolidated=False)

    if clim is not None:
        nh = len(clim.hours)
        cds = xr.Dataset(
            {"clim_doy_hour": (("dayofyear", "hour", "channel", "lat", "lon"),
                               dsa.zeros((N_DOY, nh, C, H, W), chunks=-1, dtype=np.float32),
                               {"long_name": "day-of-year x hour climatology",
                                "window": f"triangular, {clim_window_days} days, circular in day of year"})},
            coords={"dayofyear": np.arange(1, N_DOY + 1), "hour": np.asarray(clim.hours, np.int64),
                    "channel": src.channel_names},
        )
        cds.to_zarr(tmp, mode="a", compute=False, zarr_format=2, consolidated=False,
                    encoding={"clim_doy_hour": {"chunks": (1, 1, C, H, W),
                                                "compressors": _compressors(compression)}})
        writer = _SlotWriter(zarr.open_array(str(tmp / "clim_doy_hour"), mode="r+"))
        with tqdm(total=N_DOY * nh, desc="climatology", unit="slot", disable=not progress, leave=False) as bar:
            filled = clim.finalize(writer.put, time_mean, progress=bar.update)
            writer.flush()
        attrs["clim_filled_slots"] = int(filled)
    # to_zarr(mode="a") replaces the group attributes: set them all last.
    g = zarr.open_group(str(tmp), mode="r+")
    g.attrs.update(attrs)
    zarr.consolidate_metadata(str(tmp))


class _SlotWriter:
    """Buffers consecutive day-of-year slots of one hour and writes them in one
    zarr call (per-call overhead dominates for small grids)."""

    def __init__(self, arr, max_bytes: int = 64 << 20):
        self.arr = arr
        per = int(np.prod(arr.shape[2:])) * 4
        self.n = max(1, min(64, max_bytes // max(per, 1)))
        self.buf: list[np.ndarray] = []
        self.d0 = self.h = -1

    def put(self, d: int, h: int, v: np.ndarray) -> None:
        if self.buf and (h != self.h or d != self.d0 + len(self.buf) or len(self.buf) >= self.n):
            self.flush()
        if not self.buf:
            self.d0, self.h = d, h
        self.buf.append(v)

    def flush(self) -> None:
        if self.buf:
            self.arr[self.d0:self.d0 + len(self.buf), self.h] = np.stack(self.buf)
            self.buf = []


# ------------------------------------------------------------------- reading
def open_store(path: str | os.PathLike) -> xr.Dataset:
    """Open a prepared store lazily (dask) and check it is one.

    Returns an ``xarray.Dataset`` with ``fields`` [time, channel, lat, lon] and
    the statistics variables described in the module docstring.
    """
    path = str(path)
    if not os.path.isdir(path):
        raise DataError(f"{path}: store not found; create it with `python -m fcn_jax.data prepare`")
    try:
        ds = xr.open_zarr(path)
    except Exception as e:
        raise DataError(f"{path}: cannot open as a zarr store ({type(e).__name__}: {e})") from e
    if "fields" not in ds or ds.attrs.get("fcn_jax_store_version") is None:
        raise DataError(f"{path}: not an fcn_jax training store (no 'fields' / version attribute)")
    return ds


def store_stats(path: str | os.PathLike, channels=None) -> tuple[np.ndarray, np.ndarray]:
    """(mean[C], std[C]) float32 in the order of ``channels`` (default: the store's)."""
    ds = open_store(path)
    names = list(ds["channel"].values)
    want = names if channels is None else [c.name for c in resolve_channels(channels)]
    missing = [c for c in want if c not in names]
    if missing:
        raise DataError(f"{path}: channels {missing} not in the store; it has {names}")
    idx = [names.index(c) for c in want]
    mean = np.asarray(ds["mean"].values, np.float64)[idx].astype(np.float32)
    std = np.asarray(ds["std"].values, np.float64)[idx].astype(np.float32)
    return mean, std


def climatology_at(ds: xr.Dataset, times) -> xr.DataArray:
    """Day-of-year x hour climatology at ``times``: [time, channel, lat, lon].

    Falls back to the time mean when the store has no ``clim_doy_hour``.
    """
    times = np.asarray(times).astype("datetime64[ns]")
    if "clim_doy_hour" not in ds:
        return ds["time_mean"].expand_dims(time=times)
    doy, hour = day_of_year_and_hour(times)
    sel = ds["clim_doy_hour"].sel(dayofyear=xr.DataArray(doy, dims="time"),
                                  hour=xr.DataArray(hour, dims="time"))
    return sel.assign_coords(time=("time", times)).drop_vars(["dayofyear", "hour"])


def resolve_store(store: str | os.PathLike, *, world_seed: int = 0, world_days: int | None = None,
                  progress: bool = True) -> Path:
    """A store path from an experiment's ``data.store`` value.

    ``"world"`` generates/prepares the embedded world once (cached, see
    :func:`fcn_jax.data.world.world_store`) and returns its store; anything
    else is a path to a prepared store, checked to exist.
    """
    if str(store) == "world":
        from fcn_jax.data.world import DEFAULT_DAYS, world_store

        return world_store(seed=world_seed, days=DEFAULT_DAYS if world_days is None else world_days,
                           progress=progress)
    open_store(store)  # clear error if missing or not a store
    return Path(store)
