"""``python -m fcn_jax.checkpoint {verify,seal,show}``: check, seal and describe checkpoints and model packages.

* ``verify PATH...`` -- a run directory, its ``checkpoints/`` or a model
  package against their integrity manifests (:mod:`fcn_jax.checkpoints.integrity`);
  exit status 0 all intact, 1 damage found (the lines above say where);
* ``seal PATH...`` -- add manifests to checkpoints written before fcn_jax wrote
  them (only for trusted directories: sealing blesses what is there);
* ``show MODEL`` -- what a model package carries: channels, statistics, grid,
  climatology, provenance (:mod:`fcn_jax.checkpoints.package`).
"""

from __future__ import annotations

import sys

from fcn_jax import cli


def build_parser():
    ap = cli.parser("checkpoint", __doc__)
    sub = ap.add_subparsers(dest="cmd", required=True)
    v = sub.add_parser("verify", help="verify a run directory, its checkpoints/ or a model directory")
    v.add_argument("paths", nargs="+")
    s = sub.add_parser("seal", help="add integrity data to checkpoints written before fcn_jax had it (trusted only!)")
    s.add_argument("paths", nargs="+")
    sh = sub.add_parser("show", help="what a model package carries (channels, statistics, grid, climatology, "
                                     "provenance)")
    sh.add_argument("path")
    return ap


def main(argv=None) -> int:
    args = cli.parse(build_parser(), argv)
    return cli.run(lambda: _run(args))


def _run(args) -> int:
    from fcn_jax.checkpoints.package import describe_package, read_package, seal_path, verify_path

    if args.cmd == "show":
        print(describe_package(read_package(args.path)))
        return 0
    if args.cmd == "seal":
        for p in args.paths:
            done = seal_path(p)
            print("\n".join(f"sealed   {d}" for d in done) or f"nothing to seal in {p}")
        return 0
    all_ok = True
    for p in args.paths:
        ok, lines = verify_path(p)
        all_ok &= ok
        print("\n".join(lines))
    print("all intact" if all_ok else "DAMAGED checkpoints found (see above)")
    return 0 if all_ok else 1


if __name__ == "__main__":
    sys.exit(main())
