"""The seed talk's memory table, its extension to 8/16/64 A100-80GB, and the time-to-solution figure."""

from __future__ import annotations

import dataclasses

from fcn_jax.config import ModelConfig
from fcn_jax.parallel.mesh import MeshSizes
from fcn_jax.perfmodel import model as pm
from fcn_jax.perfmodel.hardware import HARDWARE
from fcn_jax.perfmodel.predict import cheapest_fitting

GB = 1e9

#: The seed talk's per-sample memory, "scaffolding / running" in GB (jax-notes §13).
SEED_TABLE = [
    ("0.25°/p8/12", dict(img_size=(720, 1440), patch_size=(8, 8), depth=12), 9.3, 3.4),
    ("0.25°/p4/12", dict(img_size=(720, 1440), patch_size=(4, 4), depth=12), 32.4, 7.0),
    ("0.25°/p2/12", dict(img_size=(720, 1440), patch_size=(2, 2), depth=12), 80.0, None),
    ("0.1°/p4/24", dict(img_size=(1800, 3600), patch_size=(4, 4), depth=24), 405.0, 87.5),
]


def seed_rows(hw_name: str = "a100-80gb"):
    """[(name, model scaffolding GB, model running GB, seed scaffolding, seed running, breakdown)] on one device.

    Reading of the seed's columns (the talk gives no definition): *scaffolding* =
    the float32 train step's state with every activation kept for the backward
    (parameters + gradients + Adam + activations); *running* = the same with
    per-block rematerialisation (block inputs + one block's activations).
    """
    hw = HARDWARE[hw_name]
    rows = []
    for name, kw, seed_s, seed_r in SEED_TABLE:
        cfg = ModelConfig(**kw)
        s = pm.Setting(cfg, MeshSizes(), 1, hw)
        mem = pm.memory_per_device(s)
        fixed = mem["params"] + mem["optimizer"] + mem["gradients"] + mem["inputs"]
        rows.append({
            "config": name, "scaffolding_gb": (fixed + mem["activations_no_remat"]) / GB,
            "running_gb": (fixed + mem["activations_remat"]) / GB, "seed_scaffolding_gb": seed_s,
            "seed_running_gb": seed_r, "state_gb": fixed / GB,
            "activations_gb": mem["activations_no_remat"] / GB, "activations_remat_gb": mem["activations_remat"] / GB,
        })
    return rows


def _fits(devices, hw_name: str, max_data: int | None):
    """(config name, model config, devices, Fit or None) for every seed configuration and device count."""
    hw = HARDWARE[hw_name]
    for name, kw, _, _ in SEED_TABLE:
        cfg = ModelConfig(**kw)
        for n in devices:
            yield name, cfg, n, cheapest_fitting(cfg, n, hw, max_data=max_data)


def extension_rows(devices=(8, 16, 64), hw_name: str = "a100-80gb", max_data: int | None = None):
    """Cheapest mesh that fits per configuration and device count, either spectral layout.

    ``max_data=1``: one sample split over all the devices (the per-device memory of
    strong scaling); None: any data axis (the fastest use of the devices).
    """
    rows = []
    for name, _, n, best in _fits(devices, hw_name, max_data):
        if best is None:
            rows.append({"config": name, "devices": n, "mesh": None,
                         "note": "no mesh fits in either layout (a pipeline stage axis would be needed)"})
            continue
        rows.append({"config": name, "devices": n, "mesh": best.mesh.shape, "layout": best.layout,
                     "remat": best.remat, "per_device_gb": best.memory["total"] / GB, "step_s": best.step_s,
                     "samples_per_s": best.mesh.data / best.step_s})
    return rows


def tts_rows(devices=(1, 8, 64), hw_name: str = "a100-80gb", steps: int = 126_600, global_batch: int = 64):
    """Time to solution per configuration and device count: training run, 7-day forecast, 100-member ensemble.

    Training: ``steps`` x ``global_batch`` samples on the cheapest fitting mesh with
    ``data <= global_batch``; forecasts: :func:`fcn_jax.perfmodel.predict.predict` on that
    mesh (forecast on one data shard's model-parallel group, ensemble over all).
    """
    from fcn_jax.perfmodel.predict import predict

    hw = HARDWARE[hw_name]
    rows = []
    for name, cfg, n, best in _fits(devices, hw_name, global_batch):
        if best is None:
            rows.append({"config": name, "devices": n, "mesh": None})
            continue
        res = predict(dataclasses.replace(cfg, remat=best.remat), best.mesh, best.mesh.data, hw, best.layout)
        tts = res["time_to_solution_s"]
        rows.append({"config": name, "devices": n, "mesh": best.mesh.shape, "layout": best.layout,
                     "remat": best.remat, "training_s": steps * global_batch * best.per_sample_s,
                     "forecast_7day_s": tts["forecast_7day"], "ensemble_s": tts["ensemble_100x24h"],
                     "mfu": res["mfu"]})
    return rows


def _fmt_s(t: float) -> str:
    for unit, sec in (("d", 86400), ("h", 3600), ("min", 60), ("s", 1)):
        if t >= sec:
            return f"{t / sec:.1f} {unit}"
    return f"{t * 1e3:.0f} ms"


