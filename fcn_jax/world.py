"""``python -m fcn_jax.world``: generate the embedded world (dinosaur Held-Suarez) and prepare its store.

ERA5-shaped data made offline by a primitive-equation model (dinosaur,
Held-Suarez forcing, T21, 32 x 64 grid): CDS-style netCDF files and a prepared
store (:mod:`fcn_jax.data.world`, :func:`fcn_jax.data.catalog.world_store`).
Cached: the same arguments return at once. Experiments name it
``data.store: world``; their ``data.world_seed``/``data.world_days`` choose
which one.

``python -m fcn_jax.world --twin OUT --init TIMES --steps N [--store STORE]``
forecasts the world with its own dynamical core from slightly perturbed
initial states (:func:`fcn_jax.data.world.twin_forecasts`) and writes the
forecast file any model's forecast has: ``evaluate`` scores it like one. The
world's own predictability: the ceiling for a learned model.
"""

from __future__ import annotations

import argparse
import json
import sys
import time

import numpy as np

from fcn_jax import cli


def _world(args: argparse.Namespace) -> None:
    from fcn_jax.data.catalog import world_store
    from fcn_jax.data.world import WorldSpec

    spec = WorldSpec(seed=args.seed, days=args.days, spinup_days=args.spinup_days)
    t0 = time.perf_counter()
    path = world_store(args.out, spec=spec, prepare_store=not args.no_store, progress=not args.quiet)
    meta_path = path.parent / "world.json"
    meta = json.loads(meta_path.read_text()) if meta_path.exists() else {}
    print(f"world ready at {path} ({time.perf_counter() - t0:.1f} s this call); splits {meta.get('splits')}")


def _twin(args: argparse.Namespace) -> None:
    from fcn_jax.data.errors import DataError
    from fcn_jax.data.store import StoreInfo, open_store
    from fcn_jax.data.world import WorldSpec, twin_forecasts
    from fcn_jax.inference.files import ForecastError, ForecastWriter

    cfg = cli.load_experiment(args)
    store = cli.resolve_store(args.store or "world", cfg)
    meta_path = store.parent / "world.json"
    if not meta_path.is_file():
        raise DataError(f"--store {store}: not a world store (no {meta_path}); the twin needs the world's spec")
    spec_d = json.loads(meta_path.read_text())["spec"]
    spec = WorldSpec(**{k: tuple(v) if isinstance(v, list) else v for k, v in spec_d.items()})
    if args.steps < 1:
        raise ForecastError(f"--steps must be >= 1, got {args.steps}")
    info = StoreInfo.read(store)
    channels = list(cfg.data.channels)
    times = cli.parse_init_times(args.init)
    ds = open_store(store)
    tidx = {t: i for i, t in enumerate(np.asarray(ds["time"].values, "datetime64[ns]"))}
    cidx = info.index_of(channels)

    def truth(k):  # output index k of the world = store time index k (the store holds every output time)
        t = np.datetime64(spec.start, "ns") + k * np.timedelta64(6, "h")
        if t not in tidx:
            raise DataError(f"--store {store}: no time {t} to check the re-simulation against")
        return np.moveaxis(ds["fields"].isel(time=tidx[t]).values[cidx], 0, -1)  # [lat, lon, channel]

    t0 = time.perf_counter()
    attrs = {"model": f"the world's dynamical core (dinosaur, T{spec.truncation}, {spec.layers} layers)",
             "ic_source": str(store), "store": str(store),
             "perturbation": f"Gaussian temperature noise of {args.perturbation_k:g} K at every grid point and "
                             f"level, seed {args.seed}",
             "history": f"fcn_jax.world --twin {time.strftime('%Y-%m-%dT%H:%M:%SZ', time.gmtime())}"}
    with ForecastWriter(args.twin, init_times=times, n_lead=args.steps + 1, step_hours=6.0, lat=info.lat,
                        lon=info.lon, channels=channels, attrs=attrs, overwrite=args.overwrite) as writer:
        drift: list[float] = []
        for i, fields in twin_forecasts(spec, times, args.steps, channels, perturbation_k=args.perturbation_k,
                                        seed=args.seed, truth=truth, progress=not args.quiet, drift=drift):
            writer.write(fields[None], i)
            writer.commit(i)
    print(f"re-simulation against the stored world at the initial times: RMS diff / std at most "
          f"{max(drift):.2g} (the twin's own perturbation is larger)")
    print(f"wrote {args.twin}: the twin from {len(times)} ICs x {args.steps + 1} leads "
          f"({time.perf_counter() - t0:.1f} s)")


def build_parser() -> argparse.ArgumentParser:
    from fcn_jax.data.world import DEFAULT_DAYS

    w = cli.parser("world", __doc__)
    w.add_argument("--out", default=None, help="directory (default ~/.cache/fcn_jax/world/<key>)")
    w.add_argument("--seed", type=int, default=0, help="random seed (default 0; with --twin: the noise's)")
    w.add_argument("--days", type=int, default=DEFAULT_DAYS,
                   help=f"simulated days after spin-up (default {DEFAULT_DAYS})")
    w.add_argument("--spinup-days", type=int, default=200, help="days discarded first (default 200)")
    w.add_argument("--no-store", action="store_true", help="only write the netCDF files")
    w.add_argument("--quiet", action="store_true", help="no progress bars")
    t = w.add_argument_group("the twin: the world forecast by its own dynamical core")
    t.add_argument("--twin", metavar="OUT", default=None,
                   help="write the twin forecast to OUT (.nc or .zarr) instead of generating")
    t.add_argument("--init", help="initial times: 'T1,T2' or 'START/END/STRIDE' (output times of the world)")
    t.add_argument("--steps", type=int, default=20, help="6-hour steps (default 20: 5 days)")
    t.add_argument("--perturbation-k", type=float, default=0.1,
                   help="std of the Gaussian temperature noise added to the initial state, K (default 0.1)")
    t.add_argument("--overwrite", action="store_true", help="replace an existing OUT")
    cli.add_store(t, help="the world store to start from and check against (default: the experiment's world)")
    cli.add_experiment(w, default="world", positional=False,
                       help="the experiment whose world and channels the twin uses")
    return w


def main(argv=None) -> int:
    args = cli.parse(build_parser(), argv)
    if args.twin and not args.init:
        build_parser().error("--twin needs --init TIMES")
    return cli.run(lambda: (_twin if args.twin else _world)(args))


if __name__ == "__main__":
    sys.exit(main())
