"""One prediction for an experiment: per step, per forward, memory, time-to-solution; mesh search."""

from __future__ import annotations

import dataclasses
import math

from fcn_jax.config import ModelConfig
from fcn_jax.parallel.mesh import MeshError, MeshSizes, validate_layout
from fcn_jax.perfmodel import model as pm
from fcn_jax.perfmodel.hardware import Hardware
from fcn_jax.perfmodel.layouts import LAYOUTS

FORECAST_STEPS_7DAY = 28  # 6-hourly
ENSEMBLE_MEMBERS = 100
ENSEMBLE_STEPS_24H = 4


def _time(work, hw: Hardware) -> dict:
    return pm.predict_time(work, hw, emulated=hw.name.startswith("this CPU"))


def forward_time(cfg: ModelConfig, mesh: MeshSizes, batch: int, hw: Hardware, layout: str) -> dict:
    s = pm.Setting(cfg, mesh, batch, hw, layout)
    w = pm.forward_work(s)
    t = _time(w, hw)
    t["flops_per_device"] = w.flops
    return t


def resolve_layout(cfg: ModelConfig, mesh: MeshSizes, batch: int | None, layout: str) -> str:
    """``auto`` -> the layout the model would use on ``mesh`` (channel-block when it applies, else pencil)."""
    if layout == "auto":
        return validate_layout(mesh, cfg, batch_size=batch, spectral_layout="auto").spectral_layout
    if layout not in LAYOUTS:
        raise MeshError(f"unknown spectral layout {layout!r}; valid: {['auto', *sorted(LAYOUTS)]}")
    LAYOUTS[layout].validate(cfg, mesh, batch)
    return layout


def predict(cfg: ModelConfig, mesh: MeshSizes, batch: int, hw: Hardware, layout: str = "auto",
            rollout: int = 1, train_steps: int = 0, optimizer_counts: int = 1) -> dict:
    """Everything the CLI prints, as one dict (bytes, flops, seconds); ``layout`` may be ``auto``."""
    layout = resolve_layout(cfg, mesh, batch, layout)
    s = pm.Setting(cfg, mesh, batch, hw, layout, rollout, optimizer_counts)
    w = pm.train_step_work(s)
    t = _time(w, hw)
    mem = pm.memory_per_device(s)
    n = s.devices
    useful = pm.useful_flops(dataclasses.replace(s, batch=batch))  # one device, whole global batch
    peak = hw.peak_for_mfu(cfg.compute_dtype)
    step = {
        "flops_per_step": w.flops * n,
        "flops_per_device": w.flops,
        "model_flops_per_step": useful,
        "flops_by_class_per_device": pm.flops_by_class(w),
        "memory_traffic_bytes_per_device": w.bytes,
        "memory_per_device_bytes": mem,
        "collective_bytes_per_device": w.collective_bytes(),
        "collectives_per_step": sum(c.count for c in w.collectives),
        "step_time_s": {k: v for k, v in t.items() if k != "by_op"},
        "step_time_by_op_s": t["by_op"],
        "mfu": useful / (t["total"] * peak * n) if t["total"] > 0 else float("nan"),
        "spectral_layout": layout,
    }
    # forward (inference) at one sample per data shard
    fwd = forward_time(cfg, mesh, mesh.data, hw, layout)
    fs = pm.Setting(cfg, mesh, mesh.data, hw, layout)
    fwd_useful = pm.useful_flops(fs, forward_only=True)
    step["forward"] = {
        "batch": mesh.data, "flops_per_device": fwd["flops_per_device"],
        "time_s": {k: v for k, v in fwd.items() if k in ("compute", "memory", "communication", "total")},
        "memory_per_device_bytes": pm.forward_memory_per_device(fs),
        "mfu": fwd_useful / (fwd["total"] * peak * n) if fwd["total"] > 0 else float("nan"),
    }
    # time to solution
    single = MeshSizes(1, mesh.channel, mesh.height, mesh.width)
    f1 = forward_time(cfg, single, 1, hw, layout)["total"]
    members_per_pass = mesh.data * max(1, math.ceil(ENSEMBLE_MEMBERS / mesh.data))
    fe = forward_time(cfg, mesh, members_per_pass, hw, layout)["total"]
    step["time_to_solution_s"] = {
        "training": train_steps * t["total"],
        "training_steps": train_steps,
        "forecast_7day": FORECAST_STEPS_7DAY * f1,
        "ensemble_100x24h": ENSEMBLE_STEPS_24H * fe,
    }
    return step


def meshes_for(cfg: ModelConfig, devices: int, layout: str = "channel_block", local_batch: int = 1):
    """Every mesh of ``devices`` devices the layout accepts, at ``local_batch`` samples per data shard."""
    out = []
    for d in range(1, devices + 1):
        if devices % d:
            continue
        rest = devices // d
        for c in range(1, rest + 1):
            if rest % c:
                continue
            for h in range(1, rest // c + 1):
                if (rest // c) % h:
                    continue
                m = MeshSizes(d, c, h, rest // c // h)
                try:
                    LAYOUTS[layout].validate(cfg, m, d * local_batch)
                except MeshError:
                    continue
                out.append(m)
    return out


@dataclasses.dataclass(frozen=True)
class Fit:
    """The cheapest fitting choice of :func:`cheapest_fitting`."""

    mesh: MeshSizes
    layout: str
    remat: bool
    step_s: float  # predicted train step at one sample per data shard
    memory: dict  # memory_per_device

    @property
    def per_sample_s(self) -> float:
        return self.step_s / self.mesh.data


def cheapest_fitting(cfg: ModelConfig, devices: int, hw: Hardware, layouts=("channel_block", "pencil"),
                     remat_options=(False, True), max_data: int | None = None) -> Fit | None:
    """The mesh, layout and remat setting with the lowest predicted time per sample that fits in memory.

    One sample per data shard; ``devices`` all used; ``max_data`` caps the data axis
    (the global batch; 1 = one sample split over all devices). None when nothing fits.
    """
    if isinstance(layouts, str):
        layouts = (layouts,)
    best = None
    for layout in layouts:
        for remat in remat_options:
            c = dataclasses.replace(cfg, remat=remat)
            for m in meshes_for(c, devices, layout):
                if max_data is not None and m.data > max_data:
                    continue
                s = pm.Setting(c, m, m.data, hw, layout)
                mem = pm.memory_per_device(s)
                if not mem["fits"]:
                    continue
                fit = Fit(m, layout, remat, _time(pm.train_step_work(s), hw)["total"], mem)
                if best is None or fit.per_sample_s < best.per_sample_s:
                    best = fit
    return best
