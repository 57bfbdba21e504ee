"""Optimiser and learning-rate schedule of the original recipe (model spec §14.3)."""

from __future__ import annotations

from typing import Callable

import jax.numpy as jnp
import optax

from fcn_jax.config import TrainConfig


def make_schedule(cfg: TrainConfig) -> Callable:
    """Learning rate as a function of the optimiser step.

    ``cosine``: lr * (1 + cos(pi * t)) / 2 with t running from 0 to 1 over the
    run after an optional linear warm-up. With ``steps_per_epoch > 0`` t only
    advances once per epoch -- the original's ``CosineAnnealingLR`` stepped per
    epoch (a staircase). ``constant``: lr (after warm-up).
    """
    lr, warm, total, spe = cfg.lr, cfg.warmup_steps, cfg.steps, cfg.steps_per_epoch

    def schedule(step):
        step = jnp.asarray(step, jnp.float32)
        if cfg.schedule == "constant":
            main = jnp.asarray(lr, jnp.float32)
        else:
            if spe > 0:
                epochs = max((total - warm) // spe, 1)
                t = jnp.floor(jnp.maximum(step - warm, 0) / spe) / epochs
            else:
                t = jnp.maximum(step - warm, 0) / max(total - warm, 1)
            main = lr * 0.5 * (1.0 + jnp.cos(jnp.pi * jnp.clip(t, 0.0, 1.0)))
        if warm > 0:
            main = jnp.where(step < warm, lr * step / warm, main)
        return main

    return schedule


def make_optimizer(cfg: TrainConfig) -> tuple[optax.GradientTransformation, Callable]:
    """(optax transformation, schedule). Adam as PyTorch's (eps outside the sqrt)."""
    schedule = make_schedule(cfg)
    if cfg.optimizer == "adamw":
        opt = optax.adamw(schedule, b1=cfg.b1, b2=cfg.b2, eps=cfg.eps, weight_decay=cfg.weight_decay,
                          mask=lambda params: _decay_mask(params))
    else:
        opt = optax.adam(schedule, b1=cfg.b1, b2=cfg.b2, eps=cfg.eps)
    if cfg.grad_clip > 0:
        opt = optax.chain(optax.clip_by_global_norm(cfg.grad_clip), opt)
    return opt, schedule


def _decay_mask(params):
    """Decay matrices only (not biases, norms or the position embedding), as timm/the original."""
    import jax

    def keep(path, x):
        name = jax.tree_util.keystr(path)
        return x.ndim > 1 and "pos_embed" not in name

    return jax.tree_util.tree_map_with_path(keep, params)
