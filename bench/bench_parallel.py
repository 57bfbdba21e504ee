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

Byte convention (per device, per step; shapes in the compiled HLO are per device):

* all-to-all:         result bytes x (P-1)/P   (what leaves the device)
* all-gather:         result bytes x (P-1)/P   (the full result less the local piece)
* reduce-scatter:     result bytes x (P-1)     = input bytes x (P-1)/P (ring)
* all-reduce:         result bytes x 2(P-1)/P  (ring = reduce-scatter + all-gather)
* collective-permute: result bytes x 1
with P the replica-group size of the instruction. The prediction uses the same
convention: spectral all-to-alls ``A*[(Pw-1)/Pw + (Ph-1)/Ph*2M'/W]`` per
transform for the channel-block layout and
``A*[(Pw-1)/Pw*(1 + 2M'/W) + (Ph-1)/Ph*2M'/W*(1 + L'/H)]`` for the pencil layout
(modes padded to the split), ``A = 4*b*C*H*W/(Pc*Ph*Pw)``, 4 transforms per layer (forward and
inverse, forward and backward pass; 6 with --remat, which recomputes the
forward); MLP all-gather / reduce-scatter of the full-channel local activation
(compute dtype forward, float32 backward for the gather; float32 forward,
compute dtype backward for the reduce-scatter; remat adds one forward gather);
the gradient all-reduce of every
parameter over the devices it is replicated on (``data`` and, for the MLP
weights, ``height`` x ``width``); LayerNorm statistics and the head's partial
sums over ``channel``.

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
import re
import resource
import subprocess
import sys
import time

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
SEED_EXTRAPOLATED_01_GB = 405.0
TARGET_GB = 80.0
GB = 1e9

DTYPE_BYTES = {
    "pred": 1, "s8": 1, "u8": 1, "s16": 2, "u16": 2, "f16": 2, "bf16": 2, "s32": 4, "u32": 4, "f32": 4,
    "s64": 8, "u64": 8, "f64": 8, "c64": 8, "c128": 16,
}
OPS = ("all-to-all", "all-gather", "reduce-scatter", "all-reduce", "collective-permute")
_INSTR = re.compile(
    r"^\s*(?:ROOT\s+)?%?[\w.\-]+\s*=\s*(?P<shape>.*?)\s(?P<op>" + "|".join(OPS) + r")(?P<start>-start)?\((?P<rest>.*)$"
)
_ARRAY = re.compile(r"\b(" + "|".join(DTYPE_BYTES) + r")\[([\d,]*)\]")


# --------------------------------------------------------------------------- #
# HLO parsing
# --------------------------------------------------------------------------- #


def _shape_bytes(text: str) -> int:
    total = 0
    for dt, dims in _ARRAY.findall(text):
        n = math.prod(int(d) for d in dims.split(",") if d) if dims else 1
        total += n * DTYPE_BYTES[dt]
    return total


def _group_size(rest: str, n_devices: int) -> int:
    # mesh form: replica_groups=mesh['axis_0'=2,'axis_1'=2,...][, device_ids=(...)] {'axis_1','axis_2'}
    m = re.search(r"replica_groups=mesh\[([^\]]*)\][^{]*\{([^}]*)\}", rest)
    if m:
        sizes = {k: int(v) for k, v in re.findall(r"'([^']+)'=(\d+)", m.group(1))}
        names = re.findall(r"'([^']+)'", m.group(2))
        return math.prod(sizes[n] for n in names)
    m = re.search(r"replica_groups=\{(\{[\d,]*\})", rest)
    if m:
        inner = m.group(1).strip("{}")
        return len([x for x in inner.split(",") if x]) or n_devices
    m = re.search(r"replica_groups=\[([\d,]+)\]<=", rest)  # iota form [groups, size]<=[...]
    if m:
        return int(m.group(1).split(",")[-1])
    return n_devices  # replica_groups={} = all devices


def collective_bytes(hlo_text: str, n_devices: int) -> dict:
    """Bytes moved per device by each collective kind, by the module's convention."""
    out = {op: 0.0 for op in OPS}
    for line in hlo_text.splitlines():
        m = _INSTR.match(line)
        if not m:
            continue
        op, shape, rest = m.group("op"), m.group("shape"), m.group("rest")
        nbytes = _shape_bytes(shape)
        if m.group("start") and shape.lstrip().startswith("(") and op in ("all-gather", "all-reduce"):
            # async start ops return (operand(s), result(s)): count the result half only
            nbytes = nbytes / 2 if op == "all-reduce" else nbytes  # all-gather: approximate
        if op == "collective-permute":
            out[op] += nbytes
            continue
        p = _group_size(rest, n_devices)
        if p <= 1:
            continue
        factor = {"all-to-all": (p - 1) / p, "all-gather": (p - 1) / p, "reduce-scatter": p - 1,
                  "all-reduce": 2 * (p - 1) / p}[op]
        out[op] += nbytes * factor
    return out


# --------------------------------------------------------------------------- #
# Design prediction (parallelism spec §13, extended to every collective)
# --------------------------------------------------------------------------- #


def spectral_bytes_per_transform(cfg, shape, local_batch: int, layout: str) -> float:
    """All-to-all bytes one device sends per forward transform (spec §13; inverse the same).

    channel_block: ``A*[(Pw-1)/Pw + (Ph-1)/Ph * 2M'/W]``;
    pencil: ``A*[(Pw-1)/Pw * (1 + 2M'/W) + (Ph-1)/Ph * 2M'/W * (1 + L'/H)]`` with the kept
    longitude bins M' padded to a multiple of Pw and the kept rows L' to a multiple of Ph.
    """
    from fcn_jax.model.spectral import kept_ranges

    _, pc, ph, pw = shape
    h, w = cfg.token_grid
    (r0, r1), bins = kept_ranges(h, w, cfg.hard_thresholding_fraction)
    a = 4.0 * local_batch * cfg.embed_dim * h * w / (pc * ph * pw)
    if layout == "pencil":
        bins_p, rows_p = -(-bins // pw) * pw, -(-(r1 - r0) // ph) * ph
        return a * ((pw - 1) / pw * (1 + 2 * bins_p / w) + (ph - 1) / ph * 2 * bins_p / w * (1 + rows_p / h))
    return a * ((pw - 1) / pw + (ph - 1) / ph * 2 * bins / w)


def predicted_bytes(cfg, shape, local_batch: int, param_leaves, layout: str = "channel_block") -> dict:
    """param_leaves: [(local_bytes, replication_group_size)] per parameter."""
    pd, pc, ph, pw = shape
    h, w = cfg.token_grid
    c = cfg.embed_dim
    b = local_batch
    per_transform = spectral_bytes_per_transform(cfg, shape, local_batch, layout)
    transforms = 6 if cfg.remat else 4
    cb = 2 if cfg.compute_dtype == "bfloat16" else 4
    pred = {op: 0.0 for op in OPS}
    pred["all-to-all"] = cfg.depth * transforms * per_transform
    hl, wl = h // ph, w // pw
    if pc > 1:
        full = b * c * hl * wl * (pc - 1) / pc
        # forward gather (compute dtype) + its transpose's gather of the f32 cotangent; remat
        # recomputes the forward gather. The reduce-scatter's output is not needed by the
        # backward pass, so remat does not recompute it.
        pred["all-gather"] = cfg.depth * full * (cb + 4 + (cb if cfg.remat else 0))
        pred["reduce-scatter"] = cfg.depth * full * (4 + cb)
        ar = 2 * (pc - 1) / pc
        # LayerNorm: 2 norms/layer x (2 psums forward + 2 backward [+2 recomputed]) of [b, hl, wl, 1] f32
        pred["all-reduce"] += cfg.depth * 2 * (6 if cfg.remat else 4) * 4 * b * hl * wl * ar
        # head partial sums [b, hl, wl, p*p*out] f32, forward only
        pred["all-reduce"] += 4 * b * hl * wl * cfg.patch_size[0] * cfg.patch_size[1] * cfg.out_channels * ar
    pred["grad-all-reduce"] = sum(nb * 2 * (g - 1) / g for nb, g in param_leaves if g > 1)
    pred["all-reduce"] += pred["grad-all-reduce"]
    pred["spectral-per-layer-fwd-bwd"] = 4 * per_transform
    return pred


# --------------------------------------------------------------------------- #
# One case (runs in a child process)
# --------------------------------------------------------------------------- #


def run_case(case: dict, n_devices: int) -> dict:
    import jax

    jax.config.update("jax_num_cpu_devices", n_devices)  # before any JAX op
    import optax

    sys.path.insert(0, HERE)
    from bench_model import abstract_train_inputs, flops, memory_stats

    from fcn_jax.config import ModelConfig
    from fcn_jax.parallel.hlo import collective_counts
    from fcn_jax.parallel.mesh import MeshError, MeshSizes, make_mesh, validate_layout
    from fcn_jax.training.step import make_train_step

    shape = tuple(case["mesh"])
    cfg = ModelConfig(**{k: tuple(v) if isinstance(v, list) else v for k, v in case["model"].items()})
    local_batch = case["local_batch"]
    global_batch = shape[0] * local_batch
    res = {"config": case["name"], "mesh": list(shape), "global_batch": global_batch}
    if len(jax.devices()) < math.prod(shape):
        res["error"] = f"needs {math.prod(shape)} devices, {len(jax.devices())} available"
        return res
    try:
        layout = validate_layout(MeshSizes(*shape), cfg, batch_size=global_batch).spectral_layout
        res["spectral_layout"] = layout
    except MeshError as e:
        res["refused"] = str(e)
        return res
    mesh = make_mesh(shape)
    tx = optax.adam(case["lr"])
    t0 = time.perf_counter()
    graphdef, state, window, n_params = abstract_train_inputs(cfg, mesh, tx, global_batch)
    step = make_train_step(graphdef, tx)
    with jax.set_mesh(mesh):
        lowered = step.lower(state, window)
        t1 = time.perf_counter()
        compiled = lowered.compile()
        t2 = time.perf_counter()
    res["lower_s"], res["compile_s"] = t1 - t0, t2 - t1
    res["params"] = n_params
    res["memory"] = memory_stats(compiled)
    res["flops_per_device"] = flops(compiled)
    res["flops_lowered_global"] = flops(lowered)
    hlo = compiled.as_text()
    res["collectives"] = collective_counts(hlo)
    res["collective_bytes"] = collective_bytes(hlo, math.prod(shape))
    leaves = []
    for x in jax.tree.leaves(state.params):
        local = math.prod(x.sharding.shard_shape(x.shape)) * x.dtype.itemsize
        leaves.append((local, math.prod(shape) * local // (math.prod(x.shape) * x.dtype.itemsize)))
    res["predicted_bytes"] = predicted_bytes(cfg, shape, local_batch, leaves, layout)
    res["param_bytes_per_device"] = sum(nb for nb, _ in leaves)
    res["host_maxrss_gb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / GB
    return res


def valid_meshes(cfg, n_devices: int, batch: int):
    from fcn_jax.parallel.mesh import MeshError, MeshSizes, validate_layout

    out = []
    for c in range(1, n_devices + 1):
        for h in range(1, n_devices + 1):
            for w in range(1, n_devices + 1):
                if c * h * w != n_devices:
                    continue
                try:
                    validate_layout(MeshSizes(1, c, h, w), cfg, batch_size=batch)
                    out.append((1, c, h, w))
                except MeshError:
                    pass
    return out


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
            rows.append([r["config"], mesh, "refused*" if "refused" in r else "error*"] + [""] * 9)
            continue
        m = r["memory"]
        target = ""
        if r["config"].startswith("0.1"):
            target = "yes" if m["total"] / GB < TARGET_GB else "NO"
        rows.append([
            r["config"], mesh, r.get("spectral_layout", "ok"), _fmt_gb(m["argument"]), _fmt_gb(m["output"]), _fmt_gb(m["alias"]),
            _fmt_gb(m["temp"]), _fmt_gb(m["total"]), target,
            f"{r['flops_per_device'] / 1e12:.3f}", f"{r['compile_s']:.0f}", f"{r['host_maxrss_gb']:.1f}",
        ])
    print(f"Per-device compiled memory of the train step (GB = 1e9 B), batch 1 per data shard, "
          f"{args.cpu_devices} emulated CPU devices{', remat' if args.remat else ''}{', bf16' if args.bf16 else ''}")
    print(format_table(
        ["config", "mesh d,c,h,w", "layout", "arg", "out", "alias", "temp", "arg+out-alias+temp", "<80GB",
         "TFLOP/dev", "compile s", "host RSS GB"],
        rows, ["l", "l", "l"] + ["r"] * 9))
    print("  (seed talk: 0.25deg/p8/12 9.3 GB scaffolding / 3.4 GB running per sample; "
          f"0.1deg/p4/24 {SEED_EXTRAPOLATED_01_GB:.0f} GB extrapolated on one device; target < {TARGET_GB:.0f} GB/device)")
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
    print("Bytes moved by collectives per device per step, GB: measured from HLO / design prediction")
    short = {"all-to-all": "a2a", "all-gather": "ag", "reduce-scatter": "rs", "all-reduce": "ar",
             "collective-permute": "cp"}
    rows = []
    for r in ok:
        cb, pb = r["collective_bytes"], r["predicted_bytes"]
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
    ap.add_argument("--batch", type=int, default=1, help="batch per data shard (global batch = data x this)")
    ap.add_argument("--lr", type=float, default=5e-4, help="Adam learning rate")
    ap.add_argument("--case-timeout", type=float, default=3600, help="seconds allowed per compile")
    ap.add_argument("--json", action="store_true", help="print one JSON object (list of cases) instead of tables")
    ap.add_argument("--_case", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)

    if args._case:  # child: compile one case, print its JSON on the last line
        os.environ.setdefault("JAX_PLATFORMS", "cpu")
        print(json.dumps(run_case(json.loads(args._case), args.cpu_devices)))
        return 0

    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    import jax

    jax.config.update("jax_num_cpu_devices", args.cpu_devices)  # before any JAX op
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
                     f"{args.cpu_devices} devices: " + ", ".join("x".join(map(str, m)) for m in vm))
        for shape in meshes:
            case = {"name": f"{name}deg", "model": model_kw, "mesh": list(shape), "local_batch": args.batch,
                    "lr": args.lr}
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
