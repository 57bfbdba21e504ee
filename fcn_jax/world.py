"""``python -m fcn_jax.world``: generate the embedded world (dinosaur Held-Suarez) and prepare its store.

ERA5-shaped data made offline by a primitive-equation model (dinosaur,
Held-Suarez forcing, T21, 32 x 64 grid): CDS-style netCDF files and a prepared
store (:mod:`fcn_jax.data.world`, :func:`fcn_jax.data.catalog.world_store`).
Cached: the same arguments return at once. Experiments name it
``data.store: world``; their ``data.world_seed``/``data.world_days`` choose
which one.
"""

from __future__ import annotations

import argparse
import json
import sys
import time

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


def build_parser() -> argparse.ArgumentParser:
    from fcn_jax.data.world import DEFAULT_DAYS

    w = cli.parser("world", __doc__)
    w.add_argument("--out", default=None, help="directory (default ~/.cache/fcn_jax/world/<key>)")
    w.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    w.add_argument("--days", type=int, default=DEFAULT_DAYS,
                   help=f"simulated days after spin-up (default {DEFAULT_DAYS})")
    w.add_argument("--spinup-days", type=int, default=200, help="days discarded first (default 200)")
    w.add_argument("--no-store", action="store_true", help="only write the netCDF files")
    w.add_argument("--quiet", action="store_true", help="no progress bars")
    return w


def main(argv=None) -> int:
    args = cli.parse(build_parser(), argv)
    return cli.run(lambda: _world(args))


if __name__ == "__main__":
    sys.exit(main())
