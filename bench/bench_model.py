#!/usr/bin/env python
"""Single-device benchmark of the FourCastNet AFNO backbone on this CPU.

Measures, for the published 0.25-degree configuration (720x1440 pixels, patch
8 -> 90x180 tokens, 20 channels, embed 768, 12 blocks, 8 AFNO blocks) at batch
1 unless overridden:

* the compiler's memory analysis of the jit-compiled train step (relative L2 +
  Adam, ``fcn_jax.training.step.make_train_step``), lowered from *abstract*
  inputs (``nnx.eval_shape`` + ``jax.ShapeDtypeStruct``) so nothing big is
  allocated, next to the seed talk's "scaffolding" / "running" figures
  (``fcn_jax.perfmodel.report.SEED_TABLE``);
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
import functools
import json
import os
import statistics
import sys
import time

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from fcn_jax import cli
from fcn_jax.config import ModelConfig
from fcn_jax.cpu_runtime import tune_cpu_process
from fcn_jax.model.afnonet import AFNONet

# the abstract (nothing allocated) train step and XLA's own numbers, shared with the performance model's check
from fcn_jax.perfmodel.compiler import compile_train_step
from fcn_jax.perfmodel.report import SEED_TABLE
from fcn_jax.training.step import init_train_state, make_train_step

GB = 1e9
#: Seed talk, per sample (jax-notes §13): 0.25 deg / patch 8 / 12 blocks, scaffolding and running GB.
SEED_SCAFFOLDING_GB, SEED_RUNNING_GB = next((s, r) for name, _, s, r in SEED_TABLE if name == "0.25°/p8/12")
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
    r = compile_train_step(cfg, (1, 1, 1, 1), batch, tx=tx, census=True)
    return {
        "params": r["params"],
        "lower_s": r["lower_s"],
        "compile_s": r["compile_s"],
        "memory": r["memory"],
        "flops_compiled": r["flops_per_device"],
        "flops_lowered": r["flops_lowered_global"],
        "hlo_census": r["op_census"],
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
    res["forward_s"], res["forward_runs_s"] = _median_time(functools.partial(fwd_c, params, x[:, 0]), runs, warmup)
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
    if args.untuned:
        os.environ["FCN_JAX_CPU_TUNING"] = "0"
    cli.start(argparse.Namespace(cpu_devices=1))  # what the command lines do before JAX starts
    cpu_tuning = tune_cpu_process()  # what start applied (asked again before the backend starts: no change)

    cfg = model_config_from_args(args)
    tx = optax.adam(args.lr)
    result = {
        "config": dataclasses.asdict(cfg),
        "batch": args.batch,
        "device": str(jax.devices()[0]),
        "jax": jax.__version__,
        "cpu_count": os.cpu_count(),
        "cpu_tuning": cpu_tuning,
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
