"""``python -m fcn_jax.checkpoint {verify,seal,show}``: check, seal and describe checkpoints and model packages.

* ``verify PATH...`` -- a run directory, its ``checkpoints/`` or a model
  package against their integrity manifests (:mod:`fcn_jax.checkpoints.integrity`);
  exit status 0 all intact, 1 damage found (the lines say where), 2 a path
  does not exist, 6 nothing to verify yet (no checkpoint step or model: a run
  that has not saved; not damage) -- with several paths, the first of 1, 2, 6
  that applies;
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
    from fcn_jax.checkpoints.package import describe_package, read_package, seal_path, verify_path, verify_summary

    if args.cmd == "show":
        print(describe_package(read_package(args.path)))
        return 0
    if args.cmd == "seal":
        for p in args.paths:
            done = seal_path(p)
            print("\n".join(f"sealed   {d}" for d in done) or f"nothing to seal in {p}")
        return 0
    verdicts = []
    for p in args.paths:
        verdict, lines = verify_path(p)
        verdicts.append(verdict)
        print("\n".join(lines))
    code, line = verify_summary(verdicts)
    print(line)
    return code


if __name__ == "__main__":
    sys.exit(main())
