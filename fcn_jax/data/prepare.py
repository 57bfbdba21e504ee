"""``prepare``: sources -> training store, in cost proportional to the data, resumable.

Flow (the store's layout is described in :mod:`fcn_jax.data.store`):

1. open the sources lazily (:func:`fcn_jax.data.readers.open_source`), select
   years, choose the climatology (:mod:`fcn_jax.data.climatology`);
2. print the plan -- what will be written, how big, how long -- and refuse when
   the disk cannot hold it (:mod:`fcn_jax.data.plan`);
3. ingest: blocks of time steps are read by a pool of threads (``readers``,
   ahead of the writer, so the disk rather than Python sets the pace), checked
   for NaN/Inf, written to ``fields`` and folded into the statistics; every few
   blocks a *commit* records the position and the accumulators in a journal;
4. finalise: statistics, time mean, climatology, attributes, consolidated
   metadata; rename into place.

Resuming. Everything is written to ``.STORE.partial-KEY`` with scratch in
``.STORE.work-KEY`` beside the target, ``KEY`` a hash of the arguments and of
the sources (paths, sizes, modification times). A run killed at any point --
SIGKILL included -- and started again with the same arguments finds the
journal, reopens the partial store and continues from the last commit; blocks
after it are simply written again (a zarr chunk write is a whole-file
replacement, the climatology slots skip time steps already applied, the
accumulators are restored exactly), so the store is byte-for-byte the one an
uninterrupted run writes. Bad input (``DataError``) removes the partial store;
anything else (Ctrl-C, kill, a full disk) leaves it to be resumed. Other
``.partial-*``/``.work-*`` leftovers of the same target with different
arguments are removed, with a message. Safe against a killed process, not
against power loss (no fsync).
"""

from __future__ import annotations

import collections
import concurrent.futures as cf
import dataclasses
import hashlib
import json
import os
import re
import shutil
import sys
import time
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import xarray as xr

from fcn_jax.data import climatology as clim_mod
from fcn_jax.data.channels import resolve_channels
from fcn_jax.data.errors import DataError
from fcn_jax.data.plan import PreparePlan, human, make_plan
from fcn_jax.data.readers import open_source
from fcn_jax.data.readers.source import CanonicalSource
from fcn_jax.data.readers.timeaxis import fmt_time
from fcn_jax.data.stats import N_DOY, ChannelMoments, TimeMean, day_of_year_and_hour
from fcn_jax.data.store import STORE_VERSION, parse_years

#: Commit (journal + accumulator checkpoint) at most every this many time steps' worth of data
#: per checkpoint byte: the float64 time-mean checkpoint is 2 steps, so >= 16 steps per commit
#: keeps the checkpoint I/O under ~12 % of the fields'.
_COMMIT_MIN_STEPS = 16


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


def _compressors(name: str):
    if name == "none":
        return None
    from numcodecs import Blosc

    if name in ("lz4", "zstd"):
        return (Blosc(cname=name, clevel=5 if name == "lz4" else 3, shuffle=Blosc.SHUFFLE),)
    raise DataError(f"unknown compression {name!r}; expected lz4, zstd or none")


def _source_fingerprint(sources) -> list:
    """Paths with size and modification time (remote URLs: the URL only)."""
    if isinstance(sources, CanonicalSource):
        h = hashlib.sha256()
        h.update(np.asarray(sources.times).tobytes())
        h.update(np.asarray(sources.lat).tobytes() + np.asarray(sources.lon).tobytes())
        h.update(json.dumps([sources.channel_names, {k: str(v) for k, v in sources.attrs.items()}],
                            sort_keys=True).encode())
        return ["canonical", h.hexdigest()]
    items = [sources] if isinstance(sources, (str, os.PathLike)) else list(sources)
    out = []
    for s in map(str, items):
        if "://" in s or not os.path.exists(s):
            out.append([s])
            continue
        p = os.path.abspath(s)
        if os.path.isdir(p):
            st = [(os.path.relpath(os.path.join(r, f), p), os.path.getsize(os.path.join(r, f)))
                  for r, _, fs in os.walk(p) for f in sorted(fs)]
            out.append([p, hashlib.sha256(json.dumps(sorted(st)).encode()).hexdigest()])
        else:
            st = os.stat(p)
            out.append([p, st.st_size, st.st_mtime_ns])
    return out


