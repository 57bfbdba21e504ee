"""Input-pipeline throughput: samples/s delivered as global jax.Arrays.

Two stores:

* a 0.25-degree-shaped store (20 channels x 720 x 1440 -- 721 rows with the south pole dropped, as the
  model grid -- ``--steps`` 6-hourly
  steps, synthetic values with noise so compression behaves like real data),
  written by the real ``prepare`` into a temporary directory and removed after;
* the embedded world (16 channels x 32 x 64), generated/cached by
  ``fcn_jax.data.world.world_store``.

For each: samples/s of the raw source (one thread, no device), and of the
training iterator (windows of k+1 = 2 steps, normalised on device) with reader
threads or worker processes, on a single-device mesh and on an 8-device
emulated mesh (2, 1, 2, 2). Compare with the model's consumption rate
(bench/bench_model.py); the goal is at least 2x.

    python bench/bench_data.py [--steps 64] [--batches 12] [--dir /tmp] [--skip-025] [--skip-world]
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402

jax.config.update("jax_num_cpu_devices", 8)

import numpy as np  # noqa: E402
from jax.sharding import AxisType  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from fcn_jax.data import synthetic as S  # noqa: E402
from fcn_jax.data.pipeline import WindowSource, make_train_iterator  # noqa: E402
from fcn_jax.data.store import prepare  # noqa: E402
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


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=64, help="time steps in the 0.25-degree store (default 64)")
    ap.add_argument("--batches", type=int, default=12, help="timed batches per configuration")
    ap.add_argument("--dir", default=None, help="where to write the 0.25-degree store (default: temp dir)")
    ap.add_argument("--compression", default="lz4", choices=["lz4", "zstd", "none"])
    ap.add_argument("--skip-025", action="store_true")
    ap.add_argument("--skip-world", action="store_true")
    args = ap.parse_args()
    rows: list = []
    print(f"devices: {len(jax.devices())} x {jax.devices()[0].platform}; cores: {os.cpu_count()}")

    if not args.skip_025:
        tmp = tempfile.mkdtemp(prefix="fcn_bench_", dir=args.dir)
        try:
            lat, lon = S.grid(721, 1440)
            src = S.synthetic_source(S.six_hourly("2018-01-01T00", args.steps), "fcn20", lat, lon, noise=0.01)
            t = time.perf_counter()
            # 720 rows (south pole dropped) as the model grid: divisible by the height axis.
            store = str(prepare(src, os.path.join(tmp, "era5_025.zarr"), doy_climatology=False, progress=False,
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
        from fcn_jax.data.world import world_store

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
