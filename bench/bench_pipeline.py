"""Compile-only memory of a pipelined train step (issue 12): ``mesh.stage`` stages x a (D,C,H,W) mesh.

Builds the abstract train state with the blocks stacked and split over
``stage`` (as training stores them), compiles the train step (relative L2 +
Adam) for emulated CPU devices and prints XLA's per-device memory analysis
(argument + output - alias + temp, see jax-notes §11) and the collectives::

    python bench/bench_pipeline.py --config 0.1 --mesh 1,2,2,2 --stage 2 --cpu-devices 16
"""

from __future__ import annotations

import argparse
import json
import sys

from fcn_jax import cli

CONFIGS = {
    "0.25": dict(img_size=(720, 1440), patch_size=(8, 8), depth=12),
    "0.1": dict(img_size=(1800, 3600), patch_size=(4, 4), depth=24),
}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", choices=sorted(CONFIGS), default="0.1")
    ap.add_argument("--mesh", default="1,2,2,2", help="D,C,H,W per stage")
    ap.add_argument("--stage", type=int, default=2)
    ap.add_argument("--microbatches", type=int, default=0, help="per data shard; 0 = one sample each")
    ap.add_argument("--batch", type=int, default=1, help="samples per data shard")
    ap.add_argument("--cpu-devices", type=int, default=16)
    ap.add_argument("--remat", action="store_true")
    args = ap.parse_args(argv)
    cli.start(args)  # --cpu-devices: the CPU platform with that many devices, before JAX starts
    from fcn_jax.config import ModelConfig
    from fcn_jax.parallel.mesh import bubble_fraction
    from fcn_jax.perfmodel.compiler import compile_train_step

    shape = tuple(int(v) for v in args.mesh.split(","))
    cfg = ModelConfig(**CONFIGS[args.config], remat=args.remat)
    r = compile_train_step(cfg, shape, shape[0] * args.batch, stage=args.stage, microbatches=args.microbatches)
    m = r["memory"]
    print(json.dumps({
        "config": args.config, "mesh": list(shape), "stage": args.stage, "devices": r["devices"],
        "microbatches": r["microbatches"], "bubble_fraction": bubble_fraction(args.stage, r["microbatches"]),
        "spectral_layout": r["spectral_layout"], "remat": args.remat,
        "gb_per_device": m["total"] / 1e9, "argument_gb": m["argument"] / 1e9,
        "temp_gb": m["temp"] / 1e9, "param_gb_per_device": r["param_bytes_per_device"] / 1e9,
        "compile_s": r["lower_s"] + r["compile_s"], "collectives": r["collectives"],
    }))


if __name__ == "__main__":
    sys.exit(main())