def format_tts_table(rows, steps: int = 126_600, global_batch: int = 64) -> str:
    lines = [f"| config | devices | mesh (d,c,h,w), layout | training ({steps:,} steps x {global_batch}) | MFU | "
             "7-day forecast (28 steps) | 100-member 24 h ensemble |", "|---|---:|---|---:|---:|---:|---:|"]
    for r in rows:
        if r["mesh"] is None:
            lines.append(f"| {r['config']} | {r['devices']} | does not fit | | | | |")
            continue
        lines.append(f"| {r['config']} | {r['devices']} | {','.join(map(str, r['mesh']))}, {r['layout']}"
                     f"{', remat' if r['remat'] else ''} | {_fmt_s(r['training_s'])} | {100 * r['mfu']:.0f} % | "
                     f"{_fmt_s(r['forecast_7day_s'])} | {_fmt_s(r['ensemble_s'])} |")
    return "\n".join(lines)


def plot_time_to_solution(path, hw_name: str = "a100-80gb", steps: int = 126_600, global_batch: int = 64):
    """Training time-to-solution against resolution and against device count (matplotlib Agg)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    hw = HARDWARE[hw_name]
    # same number of samples seen (steps x global batch) at each resolution, patch 8 -> tokens grow as 1/deg^2
    # rows and columns rounded down to whole patches (the original uses 720 of 721 rows at 0.25 degrees)
    res = [(deg, (int(180 / deg) // 8 * 8, int(360 / deg) // 8 * 8)) for deg in (2.0, 1.0, 0.5, 0.25, 0.125, 0.1)]
    samples = steps * global_batch
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    for n, style in ((8, "o-"), (64, "s-"), (512, "^-")):
        xs, ys = [], []
        for deg, img in res:
            cfg = ModelConfig(img_size=img, patch_size=(8, 8))
            best = cheapest_fitting(cfg, n, hw, max_data=global_batch)
            if best is None:
                continue
            xs.append(deg)
            ys.append(samples * best.per_sample_s / 86400)
        axes[0].plot(xs, ys, style, label=f"{n} × {hw_name}")
    axes[0].set_xscale("log")
    axes[0].set_yscale("log")
    axes[0].invert_xaxis()
    axes[0].set_xlabel("grid spacing (degrees), patch 8, 12 layers")
    axes[0].set_ylabel(f"days to train ({steps:,} steps × {global_batch})")
    axes[0].set_title("time to solution vs resolution")
    axes[0].grid(True, which="both", alpha=0.3)
    axes[0].legend()
    for name, kw in (("0.25°/p8/12", dict(img_size=(720, 1440), patch_size=(8, 8), depth=12)),
                     ("0.25°/p4/12", dict(img_size=(720, 1440), patch_size=(4, 4), depth=12)),
                     ("0.1°/p4/24", dict(img_size=(1800, 3600), patch_size=(4, 4), depth=24))):
        cfg = ModelConfig(**kw)
        xs, ys = [], []
        for n in (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024):
            best = cheapest_fitting(cfg, n, hw, max_data=global_batch)
            if best is None:
                continue
            xs.append(n)
            ys.append(samples * best.per_sample_s / 86400)
        axes[1].plot(xs, ys, "o-", label=name)
    axes[1].set_xscale("log", base=2)
    axes[1].set_yscale("log")
    axes[1].set_xlabel(f"devices ({hw_name})")
    axes[1].set_ylabel("days to train")
    axes[1].set_title("time to solution vs device count")
    axes[1].grid(True, which="both", alpha=0.3)
    axes[1].legend()
    fig.suptitle(f"fcn_jax performance model: cheapest fitting mesh (channel-block or pencil layout, data <= "
                 f"{global_batch}), speed of light, no overlap, float32")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def format_seed_table(rows) -> str:
    lines = ["| config | model scaffolding GB | seed | model running GB | seed | params+grads+Adam+io GB | "
             "activations GB (no remat / remat) |", "|---|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        sr = "-" if r["seed_running_gb"] is None else f"{r['seed_running_gb']:.1f}"
        ss = f"{r['seed_scaffolding_gb']:.1f}" + ("+" if r["config"] == "0.25°/p2/12" else "")
        lines.append(f"| {r['config']} | {r['scaffolding_gb']:.1f} | {ss} | {r['running_gb']:.1f} | {sr} | "
                     f"{r['state_gb']:.2f} | {r['activations_gb']:.1f} / {r['activations_remat_gb']:.1f} |")
    return "\n".join(lines)


def format_extension_table(rows) -> str:
    lines = ["| config | devices | cheapest mesh (d,c,h,w) | layout | remat | GB/device | step s | samples/s |",
             "|---|---:|---|---|---|---:|---:|---:|"]
    for r in rows:
        if r["mesh"] is None:
            lines.append(f"| {r['config']} | {r['devices']} | none fits | | | | | {r['note']} |")
        else:
            lines.append(f"| {r['config']} | {r['devices']} | {','.join(map(str, r['mesh']))} | {r['layout']} | "
                         f"{'yes' if r['remat'] else 'no'} | {r['per_device_gb']:.1f} | {r['step_s']:.3f} | "
                         f"{r['samples_per_s']:.1f} |")
    return "\n".join(lines)


__all__ = ["SEED_TABLE", "extension_rows", "format_extension_table", "format_seed_table", "format_tts_table",
           "plot_time_to_solution", "seed_rows", "tts_rows"]
