#!/usr/bin/env python
"""Compile-only benchmark of the hybrid-parallel train step on emulated CPU devices.

For each (configuration, mesh) the jit-compiled train step (relative L2 + Adam,
``make_train_step``) is lowered from abstract, sharded inputs
(``jax.ShapeDtypeStruct(..., sharding=NamedSharding(mesh, spec))`` built with
``nnx.eval_shape`` / ``jax.eval_shape``) and compiled -- nothing is executed and
no array of the model's size is allocated. Reported per device:

* the compiler's memory analysis (argument, output, alias, temp and
  ``argument + output - alias + temp``; on XLA:CPU ``peak_memory`` excludes
  temporaries, jax-notes §11);
* compiled FLOPs (``compiled.cost_analysis()``, per device after partitioning);
* collective counts (``fcn_jax.parallel.hlo.collective_counts``) and the bytes
  the collectives move per step, read from the compiled HLO, next to the
  design's prediction (parallelism spec §13).

Compiler readings come from :mod:`fcn_jax.perfmodel.compiler` and the prediction
next to them from the performance model (:mod:`fcn_jax.perfmodel.model`, spectral
layouts in :mod:`fcn_jax.perfmodel.layouts`, byte convention documented there):
this script is a command line over the package.

Each case compiles in a child process, so a case that runs out of host memory
is reported instead of ending the run.

Examples::

    python bench/bench_parallel.py                 # both configurations, 8 devices
    python bench/bench_parallel.py --only 0.25 --json
    python bench/bench_parallel.py --only 0.1 --remat
"""

from __future__ import annotations

import argparse
import json
import math
import os
import resource
import subprocess
import sys
import time

from fcn_jax import cli
from fcn_jax.parallel.hlo import COLLECTIVES as OPS
from fcn_jax.perfmodel.report import SEED_TABLE

HERE = os.path.dirname(os.path.abspath(__file__))

CONFIGS = {
    # published FourCastNet v0: 720x1440, patch 8 -> 90x180 tokens, 12 layers
    "0.25": dict(img_size=(720, 1440), patch_size=(8, 8), depth=12),
    # the seed talk's 0.1 degree / patch 4 / 24 layers: 1800x3600 -> 450x900 tokens
    "0.1": dict(img_size=(1800, 3600), patch_size=(4, 4), depth=24),
}
MESHES = {
    "0.25": [(1, 1, 1, 1), (1, 1, 2, 4), (1, 2, 2, 2), (2, 1, 2, 2)],
    "0.1": [(1, 1, 1, 1), (1, 1, 2, 4), (1, 2, 2, 2), (1, 8, 1, 1)],
}
#: The seed talk's (scaffolding, running) GB per sample, by configuration (fcn_jax.perfmodel.report.SEED_TABLE).
SEED_GB = {name: (scaffolding, running) for name, _, scaffolding, running in SEED_TABLE}
TARGET_GB = 80.0
GB = 1e9


def predicted(cfg, shape, local_batch: int, layout: str) -> dict:
    """The performance model's collective bytes per kind, memory and flops per device for one case."""
    from fcn_jax.parallel.mesh import MeshSizes
    from fcn_jax.perfmodel import model as pm
    from fcn_jax.perfmodel.hardware import get_hardware
    from fcn_jax.perfmodel.layouts import spectral_bytes_per_transform

    sizes = MeshSizes(*shape)
    s = pm.Setting(cfg, sizes, shape[0] * local_batch, get_hardware("a100-80gb"), layout)
    w = pm.train_step_work(s)
    out = {op: 0.0 for op in OPS}
    out.update(w.collective_bytes())
    out["grad-all-reduce"] = sum(c.bytes * c.count for c in w.collectives if c.what == "gradient")
    out["spectral-per-layer-fwd-bwd"] = 4 * spectral_bytes_per_transform(cfg, sizes, local_batch, layout)
    out["flops_per_device"] = w.flops
    out["memory_per_device"] = pm.memory_per_device(s)["total"]
    return out


# --------------------------------------------------------------------------- #
# One case (runs in a child process)
# --------------------------------------------------------------------------- #


