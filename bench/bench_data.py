"""Data benchmarks: preparing 0.25-degree data (throughput, disk use), and the input pipeline.

Prepare (``--prepare-days``, default 31 = one month; ``--skip-prepare``): synthetic
0.25-degree FCN-20 data with noise (so compression behaves like real data) is
written as CDS netCDF (one single- and one pressure-level file per day, as CDS
monthly requests chunked by day), as a WeatherBench 2 zarr and as a FourCastNet
HDF5 year file; each is then prepared by the real ``prepare`` (default
arguments: ``--climatology auto``, 4 reader threads). Before each timed read
the files are dropped from the page cache (``posix_fadvise(DONTNEED)`` after
``fsync``), so the numbers are the disk's. Reported per format: source bytes on
disk, the disk's raw read speed of those files (plain 16 MB ``read`` calls),
prepare wall time and MB/s (uncompressed float32 data per second), store size;
then the extrapolation to 1979-2018 (58,440 6-hourly steps) with the
day-of-year x hour climatology that ``auto`` builds for 40 years.

Pipeline: two stores:

* a 0.25-degree-shaped store (20 channels x 720 x 1440 -- 721 rows with the south pole dropped, as the
  model grid -- ``--steps`` 6-hourly
  steps, synthetic values with noise so compression behaves like real data),
  written by the real ``prepare`` into a temporary directory and removed after;
* the embedded world (16 channels x 32 x 64), generated/cached by
  ``fcn_jax.data.catalog.world_store``.

For each: samples/s of the raw source (one thread, no device), and of the
training iterator (windows of k+1 = 2 steps, normalised on device) with reader
threads or worker processes, on a single-device mesh and on an 8-device
emulated mesh (2, 1, 2, 2). Compare with the model's consumption rate
(bench/bench_model.py); the goal is at least 2x.

    python bench/bench_data.py [--prepare-days 31] [--formats cds,wb2,hdf5] [--skip-prepare]
                               [--steps 64] [--batches 12] [--dir /tmp] [--skip-025] [--skip-world]
"""

from __future__ import annotations

import argparse
import os
import resource
import shutil
import sys
import tempfile
import time

import jax
import numpy as np
from jax.sharding import AxisType

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from fcn_jax import cli  # noqa: E402
from fcn_jax.data import synthetic as S  # noqa: E402
from fcn_jax.data.pipeline import WindowSource, make_train_iterator  # noqa: E402
from fcn_jax.data.prepare import prepare  # noqa: E402
from fcn_jax.parallel.axes import MESH_AXES  # noqa: E402


def mesh(shape):
    return jax.make_mesh(shape, MESH_AXES, axis_types=(AxisType.Auto,) * 4)


def time_source(src: WindowSource, n: int) -> float:
    rng = np.random.default_rng(0)
    idx = rng.integers(0, len(src), n)
    src[int(idx[0])]
    t = time.perf_counter()
    for i in idx:
        src[int(i)]
    return n / (time.perf_counter() - t)


def time_iterator(store: str, *, shape, batch: int, workers: int, batches: int, threads: int = 4) -> float:
    it = make_train_iterator(store, mesh=mesh(shape), batch_size=batch, rollout_steps=1, seed=0,
                             num_workers=workers, prefetch=2, num_threads=threads)
    try:
        for _ in range(2):  # warm-up: worker start-up, jit of the normaliser
            jax.block_until_ready(next(it))
        t = time.perf_counter()
        for _ in range(batches):
            jax.block_until_ready(next(it))
        return batches * batch / (time.perf_counter() - t)
    finally:
        it.close()


def run(store: str, label: str, batches: int, batch_small: int, batch_sharded: int, rows: list) -> None:
    src = WindowSource(store, rollout_steps=1)
    mb = np.prod(src.shape) * 4 * 2 / 2**20
    rows.append((label, "source, 1 thread, no device", "1", 1, time_source(src, max(4, batches)), mb))
    for workers in (0, 2):
        how = f"iterator, {'4 threads' if workers == 0 else f'{workers} workers'}"
        for shp, b in (((1, 1, 1, 1), batch_small), ((2, 1, 2, 2), batch_sharded)):
            sps = time_iterator(store, shape=shp, batch=b, workers=workers, batches=batches)
            rows.append((label, how, "x".join(map(str, shp)), b, sps, mb))
            print(f"  {label:10s} {how:28s} mesh {shp} batch {b}: {sps:8.2f} samples/s", flush=True)



# ------------------------------------------------------------------ prepare
STEPS_1979_2018 = (np.datetime64("2019-01-01") - np.datetime64("1979-01-01")).astype(int) * 4


def _files_under(path: str) -> list[str]:
    if os.path.isdir(path):
        return [os.path.join(r, f) for r, _, fs in os.walk(path) for f in fs]
    return [path]


def _drop_cache(paths) -> None:
    """Evict files from the page cache so the next read comes from the disk."""
    for p in paths:
        for f in _files_under(p):
            fd = os.open(f, os.O_RDONLY)
            try:
                os.fsync(fd)
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            finally:
                os.close(fd)


