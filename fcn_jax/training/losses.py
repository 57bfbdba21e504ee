"""Losses on global (possibly sharded) arrays.

These run outside ``shard_map``: plain ``jnp`` reductions over a sharded
``[batch@data, lat@height, lon@width, channel]`` array are partitioned by XLA
into local sums plus all-reduces over the axes that split the summed
dimensions, so no hand-written collectives are needed here. All reductions
are float32.
"""

from __future__ import annotations

from typing import Sequence

import jax.numpy as jnp

from fcn_jax.inference.rollout import rollout_states


def relative_l2(pred, target):
    """FourCastNet's loss (model spec §14.2): mean over samples of ||pred-y||_2 / ||y||_2.

    pred, target: [batch, lat, lon, channel]; norms over all channels and pixels
    of each sample, no latitude or channel weighting.
    """
    pred = pred.astype(jnp.float32)
    target = target.astype(jnp.float32)
    axes = tuple(range(1, pred.ndim))
    num = jnp.sqrt(jnp.sum((pred - target) ** 2, axis=axes))
    den = jnp.sqrt(jnp.sum(target**2, axis=axes))
    return jnp.mean(num / den)


def rollout(model, x0, k: int):
    """States x_{t+1} ... x_{t+k} of a k-step autoregressive rollout, [batch, k, lat, lon, channel].

    The shared scan rollout of :mod:`fcn_jax.inference.rollout` (same layout as forecasts).
    """
    return rollout_states(model, x0, k)


def step_losses(preds, targets, weights: Sequence[float] | None = None):
    """(weighted total, per-step relative L2 [k]) of preds/targets [batch, k, lat, lon, channel]."""
    k = preds.shape[1]
    weights = tuple(weights) if weights else (1.0,) * k
    if len(weights) != k:
        raise ValueError(f"{len(weights)} loss weights for a {k}-step rollout")
    per_step = jnp.stack([relative_l2(preds[:, i], targets[:, i]) for i in range(k)])
    return jnp.sum(per_step * jnp.asarray(weights, jnp.float32)), per_step


def rollout_loss(model, window, weights: Sequence[float] | None = None):
    """k-step autoregressive loss with gradients through every application.

    window: [batch, k+1, lat, lon, channel] normalised states x_t ... x_{t+k}.
    Returns (total, per-step losses [k]). k = 1 is pre-training; k = 2 with
    equal weights is the original's fine-tuning (L1 + L2).
    """
    preds = rollout(model, window[:, 0], window.shape[1] - 1)
    return step_losses(preds, window[:, 1:], weights)
