"""Small helpers shared by several test modules (imported as ``helpers``; pytest puts tests/ on sys.path)."""

from __future__ import annotations

import json
from pathlib import Path

import jax.numpy as jnp
import numpy as np
from flax import nnx


def max_rel(a, b) -> float:
    """max |a - b| relative to max |b| (absolute when b is all zero), in float64."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    scale = np.max(np.abs(b))
    return float(np.max(np.abs(a - b)) / scale) if scale > 0 else float(np.max(np.abs(a)))


def toy_loss_fn(graphdef):
    """loss(params, x) of the model ``graphdef``: a scalar that depends on every output, for gradient checks."""

    def loss(p, x):
        out = nnx.merge(graphdef, p)(x)
        return jnp.mean(out**2) + jnp.mean(out * x)

    return loss


def world_overrides(store, validate_every: int = 4, **train) -> list[str]:
    """``--set`` overrides for an 8-step training run of a tiny model on a test world store."""
    base = {
        "data.store": store, "data.train_years": "[2000,2000]", "data.valid_years": "[2000,2000]",
        "model.embed_dim": 32, "model.depth": 1, "model.num_blocks": 8,
        "mesh.data": -1, "train.batch_size": 8, "train.steps": 8, "train.log_every": 1,
        "train.validate_every": validate_every, "train.checkpoint_every": 2, "train.validate_batches": 1,
        "train.warmup_steps": 0,
    }
    base.update({f"train.{k}" if "." not in k else k: v for k, v in train.items()})
    return [f"{k}={v}" for k, v in base.items()]


def logged_losses(workdir) -> dict[int, float]:
    """{step: training loss} from a run directory's metrics.jsonl."""
    recs = [json.loads(line) for line in Path(workdir, "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in recs if "loss" in r and r.get("kind") != "validation"}