def _du(paths) -> int:
    return sum(os.path.getsize(f) for p in paths for f in _files_under(p))


def _raw_read(paths) -> float:
    """Bytes/s of plain sequential reads of the files (after dropping them from the cache)."""
    _drop_cache(paths)
    n, t = 0, time.perf_counter()
    for p in paths:
        for f in _files_under(p):
            with open(f, "rb", buffering=0) as fh:
                while True:
                    b = fh.read(16 << 20)
                    if not b:
                        break
                    n += len(b)
    return n / (time.perf_counter() - t)


def _write_sources(d: str, days: int, formats: list[str]) -> dict[str, list[str]]:
    """One day at a time (memory: one day of fields, ~330 MB)."""
    import h5py

    from fcn_jax.data.channels import FCN_20, FCN_HDF5_LAYOUT

    lat, lon = S.grid(721, 1440)
    out: dict[str, list[str]] = {f: [] for f in formats}
    h5 = None
    for day in range(days):
        times = S.six_hourly("2018-01-01T00", 4 * (day + 1))[4 * day:]
        x = S.synthetic_source(times, "fcn20", lat, lon, noise=0.01).read(0, 4)  # [4, 20, 721, 1440]
        if "cds" in formats:
            out["cds"] += S.write_cds(os.path.join(d, "cds"), times, "fcn20", lat, lon, values=x,
                                      prefix=f"era5_2018_01_{day + 1:02d}")
        if "wb2" in formats:
            path = os.path.join(d, "wb2.zarr")
            S.write_wb2(path, times, "fcn20", lat, lon, values=x, append=day > 0)
            out["wb2"] = [path]
        if "hdf5" in formats:
            if h5 is None:
                os.makedirs(os.path.join(d, "hdf5"), exist_ok=True)
                h5 = h5py.File(os.path.join(d, "hdf5", "2018.h5"), "w")
                h5.create_dataset("fields", shape=(4 * days, 21, 721, 1440), dtype="float32",
                                  chunks=(1, 1, 721, 1440))
                out["hdf5"] = [h5.filename]
            full = np.zeros((4, 21, 721, 1440), np.float32)
            full[:, [FCN_HDF5_LAYOUT.index(c) for c in FCN_20]] = x
            h5["fields"][4 * day:4 * day + 4] = full
        del x
    if h5 is not None:
        h5.close()
    return out