class _Journal:
    """Progress of one prepare in ``work/journal.json`` (replaced atomically)."""

    def __init__(self, work: Path, key: str):
        self.work, self.key = work, key
        self.path = work / "journal.json"
        self.state: dict = {}
        if self.path.exists():
            try:
                st = json.loads(self.path.read_text())
            except ValueError:
                st = {}
            if st.get("key") == key:
                self.state = st

    @property
    def phase(self) -> str:
        return self.state.get("phase", "new")

    @property
    def next_t(self) -> int:
        return int(self.state.get("next_t", 0))

    def save(self, **kw) -> None:
        self.state.update(kw, key=self.key)
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.state))
        os.replace(tmp, self.path)

    def commit(self, next_t: int, moments: ChannelMoments, tmean: TimeMean) -> None:
        old = self.state.get("tmean_file")
        name = f"tmean-{next_t}.npy"
        tmp = self.work / (name + ".tmp")
        with open(tmp, "wb") as f:
            np.save(f, tmean.sum)
        os.replace(tmp, self.work / name)
        self.save(next_t=next_t, tmean_file=name, tmean_n=tmean.n,
                  moments={"n": moments.n, "mean": moments.mean.tolist(), "m2": moments.m2.tolist()})
        if old and old != name:
            (self.work / old).unlink(missing_ok=True)

    def restore(self, moments: ChannelMoments, tmean: TimeMean) -> None:
        m = self.state.get("moments")
        if m:
            moments.n = int(m["n"])
            moments.mean = np.asarray(m["mean"], np.float64)
            moments.m2 = np.asarray(m["m2"], np.float64)
        f = self.state.get("tmean_file")
        if f:
            tmean.sum = np.load(self.work / f)
            tmean.n = int(self.state["tmean_n"])


