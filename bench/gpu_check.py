#!/usr/bin/env python
"""GPU check: correctness and speed of fcn_jax on one NVIDIA GPU, in one command (< 8 minutes).

``bash bench/gpu_check.sh`` makes a venv with ``pip install -e .[gpu]`` and runs
this script; ``python bench/gpu_check.py`` runs it in the current environment.
Cases, each in its own child process (XLA flags must be set before JAX starts),
each with its error printed instead of ending the run, under one time budget:

* ``parity``: the forward pass of the same weights and input on the GPU and on
  the CPU (float32, highest matmul precision), largest difference relative to
  the largest output, must be <= 1e-5;
* ``train fp32`` / ``train bf16``: the published 0.25-degree train step
  (720x1440, patch 8, 768 wide, 12 layers, 20 channels, relative L2 + Adam,
  batch 1) in float32 and bfloat16 compute, with the latency-hiding scheduler
  on (``--xla_gpu_enable_latency_hiding_scheduler=true``) and XLA's default
  command buffers (CUDA graphs);
* ``train fp32 remat``: the same with each block rematerialised;
* ``train fp32 no-cmd-buffer``: command buffers off (``--xla_gpu_enable_command_buffer=``);
* ``train fp32 no-LHS``: the latency-hiding scheduler off;
* ``forecast 7 d``: a 28-step (6-hourly) autoregressive forecast, batch 1;
* ``ensemble 100x24h``: 100 perturbed members, 4 steps, ensemble mean.

Each time is printed with its MFU against the card's dense peak for the compute
dtype (model flops of :mod:`fcn_jax.perf`, no rematerialisation counted) and
against the performance model's prediction (predicted / measured: the fraction
of speed of light reached). ``--cpu-smoke`` runs every case on the CPU with a
tiny model, to check the script itself.

Examples::

    bash bench/gpu_check.sh                 # everything, about 5-7 minutes on an H100
    python bench/gpu_check.py --quick       # fewer runs, smaller ensemble
    python bench/gpu_check.py --cpu-smoke   # no GPU needed: the script's own check
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
import traceback

PUBLISHED = dict(img_size=(720, 1440), patch_size=(8, 8), embed_dim=768, depth=12, in_channels=20, out_channels=20)
TINY = dict(img_size=(32, 64), patch_size=(4, 4), embed_dim=64, depth=2, in_channels=4, out_channels=4)
LHS_ON = "--xla_gpu_enable_latency_hiding_scheduler=true"
LHS_OFF = "--xla_gpu_enable_latency_hiding_scheduler=false"
CMD_BUFFER_OFF = "--xla_gpu_enable_command_buffer="
PARITY_TOL = 1e-5

#: (name, kind, options, XLA flags); run in this order until the budget is spent.
CASES = [
    ("parity", "parity", {}, [LHS_ON]),
    ("train fp32", "train", {"compute_dtype": "float32"}, [LHS_ON]),
    ("train bf16", "train", {"compute_dtype": "bfloat16"}, [LHS_ON]),
    ("forecast 7 d", "forecast", {"steps": 28}, [LHS_ON]),
    ("ensemble 100x24h", "ensemble", {"steps": 4, "members": 100}, [LHS_ON]),
    ("train fp32 remat", "train", {"compute_dtype": "float32", "remat": True}, [LHS_ON]),
    ("train fp32 no-cmd-buffer", "train", {"compute_dtype": "float32"}, [LHS_ON, CMD_BUFFER_OFF]),
    ("train fp32 no-LHS", "train", {"compute_dtype": "float32"}, [LHS_OFF]),
]


# --------------------------------------------------------------------------- #
# Child: one case
# --------------------------------------------------------------------------- #


def _timed(fn, runs: int) -> list[float]:
    from fcn_jax.perfmodel.hardware import timed_runs

    return timed_runs(fn, runs)  # one warm-up call (after compilation), then ``runs`` timed


def _hardware(device):
    from fcn_jax.perfmodel.hardware import HARDWARE, cpu_hardware, detect_hardware

    key = detect_hardware(device)
    if key == "cpu":
        return "cpu", cpu_hardware()
    if key is None:
        return None, None
    return key, HARDWARE[key]


def _prediction(cfg, kind: str, opts: dict, hw) -> tuple[float, float]:
    """(model flops, predicted seconds) of a case on one device."""
    from fcn_jax.parallel.mesh import MeshSizes
    from fcn_jax.perfmodel import model as pm

    if kind == "train":
        s = pm.Setting(cfg, MeshSizes(), 1, hw)
        useful = pm.useful_flops(s)
        return useful, pm.predict_time(pm.train_step_work(s), hw)["total"]
    if kind == "forecast":
        s = pm.Setting(cfg, MeshSizes(), 1, hw)
        w = pm.forward_work(s)
        return opts["steps"] * w.flops, opts["steps"] * pm.predict_time(w, hw)["total"]
    if kind == "ensemble":
        s = pm.Setting(cfg, MeshSizes(), opts["members"], hw)
        w = pm.forward_work(s)
        return opts["steps"] * w.flops, opts["steps"] * pm.predict_time(w, hw)["total"]
    return float("nan"), float("nan")


def _model_config(opts: dict, smoke: bool):
    from fcn_jax.config import ModelConfig

    kw = dict(TINY if smoke else PUBLISHED)
    kw.update({k: v for k, v in opts.items() if k in ("compute_dtype", "remat")})
    return ModelConfig(**kw)


def case_parity(opts, smoke: bool) -> dict:
    import jax
    import jax.numpy as jnp
    import numpy as np
    from flax import nnx

    from fcn_jax.model.afnonet import AFNONet
    from fcn_jax.parallel.mesh import make_mesh

    jax.config.update("jax_default_matmul_precision", "highest")
    cpu = jax.devices("cpu")[0]
    acc = jax.devices()[0]
    cfg = _model_config({}, smoke)
    with jax.default_device(cpu):
        model = AFNONet(cfg, seed=0)
        x = jax.random.normal(jax.random.key(1), (1, *cfg.img_size, cfg.in_channels), jnp.float32)
    graphdef, params = nnx.split(model, nnx.Param)
    fwd = jax.jit(lambda p, xx: nnx.merge(graphdef, p)(xx))
    out = {}
    for name, dev in (("cpu", cpu), ("accelerator", acc)):
        p, xx = jax.device_put((params, x), dev)
        with jax.set_mesh(make_mesh((1, 1, 1, 1), [dev])):
            t0 = time.perf_counter()
            out[name] = np.asarray(jax.block_until_ready(fwd(p, xx)))
            out[name + "_s"] = time.perf_counter() - t0
    ref, got = out["cpu"], out["accelerator"]
    rel = float(np.max(np.abs(got - ref)) / np.max(np.abs(ref)))
    return {"rel_err": rel, "ok": bool(rel <= PARITY_TOL and np.all(np.isfinite(got))),
            "device": str(acc.device_kind), "cpu_s": out["cpu_s"], "accelerator_s": out["accelerator_s"]}


def case_train(opts, smoke: bool, runs: int) -> dict:
    import jax
    import jax.numpy as jnp
    import optax

    from fcn_jax.model.afnonet import AFNONet
    from fcn_jax.training.step import init_train_state, make_train_step

    cfg = _model_config(opts, smoke)
    tx = optax.adam(5e-4)
    model = AFNONet(cfg, seed=0)
    x = jax.random.normal(jax.random.key(1), (1, 2, *cfg.img_size, cfg.in_channels), jnp.float32)
    graphdef, state = init_train_state(model, tx)
    del model
    t0 = time.perf_counter()
    step = make_train_step(graphdef, tx).lower(state, x).compile()
    compile_s = time.perf_counter() - t0
    holder = {"state": state}

    def one():
        holder["state"], metrics = step(holder["state"], x)  # state is donated
        return metrics["loss"]

    times = _timed(one, runs)
    loss = float(one())
    return {"times_s": times, "compile_s": compile_s, "loss": loss, "ok": bool(jnp.isfinite(loss))}


def case_forecast(opts, smoke: bool, runs: int, members: int | None = None) -> dict:
    import jax
    import jax.numpy as jnp

    from fcn_jax.inference.rollout import ensemble_rollout, rollout
    from fcn_jax.model.afnonet import AFNONet

    cfg = _model_config({}, smoke)
    model = AFNONet(cfg, seed=0)
    x0 = jax.random.normal(jax.random.key(1), (1, *cfg.img_size, cfg.in_channels), jnp.float32)
    steps = opts["steps"]
    if members is None:
        def fn():
            return rollout(model, x0, steps)
    else:
        chunk = opts.get("member_chunk")
        if chunk is None:  # bound the working set: 20 members per call on an 80 GB card, 10 below
            try:
                limit = jax.devices()[0].memory_stats().get("bytes_limit", 0)
            except Exception:  # noqa: BLE001 - memory_stats is optional (CPU)
                limit = 0
            chunk = 20 if limit == 0 or limit > 60 * 2**30 else 10
        chunk = min(chunk, members)

        def fn():
            return ensemble_rollout(model, x0, steps, members, key=jax.random.key(2), member_chunk=chunk,
                                    reduce="mean")
    t0 = time.perf_counter()
    y = jax.block_until_ready(fn())  # includes compilation
    first_s = time.perf_counter() - t0
    times = _timed(fn, runs)
    return {"times_s": times, "first_call_s": first_s, "shape": list(y.shape), "ok": bool(jnp.all(jnp.isfinite(y)))}


def run_child(spec: dict) -> dict:
    import jax

    name, kind, opts = spec["name"], spec["kind"], spec["opts"]
    smoke, runs = spec["smoke"], spec["runs"]
    dev = jax.devices()[0]
    res = {"name": name, "kind": kind, "device": str(getattr(dev, "device_kind", dev.platform)),
           "platform": dev.platform, "xla_flags": os.environ.get("XLA_FLAGS", ""), "jax": jax.__version__}
    if not smoke and dev.platform != "gpu":
        raise RuntimeError(f"no GPU: JAX's first device is {dev} (use --cpu-smoke to check the script on a CPU)")
    if kind == "parity":
        res.update(case_parity(opts, smoke))
        return res
    if kind == "train":
        res.update(case_train(opts, smoke, runs))
    elif kind == "forecast":
        res.update(case_forecast(opts, smoke, runs))
    elif kind == "ensemble":
        res.update(case_forecast(opts, smoke, runs, members=opts["members"]))
    key, hw = _hardware(dev)
    res["hardware"] = key
    cfg = _model_config(opts, smoke)
    t = min(res["times_s"])
    if hw is not None:
        flops, pred = _prediction(cfg, kind, opts, hw)
        dtype = cfg.compute_dtype if kind == "train" else "float32"
        res.update({"model_flops": flops, "predicted_s": pred, "mfu": flops / (t * hw.peak_for_mfu(dtype)),
                    "fraction_of_model": pred / t, "peak_flops": hw.peak_for_mfu(dtype)})
    return res


# --------------------------------------------------------------------------- #
# Parent: budget, child processes, table
# --------------------------------------------------------------------------- #


def _fmt(x, spec=".3f", unit=""):
    return "-" if x is None else f"{x:{spec}}{unit}"


def print_row(r: dict) -> None:
    if "error" in r:
        print(f"{r['name']:<26} ERROR {r['error']}", flush=True)
        return
    if r["kind"] == "parity":
        print(f"{r['name']:<26} {'ok  ' if r['ok'] else 'FAIL'} rel. error {r['rel_err']:.2e} (<= {PARITY_TOL:g}); "
              f"first call CPU {r['cpu_s']:.1f} s, {r['device']} {r['accelerator_s']:.1f} s", flush=True)
        return
    t = min(r["times_s"])
    med = sorted(r["times_s"])[len(r["times_s"]) // 2]
    mfu = _fmt(r.get("mfu") and 100 * r["mfu"], ".1f", " %")
    frac = _fmt(r.get("fraction_of_model") and 100 * r["fraction_of_model"], ".0f", " %")
    extra = f"compile {r['compile_s']:.0f} s" if "compile_s" in r else f"first call {r['first_call_s']:.0f} s"
    print(f"{r['name']:<26} {'ok  ' if r['ok'] else 'FAIL'} {t:9.4f} s (median {med:.4f}) MFU {mfu:>7}  "
          f"predicted {_fmt(r.get('predicted_s'), '.4f', ' s')} = {frac:>5} of speed of light; {extra}", flush=True)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description="fcn_jax on one GPU: GPU/CPU parity, train step variants, forecast and "
                                             "ensemble timings with MFU and the performance model's prediction.")
    ap.add_argument("--budget", type=float, default=420.0, help="seconds for all cases together")
    ap.add_argument("--quick", action="store_true", help="one timed run per case, 20-member ensemble")
    ap.add_argument("--cpu-smoke", action="store_true", help="run every case on the CPU with a tiny model")
    ap.add_argument("--only", action="append", help="run only cases whose name contains this (repeatable)")
    ap.add_argument("--json", metavar="PATH", help="also write the results as JSON to PATH")
    ap.add_argument("--_child", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)

    if args._child:  # one case; its JSON result on the last line of stdout
        from fcn_jax import cli

        cli.start(argparse.Namespace(cpu_devices=0))  # as the commands start (platform: the parent's JAX_PLATFORMS)
        spec = json.loads(args._child)
        try:
            res = run_child(spec)
        except Exception as e:  # noqa: BLE001 - report every failure, never end the whole check
            traceback.print_exc()
            res = {"name": spec["name"], "kind": spec["kind"], "error": f"{type(e).__name__}: {e}"}
        print(json.dumps(res, default=float))
        return 0

    t_start = time.perf_counter()
    runs = 1 if args.quick else 3
    cases = [c for c in CASES if not args.only or any(o in c[0] for o in args.only)]
    print(f"fcn_jax GPU check: {len(cases)} cases, budget {args.budget:.0f} s"
          f"{' (CPU smoke test, tiny model)' if args.cpu_smoke else ''}", flush=True)
    results = []
    for name, kind, opts, flags in cases:
        left = args.budget - (time.perf_counter() - t_start)
        if left < 20:
            r = {"name": name, "kind": kind, "error": f"skipped: time budget of {args.budget:.0f} s spent"}
            results.append(r)
            print_row(r)
            continue
        opts = dict(opts)
        if kind == "ensemble" and args.quick:
            opts["members"] = 20
        env = dict(os.environ)
        env["XLA_FLAGS"] = " ".join(filter(None, [env.get("XLA_FLAGS", "")] + flags))
        if args.cpu_smoke:
            env["JAX_PLATFORMS"] = "cpu"
        elif kind != "parity":
            env.pop("JAX_PLATFORMS", None)
        if kind == "parity" and not args.cpu_smoke:
            env["JAX_PLATFORMS"] = "cuda,cpu"
        spec = {"name": name, "kind": kind, "opts": opts, "smoke": args.cpu_smoke, "runs": runs}
        cmd = [sys.executable, os.path.abspath(__file__), "--_child", json.dumps(spec)]
        t0 = time.perf_counter()
        try:
            p = subprocess.run(cmd, capture_output=True, text=True, timeout=left, env=env)
            last = p.stdout.strip().splitlines()[-1] if p.stdout.strip() else ""
            if last.startswith("{"):
                r = json.loads(last)
                if "error" in r:
                    tail = [ln for ln in p.stderr.strip().splitlines() if ln.strip()][-4:]
                    r["error"] += (" | " + " | ".join(tail)) if tail else ""
            else:
                tail = [ln for ln in p.stderr.strip().splitlines() if ln.strip()][-4:]
                sig = f" (signal {-p.returncode})" if p.returncode < 0 else ""
                r = {"name": name, "kind": kind, "error": f"exit {p.returncode}{sig}: " + " | ".join(tail)}
        except subprocess.TimeoutExpired:
            r = {"name": name, "kind": kind, "error": f"timed out after {left:.0f} s (budget)"}
        except Exception as e:  # noqa: BLE001
            r = {"name": name, "kind": kind, "error": f"{type(e).__name__}: {e}"}
        r["wall_s"] = time.perf_counter() - t0
        results.append(r)
        print_row(r)
    total = time.perf_counter() - t_start
    failed = [r["name"] for r in results if "error" in r or not r.get("ok", False)]
    print(f"total {total:.0f} s; " + (f"FAILED or skipped: {', '.join(failed)}" if failed else "all cases ok"),
          flush=True)
    print("MFU: model flops (fcn_jax.perf, no recomputation) / (time x the card's dense peak for the compute dtype; "
          "float32 = TF32); speed of light: the performance model's predicted time / measured time.")
    if args.json:
        tmp = args.json + ".tmp"
        with open(tmp, "w") as f:
            json.dump({"results": results, "total_s": total, "budget_s": args.budget}, f, indent=2, default=float)
        os.replace(tmp, args.json)
    return 0 if not failed else 1


if __name__ == "__main__":
    sys.exit(main())