def bench_prepare(days: int, formats: list[str], root: str | None, compression: str) -> list[dict]:
    tmp = tempfile.mkdtemp(prefix="fcn_bench_prepare_", dir=root)
    rows = []
    try:
        t = time.perf_counter()
        srcs = _write_sources(tmp, days, formats)
        print(f"wrote {days} day(s) of synthetic 0.25-degree sources in {time.perf_counter() - t:.0f} s", flush=True)
        variants = [(f, False) for f in formats] + [(f, True) for f in formats if f in ("cds", "hdf5")]
        for fmt, procs in variants:
            files = srcs[fmt]
            raw = _raw_read(files)
            _drop_cache(files)
            out = os.path.join(tmp, f"store-from-{fmt}.zarr")
            rep: dict = {}
            def cpu_now() -> float:  # this process and its reaped children (the reader processes)
                a, b = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
                return a.ru_utime + a.ru_stime + b.ru_utime + b.ru_stime

            cpu0 = cpu_now()
            t = time.perf_counter()
            prepare(files, out, kind=fmt, compression=compression, progress=False, report=rep,
                    reader_processes=procs)
            wall = time.perf_counter() - t
            cpu = cpu_now() - cpu0
            steps = 4 * days
            data = steps * 20 * 721 * 1440 * 4
            label = f"{fmt} (4 reader processes)" if procs else f"{fmt} (4 reader threads)"
            rows.append(dict(format=label, source_bytes=_du(files), raw_mb_s=raw / 1e6, wall=wall, cpu=cpu,
                             mb_s=data / wall / 1e6, ingest_mb_s=rep.get("mb_per_s", float("nan")),
                             store_bytes=_du([out]), steps=steps, data_bytes=data))
            r = rows[-1]
            print(f"  {label}: source {r['source_bytes'] / 2**30:.2f} GiB (raw read {r['raw_mb_s']:.0f} MB/s); "
                  f"prepare {wall:.1f} s = {r['mb_s']:.0f} MB/s of fields (ingest {r['ingest_mb_s']:.0f} MB/s; "
                  f"{cpu:.1f} CPU-s = {data / cpu / 1e6:.0f} MB per CPU-s); "
                  f"store {r['store_bytes'] / 2**30:.2f} GiB", flush=True)
            shutil.rmtree(out, ignore_errors=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    print()
    print("| source format | source on disk | raw disk read | prepare (wall) | throughput | CPU s | MB per CPU-s "
          "| store on disk |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['format']} | {r['source_bytes'] / 2**30:.2f} GiB | {r['raw_mb_s']:.0f} MB/s | {r['wall']:.1f} s "
              f"| {r['mb_s']:.0f} MB/s | {r['cpu']:.1f} | {r['data_bytes'] / r['cpu'] / 1e6:.0f} "
              f"| {r['store_bytes'] / 2**30:.2f} GiB |")
    from fcn_jax.data.plan import make_plan

    plan = make_plan("era5_1979_2018.zarr", (STEPS_1979_2018, 20, 721, 1440), [], list(range(1979, 2019)),
                     list(range(1979, 2016)), 37 * 1461, "doy-hour", "auto: 37 years", 4)
    print()
    print(f"extrapolation to 1979-2018 ({STEPS_1979_2018} steps, fields {plan.fields_bytes / 1e12:.2f} TB "
          f"uncompressed; auto builds the day-of-year x hour climatology: {plan.clim_bytes / 1e9:.0f} GB + "
          f"the same again as scratch, {plan.peak_bytes / 1e12:.2f} TB at the peak):")
    for r in rows:
        per_step_s = r["wall"] / r["steps"]
        store = r["store_bytes"] / r["steps"] * STEPS_1979_2018 + plan.clim_bytes
        clim_io = plan.clim_io_bytes  # slot read + rewrite per statistics step, then the smoothing pass
        t = per_step_s * STEPS_1979_2018 + clim_io / (r["raw_mb_s"] * 1e6)
        cpu_h = r["cpu"] / r["steps"] * STEPS_1979_2018 / 3600
        print(f"  from {r['format']}: ~{t / 3600:.0f} h wall as measured here ({per_step_s:.2f} s/step + climatology "
              f"I/O {clim_io / 1e12:.1f} TB at the raw disk rate); {cpu_h:.0f} CPU-hours for the fields; "
              f"store ~{store / 1e12:.2f} TB")
    return rows

def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=64, help="time steps in the 0.25-degree store (default 64)")
    ap.add_argument("--batches", type=int, default=12, help="timed batches per configuration")
    ap.add_argument("--dir", default=None, help="where to write the 0.25-degree store (default: temp dir)")
    ap.add_argument("--compression", default="lz4", choices=["lz4", "zstd", "none"])
    ap.add_argument("--skip-025", action="store_true")
    ap.add_argument("--prepare-days", type=int, default=31, help="days of 0.25-degree sources to prepare (31)")
    ap.add_argument("--formats", default="cds,wb2,hdf5", help="source formats to prepare")
    ap.add_argument("--skip-prepare", action="store_true")
    ap.add_argument("--skip-pipeline", action="store_true", help="only the prepare benchmark")
    ap.add_argument("--skip-world", action="store_true")
    args = ap.parse_args()
    cli.start(argparse.Namespace(cpu_devices=8))  # 8 CPU devices for the (2, 1, 2, 2) mesh, before JAX starts
    rows: list = []
    print(f"devices: {len(jax.devices())} x {jax.devices()[0].platform}; cores: {os.cpu_count()}")
    if not args.skip_prepare:
        bench_prepare(args.prepare_days, args.formats.split(","), args.dir, args.compression)
    if args.skip_pipeline:
        return

    if not args.skip_025:
        tmp = tempfile.mkdtemp(prefix="fcn_bench_", dir=args.dir)
        try:
            lat, lon = S.grid(721, 1440)
            src = S.synthetic_source(S.six_hourly("2018-01-01T00", args.steps), "fcn20", lat, lon, noise=0.01)
            t = time.perf_counter()
            # 720 rows (south pole dropped) as the model grid: divisible by the height axis.
            store = str(prepare(src, os.path.join(tmp, "era5_025.zarr"), climatology="time-mean", progress=False,
                                drop_south_pole=True,
                                compression=args.compression))
            dt = time.perf_counter() - t
            size = sum(os.path.getsize(os.path.join(r, f)) for r, _, fs in os.walk(store) for f in fs)
            raw = args.steps * 20 * 720 * 1440 * 4
            print(f"0.25-degree store: {args.steps} steps, {size / 2**30:.2f} GiB on disk "
                  f"({raw / size:.2f}x compression, {args.compression}), prepared in {dt:.1f} s "
                  f"({args.steps / dt:.2f} steps/s incl. synthesis and statistics)", flush=True)
            run(store, "0.25deg", args.batches, 1, 2, rows)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)

    if not args.skip_world:
        from fcn_jax.data.catalog import world_store

        t = time.perf_counter()
        store = str(world_store(progress=False))
        print(f"world store: {store} (ready in {time.perf_counter() - t:.1f} s)", flush=True)
        run(store, "world", args.batches * 4, 32, 32, rows)

    print()
    print("| store | reader | mesh | global batch | samples/s | MB/sample |")
    print("|---|---|---|---|---|---|")
    for label, how, shp, b, sps, mb in rows:
        print(f"| {label} | {how} | {shp} | {b} | {sps:.2f} | {mb:.1f} |")


if __name__ == "__main__":
    main()