def prepare(sources: Sequence[str] | str | CanonicalSource, out: str | os.PathLike, *, channels=None,
            years=None, stats_years=None, kind: str = "auto", drop_south_pole: bool = False,
            allow_gaps: bool = False, climatology: str = "auto", doy_climatology: bool | None = None,
            clim_window_days: int = 61, overwrite: bool = False, lat_chunks: int = 1, compression: str = "lz4",
            progress: bool = True, hdf5_layout: Sequence[str | None] | None = None,
            clim_memory_bytes: int = 1 << 30, readers: int = 4, reader_processes: bool = False,
            block_steps: int | None = None, member: int | None = None,
            dry_run: bool = False, report: dict | None = None,
            log: Callable[[str], None] | None = None) -> Path | PreparePlan:
    """Prepare a training store from source files (see the module docstring).

    Args:
      sources: CDS netCDF files, WB2 zarr stores (paths or fsspec URLs such as
        ``gs://...``/``s3://...``/``memory://...``), FourCastNet HDF5 year
        files, GRIB files (one format), or directories of them; or a
        :class:`~fcn_jax.data.readers.CanonicalSource`.
      out: the store path (``*.zarr``).
      channels: names or a set name, in the order wanted (default ``fcn20``;
        for a CanonicalSource, its channels).
      years: years to keep (``'1979-2015'``, list, or None for all).
      stats_years: years the statistics and climatologies are computed from
        (default: all kept years). Use the training years.
      drop_south_pole: drop the last latitude row (-90), 721 -> 720 rows.
      allow_gaps: accept gaps in the source time axis.
      climatology: ``auto``, ``time-mean``, ``doy-hour`` or the path/URL of a
        WeatherBench 2-format climatology to import (:mod:`fcn_jax.data.climatology`).
      doy_climatology: deprecated spelling: True = ``doy-hour``, False = ``time-mean``.
      clim_window_days: odd width of the triangular day-of-year window.
      overwrite: replace an existing store (only once the new one is complete).
      lat_chunks: latitude bands per ``fields`` chunk (1 = whole field).
      compression: ``lz4`` (blosc), ``zstd`` (blosc) or ``none``.
      clim_memory_bytes: memory for smoothing the climatology (sets its band height).
      readers: threads (or processes) reading blocks ahead of the writer.
      reader_processes: read in ``readers`` spawned processes, each opening the
        sources itself: netCDF/HDF5 decompression then runs in parallel
        (libhdf5 is serialised by a lock within a process). Not for an
        in-memory CanonicalSource (threads are used, with a message).
      block_steps: time steps per block (default: ~256 MB blocks, at most 64 steps).
      member: the ensemble member (``number``) to read from ensemble sources
        (default: refuse sources with more than one member).
      dry_run: print and return the :class:`~fcn_jax.data.plan.PreparePlan` only.
      report: filled with throughput numbers (bytes read, seconds, MB/s).
      log: where messages go (default: stderr when ``progress``, else nowhere).

    Returns:
      The store path (or the plan with ``dry_run``).

    Raises:
      DataError: bad input or too little disk space; nothing is left at ``out``.
    """
    if log is None:
        log = (lambda s: print(s, file=sys.stderr, flush=True)) if progress else (lambda s: None)
    if doy_climatology is not None:
        climatology = "doy-hour" if doy_climatology else "time-mean"
    out = Path(out)
    years_l = parse_years(years)
    stats_l = parse_years(stats_years)
    recipe = None
    if isinstance(sources, CanonicalSource):
        src = sources
        if channels is not None and [c.name for c in resolve_channels(channels)] != src.channel_names:
            raise DataError(f"channels {channels} differ from the source's {src.channel_names}")
    else:
        chans = resolve_channels("fcn20" if channels is None else channels)
        recipe = _Recipe([str(p) for p in ([sources] if isinstance(sources, (str, os.PathLike)) else sources)],
                         [c.name for c in chans], kind, allow_gaps, list(hdf5_layout) if hdf5_layout else None,
                         years_l, drop_south_pole, member)
        src = open_source(recipe.sources, chans, kind=kind, allow_gaps=allow_gaps, hdf5_layout=hdf5_layout,
                          member=member)
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
    _compressors(compression)

    stats_mask = np.isin(_years_of(src.times), stats_l)
    span = clim_mod.span_years(src.times[stats_mask], src.time_step)
    mode, clim_path, reason = clim_mod.resolve_mode(climatology, span)
    if mode == "doy-hour":
        if clim_window_days < 1 or clim_window_days % 2 == 0 or clim_window_days > N_DOY - 1:
            raise DataError(f"clim_window_days must be odd and in [1, {N_DOY - 1}], got {clim_window_days}")
        hours = sorted(set(day_of_year_and_hour(src.times[stats_mask])[1].tolist()))
    elif mode == "import":
        hours = clim_mod.wb2_hours(clim_path)
    else:
        hours = []

    args = dict(sources=_source_fingerprint(sources), channels=src.channel_names, years=kept_years,
                stats_years=stats_l, kind=kind, drop_south_pole=drop_south_pole, allow_gaps=allow_gaps,
                climatology=[mode, clim_path], window=clim_window_days if mode == "doy-hour" else 0,
                lat_chunks=lat_chunks, compression=compression, hdf5_layout=list(hdf5_layout or []),
                clim_memory_bytes=clim_memory_bytes if mode == "doy-hour" else 0,
                block_steps=block_steps, version=STORE_VERSION)
    if member is not None:  # only when given: keys of runs without it stay as they were
        args["member"] = int(member)
    key = hashlib.sha256(json.dumps(args, sort_keys=True, default=str).encode()).hexdigest()[:12]
    tmp = out.parent / f".{out.name}.partial-{key}"
    work = out.parent / f".{out.name}.work-{key}"
    journal = _Journal(work, key)
    if journal.phase == "done" and out.exists() and not tmp.exists():
        shutil.rmtree(work, ignore_errors=True)  # killed after the rename, before cleaning up
        log(f"{out}: already complete (finished by an earlier run)")
        return out
    if out.exists() and not overwrite:
        raise DataError(f"{out}: already exists; pass overwrite=True (--overwrite) to replace it")
    if journal.phase != "new" and not tmp.exists():  # scratch without its store: start afresh
        shutil.rmtree(work, ignore_errors=True)
        journal = _Journal(work, key)

    plan = make_plan(str(out), src.shape, src.channel_names, kept_years, list(stats_l), int(stats_mask.sum()),
                     mode, reason, len(hours))
    plan.done_steps = journal.next_t if journal.phase in ("ingest", "finalize") else 0
    if dry_run:
        log(plan.format())
        return plan
    try:
        plan.check_disk(out)
    finally:
        log(plan.format())
    for stale in sorted(out.parent.glob(f".{out.name}.partial-*")) + sorted(out.parent.glob(f".{out.name}.work-*")):
        if key not in stale.name:
            log(f"removing {stale} (left by an interrupted prepare with other arguments)")
            shutil.rmtree(stale, ignore_errors=True)

    if reader_processes and recipe is None:
        log("reader processes need source files to reopen; reading an in-memory source with threads")
    out.parent.mkdir(parents=True, exist_ok=True)
    work.mkdir(parents=True, exist_ok=True)
    try:
        _run(src, tmp, work, journal, mode=mode, clim_path=clim_path, reason=reason, hours=hours,
             stats_mask=stats_mask, stats_years=stats_l, kept_years=kept_years, n_lat_source=n_lat_source,
             drop_south_pole=drop_south_pole, clim_window_days=clim_window_days, lat_chunks=lat_chunks,
             compression=compression, progress=progress, clim_memory_bytes=clim_memory_bytes,
             readers=readers, block_steps=block_steps, report=report, log=log,
             recipe=recipe if reader_processes else None)

    except DataError:
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.rmtree(work, ignore_errors=True)
        raise
    if out.exists():  # overwrite: swap in only now that the new store is complete
        trash = out.parent / f".{out.name}.old-{key}"
        os.rename(out, trash)
        os.rename(tmp, out)
        shutil.rmtree(trash, ignore_errors=True)
    else:
        os.rename(tmp, out)
    shutil.rmtree(work, ignore_errors=True)
    return out