def run_case(case: dict) -> dict:
    import jax
    import optax

    from fcn_jax.config import ModelConfig
    from fcn_jax.parallel.mesh import MeshError, MeshSizes, validate_layout
    from fcn_jax.perfmodel.compiler import compile_train_step

    shape = tuple(case["mesh"])
    cfg = ModelConfig(**{k: tuple(v) if isinstance(v, list) else v for k, v in case["model"].items()})
    local_batch = case["local_batch"]
    global_batch = shape[0] * local_batch
    res = {"config": case["name"], "mesh": list(shape), "global_batch": global_batch}
    if len(jax.devices()) < math.prod(shape):
        res["error"] = f"needs {math.prod(shape)} devices, {len(jax.devices())} available"
        return res
    try:
        layout = validate_layout(MeshSizes(*shape), cfg, batch_size=global_batch,
                                 spectral_layout=case["layout"]).spectral_layout
    except MeshError as e:
        res["refused"] = str(e)
        return res
    res.update(compile_train_step(cfg, shape, global_batch, tx=optax.adam(case["lr"]), spectral_layout=layout))
    res["predicted"] = predicted(cfg, shape, local_batch, layout)
    res["host_maxrss_gb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / GB
    return res


def valid_meshes(cfg, n_devices: int, batch: int) -> list[str]:
    """data=1 meshes of ``n_devices`` each spectral layout accepts, as 'c x h x w (layout)' strings."""
    from fcn_jax.perfmodel.layouts import LAYOUTS
    from fcn_jax.perfmodel.predict import meshes_for

    return [f"{'x'.join(map(str, m.shape))} ({name})" for name in LAYOUTS
            for m in meshes_for(cfg, n_devices, name, batch) if m.data == 1]


# --------------------------------------------------------------------------- #
# Driver
# --------------------------------------------------------------------------- #


def _fmt_gb(x):
    return "-" if x is None else f"{x / GB:.2f}"


def print_tables(results, args):
    sys.path.insert(0, HERE)
    from bench_model import format_table

    ok = [r for r in results if "memory" in r]
    rows = []
    for r in results:
        mesh = "x".join(map(str, r["mesh"]))
        if "memory" not in r:
            rows.append([r["config"], mesh, "refused*" if "refused" in r else "error*"] + [""] * 10)
            continue
        m = r["memory"]
        target = ""
        if r["config"].startswith("0.1"):
            target = "yes" if m["total"] / GB < TARGET_GB else "NO"
        rows.append([
            r["config"], mesh, r.get("spectral_layout", "ok"), _fmt_gb(m["argument"]), _fmt_gb(m["output"]), _fmt_gb(m["alias"]),
            _fmt_gb(m["temp"]), _fmt_gb(m["total"]), _fmt_gb(r["predicted"]["memory_per_device"]), target,
            f"{r['flops_per_device'] / 1e12:.3f}", f"{r['compile_s']:.0f}", f"{r['host_maxrss_gb']:.1f}",
        ])
    print(f"Per-device compiled memory of the train step (GB = 1e9 B), batch 1 per data shard, "
          f"{args.cpu_devices} emulated CPU devices{', remat' if args.remat else ''}{', bf16' if args.bf16 else ''}")
    print(format_table(
        ["config", "mesh d,c,h,w", "layout", "arg", "out", "alias", "temp", "arg+out-alias+temp", "model",
         "<80GB", "TFLOP/dev", "compile s", "host RSS GB"],
        rows, ["l", "l", "l"] + ["r"] * 10))
    print("  model: the performance model's prediction (python -m fcn_jax.perf; XLA:CPU keeps more live)")
    (s25, r25), (s01, _) = SEED_GB["0.25°/p8/12"], SEED_GB["0.1°/p4/24"]
    print(f"  (seed talk: 0.25deg/p8/12 {s25} GB scaffolding / {r25} GB running per sample; "
          f"0.1deg/p4/24 {s01:.0f} GB extrapolated on one device; target < {TARGET_GB:.0f} GB/device)")
    for r in results:
        if "refused" in r or "error" in r:
            print(f"  * {r['config']} {r['mesh']}: " + (r.get("refused") or r.get("error")).replace("\n", "\n    "))
    if not ok:
        return
    print()
    print("Collectives in the compiled train step (count)")
    print(format_table(["config", "mesh d,c,h,w"] + list(OPS),
                       [[r["config"], "x".join(map(str, r["mesh"]))] + [r["collectives"][op] for op in OPS]
                        for r in ok], ["l", "l"] + ["r"] * len(OPS)))
    print()
    print("Bytes moved by collectives per device per step, GB: measured from HLO / performance model")
    short = {"all-to-all": "a2a", "all-gather": "ag", "reduce-scatter": "rs", "all-reduce": "ar",
             "collective-permute": "cp"}
    rows = []
    for r in ok:
        cb, pb = r["collective_bytes"], r["predicted"]
        row = [r["config"], "x".join(map(str, r["mesh"]))]
        for op in OPS:
            row.append(f"{cb[op] / GB:.3f} / {pb[op] / GB:.3f}")
        tm, tp = sum(cb[op] for op in OPS), sum(pb[op] for op in OPS)
        row += [f"{tm / GB:.3f} / {tp / GB:.3f}", f"{pb['grad-all-reduce'] / GB:.3f}",
                f"{pb['spectral-per-layer-fwd-bwd'] / 1e6:.1f}"]
        rows.append(row)
    print(format_table(["config", "mesh d,c,h,w"] + [short[o] for o in OPS]
                       + ["total", "pred. grad ar", "pred. a2a MB/layer"], rows, ["l", "l"] + ["r"] * 8))
    print("  convention: a2a, ag x(P-1)/P of the result; rs x(P-1)/P of the input; ar x2(P-1)/P (ring); cp x1")
    if args.bf16:
        print("  note: XLA:CPU upcasts bf16 collectives to f32 after optimisation (the lowered StableHLO gathers\n"
              "  bf16 in the forward pass); the prediction is the design's, so ag/rs measure above it on CPU")


def main(argv=None):
    ap = argparse.ArgumentParser(
        description="Per-device compiled memory, FLOPs and collective traffic of the hybrid-parallel train "
                    "step on emulated CPU devices (compile only, nothing executed).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    ap.add_argument("--cpu-devices", type=int, default=8, help="number of emulated CPU devices")
    ap.add_argument("--only", choices=sorted(CONFIGS), action="append",
                    help="run only this configuration (repeatable); default: all")
    ap.add_argument("--mesh", action="append", metavar="D,C,H,W",
                    help="mesh(es) to use instead of the defaults (repeatable)")
    ap.add_argument("--remat", action="store_true", help="jax.checkpoint each block (ModelConfig.remat)")
    ap.add_argument("--bf16", action="store_true", help="bfloat16 compute (ModelConfig.compute_dtype)")
    ap.add_argument("--layout", default="auto", choices=["auto", "channel_block", "pencil"],
                    help="spectral layout (mesh.spectral_layout)")
    ap.add_argument("--batch", type=int, default=1, help="batch per data shard (global batch = data x this)")
    ap.add_argument("--lr", type=float, default=5e-4, help="Adam learning rate")
    ap.add_argument("--case-timeout", type=float, default=3600, help="seconds allowed per compile")
    ap.add_argument("--json", action="store_true", help="print one JSON object (list of cases) instead of tables")
    ap.add_argument("--_case", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)

    cli.start(args)  # --cpu-devices: the CPU platform with that many devices, before any JAX op
    if args._case:  # child: compile one case, print its JSON on the last line
        print(json.dumps(run_case(json.loads(args._case))))
        return 0

    import jax

    from fcn_jax.config import ModelConfig

    names = args.only or list(CONFIGS)
    results, notes = [], []
    t_all = time.perf_counter()
    for name in names:
        model_kw = dict(CONFIGS[name], remat=args.remat, compute_dtype="bfloat16" if args.bf16 else "float32")
        cfg = ModelConfig(**model_kw)
        meshes = [tuple(int(s) for s in m.split(",")) for m in args.mesh] if args.mesh else MESHES[name]
        vm = valid_meshes(cfg, args.cpu_devices, args.batch)
        notes.append(f"{name}: {cfg.token_grid[0]}x{cfg.token_grid[1]} tokens; valid data=1 meshes on "
                     f"{args.cpu_devices} devices: " + ", ".join(vm))
        for shape in meshes:
            case = {"name": f"{name}deg", "model": model_kw, "mesh": list(shape), "local_batch": args.batch,
                    "lr": args.lr, "layout": args.layout}
            cmd = [sys.executable, os.path.abspath(__file__), "--cpu-devices", str(args.cpu_devices),
                   "--_case", json.dumps(case)]
            t0 = time.perf_counter()
            try:
                p = subprocess.run(cmd, capture_output=True, text=True, timeout=args.case_timeout)
                last = p.stdout.strip().splitlines()[-1] if p.stdout.strip() else ""
                if p.returncode == 0 and last.startswith("{"):
                    res = json.loads(last)
                else:
                    sig = f" (signal {-p.returncode})" if p.returncode < 0 else ""
                    tail = p.stderr.strip().splitlines()[-3:]
                    res = {"config": case["name"], "mesh": list(shape),
                           "error": f"exit {p.returncode}{sig}: " + " | ".join(tail)}
            except subprocess.TimeoutExpired:
                res = {"config": case["name"], "mesh": list(shape), "error": f"timed out after {args.case_timeout} s"}
            res["wall_s"] = time.perf_counter() - t0
            results.append(res)
            if not args.json:
                status = "ok" if "memory" in res else "failed"
                print(f"[{name}deg {'x'.join(map(str, shape))}: {status}, {res['wall_s']:.0f} s]", file=sys.stderr)
    total_s = time.perf_counter() - t_all

    if args.json:
        print(json.dumps({"cpu_devices": args.cpu_devices, "remat": args.remat, "bf16": args.bf16,
                          "jax": jax.__version__, "notes": notes, "wall_s": total_s, "cases": results}, indent=2))
        return 0
    print_tables(results, args)
    print()
    for n in notes:
        print(n)
    print(f"total wall time {total_s:.0f} s (jax {jax.__version__})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
