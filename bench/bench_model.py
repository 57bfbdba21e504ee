#!/usr/bin/env python
"""Single-device benchmark of the FourCastNet AFNO backbone on this CPU.

Measures, for the published 0.25-degree configuration (720x1440 pixels, patch
8 -> 90x180 tokens, 20 channels, embed 768, 12 blocks, 8 AFNO blocks) at batch
1 unless overridden:

* the compiler's memory analysis of the jit-compiled train step (relative L2 +
  Adam, ``fcn_jax.training.step.make_train_step``), lowered from *abstract*
  inputs (``nnx.eval_shape`` + ``jax.ShapeDtypeStruct``) so nothing big is
  allocated, next to the seed talk's 9.3 GB ("scaffolding") / 3.4 GB
  ("running") figures;
* compiled FLOPs of that step (``cost_analysis``);
* wall-clock forward and train-step time on a real (randomly initialised)
  model: compile time separately, then the median of N runs after warm-up.

On XLA:CPU ``peak_memory_in_bytes`` excludes temporaries (jax-notes §11), so
the footprint reported is ``argument + output - alias + temp``.

Examples::

    python bench/bench_model.py                       # published config, 3 timed runs
    python bench/bench_model.py --skip-timing         # memory / FLOPs only (seconds)
    python bench/bench_model.py --img 360 720 --runs 5 --json
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import re
import statistics
import sys
import time

os.environ.setdefault("JAX_PLATFORMS", "cpu")
if "--untuned" in sys.argv:
    os.environ["FCN_JAX_CPU_TUNING"] = "0"

from fcn_jax.cpu_runtime import tune_cpu_process  # noqa: E402

#: What the command lines do to a CPU process before JAX starts (fcn_jax.cpu_runtime).
CPU_TUNING = tune_cpu_process()

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import optax  # noqa: E402
from flax import nnx  # noqa: E402

from fcn_jax.config import ModelConfig  # noqa: E402
from fcn_jax.model.afnonet import AFNONet  # noqa: E402

# the abstract (nothing allocated) train inputs and XLA's own numbers, shared with the performance model's check
from fcn_jax.perfmodel.compiler import abstract_train_inputs, cost_flops, memory_stats  # noqa: E402
from fcn_jax.training.step import init_train_state, make_train_step  # noqa: E402

GB = 1e9
#: Seed talk, per sample (jax-notes §13): 0.25 deg / patch 8 / 12 blocks.
SEED_SCAFFOLDING_GB = 9.3
SEED_RUNNING_GB = 3.4
#: jax-notes §13: XLA:CPU temp bytes measured for a straightforward JAX port.
NOTES_TEMP_GB = {False: 17.2, True: 19.5}  # keyed by remat
NOTES_TFLOP_PER_SAMPLE = 6.05


# --------------------------------------------------------------------------- #
# Shared helpers (bench_parallel.py imports these)
# --------------------------------------------------------------------------- #


def add_model_args(ap: argparse.ArgumentParser) -> None:
    g = ap.add_argument_group("model (defaults: published 0.25-degree FourCastNet)")
    g.add_argument("--img", type=int, nargs=2, metavar=("LAT", "LON"), help="image size in pixels (720 1440)")
    g.add_argument("--patch", type=int, help="patch size (8)")
    g.add_argument("--embed-dim", type=int, help="embedding width (768)")
    g.add_argument("--depth", type=int, help="number of AFNO blocks/layers (12)")
    g.add_argument("--num-blocks", type=int, help="AFNO block-diagonal blocks (8)")
    g.add_argument("--channels", type=int, help="input = output channels (20)")
    g.add_argument("--remat", action="store_true", help="jax.checkpoint each block (ModelConfig.remat)")
    g.add_argument("--bf16", action="store_true", help="bfloat16 compute (ModelConfig.compute_dtype)")
    g.add_argument("--lr", type=float, default=5e-4, help="Adam learning rate (5e-4)")


def model_config_from_args(args, base: ModelConfig | None = None) -> ModelConfig:
    cfg = base or ModelConfig()
    kw = {}
    if getattr(args, "img", None):
        kw["img_size"] = tuple(args.img)
    if getattr(args, "patch", None):
        kw["patch_size"] = (args.patch, args.patch)
    if getattr(args, "embed_dim", None):
        kw["embed_dim"] = args.embed_dim
    if getattr(args, "depth", None) is not None:
        kw["depth"] = args.depth
    if getattr(args, "num_blocks", None):
        kw["num_blocks"] = args.num_blocks
    if getattr(args, "channels", None):
        kw["in_channels"] = kw["out_channels"] = args.channels
    kw["remat"] = bool(getattr(args, "remat", False))
    kw["compute_dtype"] = "bfloat16" if getattr(args, "bf16", False) else "float32"
    return dataclasses.replace(cfg, **kw)


def describe(cfg: ModelConfig) -> str:
    lat, lon = cfg.token_grid
    return (
        f"img {cfg.img_size[0]}x{cfg.img_size[1]}, patch {cfg.patch_size[0]} -> {lat}x{lon} tokens, "
        f"{cfg.in_channels} ch, embed {cfg.embed_dim}, depth {cfg.depth}, {cfg.num_blocks} AFNO blocks, "
        f"{cfg.compute_dtype}{', remat' if cfg.remat else ''}"
    )


_DTYPE_BYTES = {"pred": 1, "s8": 1, "u8": 1, "bf16": 2, "f16": 2, "s16": 2, "u16": 2, "f32": 4, "s32": 4,
                "u32": 4, "f64": 8, "s64": 8, "u64": 8, "c64": 8, "c128": 16}
_SKIP_OPS = {"parameter", "constant", "bitcast", "tuple", "get-tuple-element", "after-all", "partition-id"}


def _shape_bytes(shape: str) -> int:
    total = 0
    for dt, dims in re.findall(r"\b(pred|[sucf]\d+|bf16)\[([\d,]*)\]", shape):
        total += _DTYPE_BYTES.get(dt, 4) * math.prod(int(d) for d in dims.split(",") if d)
    return total


def hlo_census(hlo_text: str) -> dict:
    """Top-level ops of an optimised HLO module by class: {class: {"count", "out_bytes"}}.

    Classes, by what a (fused) instruction computes, in this priority: ``dot``, ``fft``,
    ``reduce``, ``layout`` (a transpose or copy: data moved, nothing computed), ``elementwise``,
    ``collective``, ``other``. ``out_bytes`` sums the bytes each writes -- a memory-traffic proxy
    that shows, e.g., transposed copies feeding the dots of a backward pass.
    """
    bodies = {}
    for m in re.finditer(r"^%?([\w.\-]+) [^\n]*\{\n(.*?)^\}", hlo_text, re.S | re.M):
        bodies[m.group(1)] = m.group(2)
    entry = hlo_text[hlo_text.index("ENTRY"):]
    entry = entry[: entry.index("\n}")]
    out: dict = {}
    for line in entry.splitlines()[1:]:
        m = re.match(r"\s*(?:ROOT )?%?[\w.\-]+ = (\(.*?\)|\S+) ([\w\-]+)\(", line)
        if not m or m.group(2) in _SKIP_OPS:
            continue
        shape, op = m.groups()
        body = line
        if op == "fusion":
            called = re.search(r"calls=%?([\w.\-]+)", line)
            body = bodies.get(called.group(1), "") if called else ""
        if re.search(r" (dot|convolution)\(", body) or op in ("dot", "convolution"):
            cls = "dot"
        elif op == "fft" or " fft(" in body:
            cls = "fft"
        elif re.search(r" (all-reduce|all-gather|all-to-all|reduce-scatter|collective-permute)[\w\-]*\(", line):
            cls = "collective"
        elif op in ("reduce", "reduce-window") or re.search(r" reduce(-window)?\(", body):
            cls = "reduce"
        elif op in ("copy", "transpose") or (op == "fusion" and re.search(r" (copy|transpose)\(", body)
                                             and not re.search(r" (add|subtract|multiply|divide|select|maximum|"
                                                               r"exponential|erf|rsqrt|compare|negate)\(", body)):
            cls = "layout"
        elif op == "fusion" or op in ("add", "multiply", "subtract", "divide", "select", "maximum", "negate"):
            cls = "elementwise"
        else:
            cls = "other"
        c = out.setdefault(cls, {"count": 0, "out_bytes": 0})
        c["count"] += 1
        c["out_bytes"] += _shape_bytes(shape)
    return dict(sorted(out.items(), key=lambda kv: -kv[1]["out_bytes"]))


def format_table(headers, rows, align=None) -> str:
    """Plain-text table; numbers right-aligned, text left-aligned."""
    cells = [[str(h) for h in headers]] + [[str(c) for c in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    if align is None:
        align = ["l"] + ["r"] * (len(headers) - 1)

    def fmt(row):
        return "  ".join(c.ljust(w) if a == "l" else c.rjust(w) for c, w, a in zip(row, widths, align)).rstrip()

    sep = "  ".join("-" * w for w in widths)
    return "\n".join([fmt(cells[0]), sep] + [fmt(r) for r in cells[1:]])


def gb(x: float) -> str:
    return f"{x / GB:.2f}"


def mem_available() -> int | None:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


# --------------------------------------------------------------------------- #
# Benchmark
# --------------------------------------------------------------------------- #


def analyse_train_step(cfg, tx, batch):
    from fcn_jax.parallel.mesh import single_device_mesh

    mesh = single_device_mesh()
    graphdef, state, window, n_params = abstract_train_inputs(cfg, mesh, tx, batch)
    step = make_train_step(graphdef, tx)
    with jax.set_mesh(mesh):
        t0 = time.perf_counter()
        lowered = step.lower(state, window)
        t1 = time.perf_counter()
        compiled = lowered.compile()
        t2 = time.perf_counter()
    return {
        "params": n_params,
        "lower_s": t1 - t0,
        "compile_s": t2 - t1,
        "memory": memory_stats(compiled),
        "flops_compiled": cost_flops(compiled),
        "flops_lowered": cost_flops(lowered),
        "hlo_census": hlo_census(compiled.as_text()),
    }


def _median_time(fn, runs: int, warmup: int, counters: dict | None = None):
    """(median seconds, every run's seconds); ``counters`` gets page faults and system time per run."""
    import resource

    for _ in range(warmup):
        jax.block_until_ready(fn())
    times = []
    r0 = resource.getrusage(resource.RUSAGE_SELF)
    for _ in range(runs):
        t0 = time.perf_counter()
        jax.block_until_ready(fn())
        times.append(time.perf_counter() - t0)
    r1 = resource.getrusage(resource.RUSAGE_SELF)
    if counters is not None:
        # zero-filling fresh pages shows up here (fcn_jax.cpu_runtime.keep_host_memory)
        counters["page_faults_per_run"] = (r1.ru_minflt - r0.ru_minflt) / runs
        counters["system_s_per_run"] = (r1.ru_stime - r0.ru_stime) / runs
    return statistics.median(times), times


def time_model(cfg, tx, batch, runs, warmup):
    model = AFNONet(cfg, seed=0)
    x = jax.random.normal(jax.random.key(1), (batch, 2, *cfg.img_size, cfg.in_channels), jnp.float32)
    graphdef, params = nnx.split(model, nnx.Param)
    res = {}

    fwd = jax.jit(lambda p, xx: nnx.merge(graphdef, p)(xx))
    t0 = time.perf_counter()
    fwd_c = fwd.lower(params, x[:, 0]).compile()
    res["forward_compile_s"] = time.perf_counter() - t0
    res["forward_s"], res["forward_runs_s"] = _median_time(lambda: fwd_c(params, x[:, 0]), runs, warmup)
    del fwd_c

    graphdef, state = init_train_state(model, tx)
    del model, params
    step = make_train_step(graphdef, tx)
    t0 = time.perf_counter()
    step_c = step.lower(state, x).compile()
    res["train_compile_s"] = time.perf_counter() - t0
    holder = {"state": state}

    def one():
        holder["state"], metrics = step_c(holder["state"], x)  # state is donated
        return metrics["loss"]

    counters = {}
    res["train_step_s"], res["train_runs_s"] = _median_time(one, runs, warmup, counters)
    res["train_page_faults_per_step"] = counters["page_faults_per_run"]
    res["train_system_s_per_step"] = counters["system_s_per_run"]
    res["final_loss"] = float(one())
    return res


def main(argv=None):
    ap = argparse.ArgumentParser(
        description="Forward / train-step time, compiled memory and FLOPs of the AFNO backbone on one CPU device.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    add_model_args(ap)
    ap.add_argument("--batch", type=int, default=1, help="batch size")
    ap.add_argument("--runs", type=int, default=3, help="timed runs (median reported)")
    ap.add_argument("--warmup", type=int, default=1, help="untimed runs after compiling")
    ap.add_argument("--skip-timing", action="store_true", help="memory/FLOPs only: no real model, nothing executed")
    ap.add_argument("--force-timing", action="store_true",
                    help="time even if MemAvailable looks too small for the compiled step's footprint")
    ap.add_argument("--untuned", action="store_true",
                    help="leave the process as JAX sets it up (no fcn_jax.cpu_runtime tuning), for A/B timing")
    ap.add_argument("--json", action="store_true", help="print one JSON object instead of tables")
    args = ap.parse_args(argv)

    cfg = model_config_from_args(args)
    tx = optax.adam(args.lr)
    result = {
        "config": dataclasses.asdict(cfg),
        "batch": args.batch,
        "device": str(jax.devices()[0]),
        "jax": jax.__version__,
        "cpu_count": os.cpu_count(),
        "cpu_tuning": CPU_TUNING,
    }

    analysis = analyse_train_step(cfg, tx, args.batch)
    result["train_step_analysis"] = analysis
    mem = analysis["memory"]

    timing = None
    if not args.skip_timing:
        avail = mem_available()
        need = int(mem["total"] * 1.15)
        if avail is not None and need > avail and not args.force_timing:
            result["timing_skipped"] = (
                f"compiled train step needs ~{need / GB:.1f} GB (arg+out-alias+temp, +15%), "
                f"MemAvailable is {avail / GB:.1f} GB; use --force-timing or a smaller --img"
            )
        else:
            timing = time_model(cfg, tx, args.batch, args.runs, args.warmup)
            result["timing"] = timing

    if args.json:
        print(json.dumps(result, indent=2))
        return 0

    print(f"AFNO backbone, {describe(cfg)}, batch {args.batch}; "
          f"{analysis['params']:,} parameters; jax {jax.__version__} on {result['device']} "
          f"({os.cpu_count()} CPUs)")
    print()
    published = cfg.img_size == (720, 1440) and cfg.patch_size == (8, 8) and cfg.depth == 12 \
        and cfg.embed_dim == 768 and args.batch == 1
    print("Train step (relative L2 + Adam), compiled memory analysis [GB = 1e9 bytes]")
    rows = [
        ["argument", gb(mem["argument"]), ""],
        ["output", gb(mem["output"]), ""],
        ["alias (donated)", gb(mem["alias"]), ""],
        ["temp", gb(mem["temp"]), f"jax-notes §13: {NOTES_TEMP_GB[cfg.remat]} (CPU, older port)" if published else ""],
        ["argument+output-alias+temp", gb(mem["total"]),
         f"seed talk: {SEED_SCAFFOLDING_GB} scaffolding / {SEED_RUNNING_GB} running" if published else ""],
        ["peak_memory (excl. temp on CPU)", gb(mem["peak_memory"]), ""],
    ]
    print(format_table(["quantity", "GB", "reference"], rows, ["l", "r", "l"]))
    print()
    fl_ref = f"jax-notes §13: {NOTES_TFLOP_PER_SAMPLE} per sample" if published else ""
    rows = [
        ["FLOPs, compiled (cost_analysis)", f"{analysis['flops_compiled'] / 1e12:.3f}", fl_ref],
        ["FLOPs, lowered (pre-partitioning)", f"{analysis['flops_lowered'] / 1e12:.3f}", ""],
    ]
    print(format_table(["train step", "TFLOP", "reference"], rows, ["l", "r", "l"]))
    print()
    print(f"lower {analysis['lower_s']:.1f} s, compile {analysis['compile_s']:.1f} s (abstract inputs)")
    print()
    rows = [[k, v["count"], gb(v["out_bytes"])] for k, v in analysis["hlo_census"].items()]
    print("Compiled train step, top-level HLO ops by class (bytes written: a memory-traffic proxy)")
    print(format_table(["class", "ops", "GB written"], rows))
    print()
    if timing:
        rows = [
            ["forward", f"{timing['forward_compile_s']:.1f}", f"{timing['forward_s']:.2f}",
             " ".join(f"{t:.2f}" for t in timing["forward_runs_s"])],
            ["train step", f"{timing['train_compile_s']:.1f}", f"{timing['train_step_s']:.2f}",
             " ".join(f"{t:.2f}" for t in timing["train_runs_s"])],
        ]
        print(f"Wall clock on this CPU, batch {args.batch}, median of {args.runs} after {args.warmup} warm-up "
              "(indicative: shared machine)")
        print(format_table(["", "compile s", "median s", "runs s"], rows, ["l", "r", "r", "l"]))
        if timing["train_step_s"] > 0:
            tf = analysis["flops_compiled"] / timing["train_step_s"] / 1e9
            print(f"train step throughput ≈ {tf:.1f} GFLOP/s (compiled FLOPs / median time)")
    elif "timing_skipped" in result:
        print("timing skipped:", result["timing_skipped"])
    return 0


if __name__ == "__main__":
    sys.exit(main())