def _store_attrs(src: CanonicalSource, *, stats_years, kept_years, n_lat_source, drop_south_pole, mode, reason,
                 clim_window_days) -> dict:
    attrs = {
        "fcn_jax_store_version": STORE_VERSION,
        "channels": ",".join(src.channel_names),
        "time_step_hours": float(src.time_step / np.timedelta64(1, "h")),
        "lat_order": "north_to_south",
        "lon_convention": "0_to_360",
        "south_pole_dropped": int(drop_south_pole),
        "n_lat_source": n_lat_source,
        "years": json.dumps(kept_years),
        "stats_years": json.dumps(list(stats_years)),
        "normalisation": "x_norm = (x - mean[channel]) / std[channel]; mean/std over (time, lat, lon) "
                         "of stats_years, unweighted, all stored rows, float64 accumulation",
        "climatology": mode,
        "climatology_reason": reason,
        "clim_window_days": clim_window_days if mode == "doy-hour" else 0,
    }
    attrs.update({k: v for k, v in src.attrs.items() if isinstance(v, (str, int, float))})
    return attrs


def _create_skeleton(src: CanonicalSource, tmp: Path, attrs: dict, lat_chunks: int, compression: str) -> None:
    import dask.array as dsa

    T, C, H, W = src.shape
    coords = {
        "time": src.times,
        "channel": src.channel_names,
        "channel_units": ("channel", [c.units for c in src.channels]),
        "channel_long_name": ("channel", [c.long_name for c in src.channels]),
        "lat": ("lat", src.lat, {"units": "degrees_north", "long_name": "latitude"}),
        "lon": ("lon", src.lon, {"units": "degrees_east", "long_name": "longitude"}),
    }
    # One lazy dask chunk (a tiny graph: nothing is computed with compute=False);
    # the zarr chunks come from the encoding.
    skeleton = xr.Dataset(
        {"fields": (("time", "channel", "lat", "lon"), dsa.zeros((T, C, H, W), chunks=-1, dtype=np.float32),
                    {"long_name": "fields", "layout": "[time, channel, lat, lon]"})},
        coords=coords, attrs=attrs,
    )
    enc = {"fields": {"chunks": (1, C, H // lat_chunks, W), "compressors": _compressors(compression)},
           "time": {"units": "hours since 1900-01-01 00:00:00", "dtype": "int64"}}
    skeleton.to_zarr(tmp, mode="w", compute=False, zarr_format=2, consolidated=False, encoding=enc)


def _timed_read(src: CanonicalSource, t0: int, t1: int):
    t = time.perf_counter()
    x = src.read(t0, t1)  # x: [time, channel, lat, lon]
    return x, time.perf_counter() - t




_ZARR_TEMP = re.compile(r"\.[0-9a-f]{32}\.partial$")


def _remove_zarr_temps(store: Path) -> None:
    """Drop the temporary files zarr writes a chunk to before renaming it (a kill can leave one)."""
    for root, _, files in os.walk(store):
        for f in files:
            if _ZARR_TEMP.search(f):
                os.unlink(os.path.join(root, f))


@dataclasses.dataclass(frozen=True)
class _Recipe:
    """How to open the source again in a reader process (picklable)."""

    sources: list
    channels: list
    kind: str
    allow_gaps: bool
    hdf5_layout: list | None
    years: list | None
    drop_south_pole: bool
    member: int | None = None

    def open(self) -> CanonicalSource:
        src = open_source(self.sources, self.channels, kind=self.kind, allow_gaps=self.allow_gaps,
                          hdf5_layout=self.hdf5_layout, member=self.member)
        src = select_years(src, self.years)
        return src.drop_last_lat_row() if self.drop_south_pole else src


_WORKER_SOURCE: CanonicalSource | None = None


def _worker_open(recipe: _Recipe) -> None:
    global _WORKER_SOURCE
    _WORKER_SOURCE = recipe.open()


def _worker_read(t0: int, t1: int):
    return _timed_read(_WORKER_SOURCE, t0, t1)


def _run(src: CanonicalSource, tmp: Path, work: Path, journal: _Journal, *, mode, clim_path, reason, hours,
         stats_mask, stats_years, kept_years, n_lat_source, drop_south_pole, clim_window_days, lat_chunks,
         compression, progress, clim_memory_bytes, readers, block_steps, report, log, recipe=None) -> None:
    import zarr
    from tqdm.auto import tqdm

    T, C, H, W = src.shape
    attrs = _store_attrs(src, stats_years=stats_years, kept_years=kept_years, n_lat_source=n_lat_source,
                         drop_south_pole=drop_south_pole, mode=mode, reason=reason,
                         clim_window_days=clim_window_days)
    if journal.phase == "new":
        _create_skeleton(src, tmp, attrs, lat_chunks, compression)
        journal.save(phase="ingest", next_t=0)
    else:
        _remove_zarr_temps(tmp)
        if journal.next_t:
            log(f"resuming {tmp.name}: {journal.next_t}/{T} steps done")
    moments, tmean = ChannelMoments(C), TimeMean((C, H, W))
    journal.restore(moments, tmean)
    acc = clim_mod.SlotAccumulator(work / "clim", (C, H, W), hours) if mode == "doy-hour" else None
    name = tmp.name.split(".partial-")[0].lstrip(".")

    if journal.phase == "ingest":
        fields = zarr.open_array(str(tmp / "fields"), mode="r+")
        bs = block_steps or _block_steps(src)
        commit_every = max(1, -(-_COMMIT_MIN_STEPS // bs))
        starts = list(range(journal.next_t, T, bs))
        n_read, t_read, since = 0, 0.0, 0
        wall = time.perf_counter()
        if recipe is not None:
            import multiprocessing

            pool_cm = cf.ProcessPoolExecutor(max(1, readers), mp_context=multiprocessing.get_context("spawn"),
                                             initializer=_worker_open, initargs=(recipe,))
            read_fn, read_args = _worker_read, ()
        else:
            pool_cm = cf.ThreadPoolExecutor(max(1, readers))
            read_fn, read_args = _timed_read, (src,)
        with pool_cm as pool, \
                tqdm(total=T, initial=journal.next_t, desc=f"prepare {name}", unit="step",
                     disable=not progress, leave=False) as bar:
            pending = collections.deque()
            it = iter(starts)
            for t0 in it:
                pending.append((t0, pool.submit(read_fn, *read_args, t0, min(T, t0 + bs))))
                if len(pending) >= max(1, readers):
                    break
            while pending:
                t0, fut = pending.popleft()
                nxt = next(it, None)
                if nxt is not None:
                    pending.append((nxt, pool.submit(read_fn, *read_args, nxt, min(T, nxt + bs))))
                x, dt = fut.result()
                t1 = t0 + x.shape[0]
                n_read += x.nbytes
                t_read += dt
                _check_finite(x, t0, src)
                fields[t0:t1] = x
                m = stats_mask[t0:t1]
                if m.any():
                    xs = x[m]
                    moments.update(xs)
                    tmean.update(xs)
                    if acc is not None:
                        acc.update(xs, src.times[t0:t1][m], np.arange(t0, t1)[m])
                since += 1
                if since >= commit_every or t1 == T:
                    journal.commit(t1, moments, tmean)
                    since = 0
                bar.update(t1 - t0)
                el = time.perf_counter() - wall
                bar.set_postfix_str(f"{n_read / max(el, 1e-9) / 1e6:.0f} MB/s")
        wall = time.perf_counter() - wall
        kind = str(src.attrs.get("source_kind", "source"))
        msg = (f"read {human(n_read)} of {kind} in {wall:.1f} s: {n_read / max(wall, 1e-9) / 1e6:.1f} MB/s "
               f"overall ({n_read / max(t_read, 1e-9) / 1e6:.1f} MB/s per reader, {readers} reader "
               f"{'processes' if recipe is not None else 'threads'})")
        log(msg)
        if report is not None:
            report.update(source_kind=kind, bytes=n_read, seconds=wall, mb_per_s=n_read / max(wall, 1e-9) / 1e6,
                          read_seconds=t_read)
        journal.save(phase="finalize")

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

    if mode in ("doy-hour", "import"):
        import dask.array as dsa

        nh = len(hours)
        rows = clim_mod.band_rows((C, H, W), nh, clim_memory_bytes) if mode == "doy-hour" else H
        desc = (f"triangular, {clim_window_days} days, circular in day of year" if mode == "doy-hour"
                else f"imported from {clim_path}")
        cds = xr.Dataset(
            {"clim_doy_hour": (("dayofyear", "hour", "channel", "lat", "lon"),
                               dsa.zeros((N_DOY, nh, C, H, W), chunks=-1, dtype=np.float32),
                               {"long_name": "day-of-year x hour climatology", "window": desc})},
            coords={"dayofyear": np.arange(1, N_DOY + 1), "hour": np.asarray(hours, np.int64),
                    "channel": src.channel_names},
        )
        shutil.rmtree(tmp / "clim_doy_hour", ignore_errors=True)  # an interrupted earlier finalize: redo it
        cds.to_zarr(tmp, mode="a", compute=False, zarr_format=2, consolidated=False,
                    encoding={"clim_doy_hour": {"chunks": (1, 1, C, rows, W),
                                                "compressors": _compressors(compression)}})
        arr = zarr.open_array(str(tmp / "clim_doy_hour"), mode="r+")
        if mode == "doy-hour":
            with tqdm(total=H, desc="climatology", unit="row", disable=not progress, leave=False) as bar:
                attrs["clim_filled_slots"] = clim_mod.finalize_doy_hour(acc, arr, clim_window_days, time_mean,
                                                                        rows, progress=bar.update)
        else:
            with tqdm(total=N_DOY, desc="climatology import", unit="day", disable=not progress,
                      leave=False) as bar:
                got = clim_mod.import_wb2(clim_path, src.channels, src.lat, src.lon, arr, progress=bar.update)
            if got != list(hours):
                raise DataError(f"{clim_path}: hours changed while importing ({hours} -> {got})")
            attrs["clim_filled_slots"] = 0
    # to_zarr(mode="a") replaces the group attributes: set them all last.
    g = zarr.open_group(str(tmp), mode="r+")
    g.attrs.update(attrs)
    zarr.consolidate_metadata(str(tmp))
    journal.save(phase="done")
