"""The one autoregressive rollout of fcn_jax (training loss, validation, forecasts, ensembles).

Layout: batch first, then lead -- ``[batch, lead, lat, lon, channel]``, in
normalised units. Each step feeds the model its own previous output, with no
clipping or re-normalisation, exactly as the original.

* :func:`rollout_states` -- the k states after the initial one,
  ``[batch, k, lat, lon, channel]`` (``x_{t+1} .. x_{t+k}``): a ``lax.scan``,
  differentiable, called inside an already traced function (the training loss
  and validation);
* :func:`rollout` -- a forecast ``[batch, steps+1, lat, lon, channel]`` with
  the IC at lead 0 (the original's ``prediction_length = steps + 1``), one
  ``jax.jit`` compiled once per (model structure, shapes, steps, mesh): the
  model is split into a static graph and a state pytree (``nnx.split``) and
  rebuilt in the trace (``nnx.merge``);
* :func:`perturb` / :func:`ensemble_rollout` -- IC-perturbation ensembles
  (the original's ``inference_ensemble.py``), ``[batch, steps+1, member, lat,
  lon, channel]``, the member axis where the forecast file has it.

Under ``jax.set_mesh(mesh)`` the model runs its sharded forward pass; shard
``x0`` as ``P('data', 'height', 'width', None)`` and the model with
:func:`fcn_jax.model.afnonet.shard_model`. Ensemble members are folded into
the batch (batch-major, ``[batch * member]``) so they shard over ``data``.
"""

from __future__ import annotations

from typing import Literal, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from fcn_jax.inference import perturbations
from fcn_jax.inference.perturbations import SphericalBasis
from fcn_jax.parallel.axes import IMAGE_SPEC
from fcn_jax.parallel.mesh import current_mesh

__all__ = ["rollout_states", "rollout", "perturb", "ensemble_rollout", "ensemble_chunk", "bred_chunk",
           "ensemble_continue"]


def rollout_states(model, x0, k: int):
    """States ``x_{t+1} .. x_{t+k}`` ``[batch, k, lat, lon, channel]`` from ``x0 [batch, lat, lon, channel]``.

    A ``lax.scan`` over the steps (traced once however large k); gradients
    flow through every application. Call it inside a traced function with a
    merged model (the training loss), or use :func:`rollout` from Python.
    """
    if k < 1:
        raise ValueError(f"a rollout needs k >= 1 steps, got {k}")

    def step(x, _):
        y = model(x).astype(jnp.float32)
        return y, y

    _, ys = jax.lax.scan(step, x0.astype(jnp.float32), None, length=k)  # [k, batch, lat, lon, ch]
    return jnp.swapaxes(ys, 0, 1)


def _forecast(graphdef, state, x0, steps):
    x0 = x0.astype(jnp.float32)
    if steps == 0:
        return x0[:, None]
    ys = rollout_states(nnx.merge(graphdef, state), x0, steps)
    return jnp.concatenate([x0[:, None], ys], axis=1)  # [batch, steps+1, ...]


_forecast_jit = jax.jit(_forecast, static_argnums=(0, 3))


def rollout(model: nnx.Module, x0, steps: int):
    """Forecast ``[batch, steps+1, lat, lon, channel]``; lead 0 is ``x0`` itself.

    Args:
      model: an ``AFNONet`` (``model(x)`` maps ``[batch, lat, lon, channel]``
        to the same shape).
      x0: initial conditions ``[batch, lat, lon, channel]``, normalised.
      steps: model steps (40 = 10 days at 6 h).
    """
    if steps < 0:
        raise ValueError(f"steps must be >= 0, got {steps}")
    graphdef, state = nnx.split(model)
    return _forecast_jit(graphdef, state, jnp.asarray(x0, jnp.float32), int(steps))


def perturb(x0, std: float, key, members: int | Sequence[int], basis: SphericalBasis | None = None):
    """Perturbed ICs ``[batch, member, lat, lon, channel]`` from ``x0 [batch, lat, lon, channel]``.

    Member ``m`` is ``x0 + std * noise`` drawn from ``fold_in(key, m)``: white
    ``N(0, 1)`` (i.i.d. over batch, grid and channel), or with ``basis``
    spatially correlated unit-variance fields (:mod:`fcn_jax.inference.perturbations`).
    A member's noise depends only on ``(key, m)``, so chunking the ensemble does
    not change it. ``members``: a count or explicit member indices.
    """
    ids = np.arange(members) if np.ndim(members) == 0 else np.asarray(members)
    return _perturb(jnp.asarray(x0, jnp.float32), jnp.float32(std), key, jnp.asarray(ids, jnp.uint32), basis)


@jax.jit
def _perturb(x0, std, key, ids, basis=None):
    keys = jax.vmap(lambda i: jax.random.fold_in(key, i))(ids)
    noise = jax.vmap(lambda k: perturbations.noise(k, x0.shape, basis))(keys)  # [m, b, ...]
    return jnp.swapaxes(x0[None] + std * noise, 0, 1)  # [b, m, ...]


def _bred(graphdef, state, window, std, key, ids, basis, weights):
    """Bred perturbed ICs ``[1, m, ...]`` from analyses ``window [cycles + 1, lat, lon, ch]`` (normalised, last = t)."""
    model = nnx.merge(graphdef, state)
    cycles = window.shape[0] - 1
    d = std * jnp.swapaxes(_perturb(jnp.zeros_like(window[:1]), 1.0, key, ids, basis), 0, 1)[:, 0]  # [m, ...]
    for c in range(cycles):  # the perturbation grows along the model's own error directions
        # the control at the members' batch size: a batch of 1 would not divide over a 'data' axis
        base = jnp.broadcast_to(window[c][None], d.shape)  # [m, lat, lon, ch]
        if current_mesh() is not None:
            base, d = (jax.lax.with_sharding_constraint(v, IMAGE_SPEC) for v in (base, d))
        grown = model(base + d) - model(base)
        d = perturbations.rescale(grown, std, weights)
    return (window[-1][None] + d)[None]  # [1, m, lat, lon, ch]


def _ensemble_from(graphdef, state, xp, steps):
    """Roll out members ``xp [b, m, lat, lon, ch]`` (normalised) -> ``[b, steps+1, m, ...]``."""
    b, m = xp.shape[:2]
    flat = xp.reshape((b * m,) + xp.shape[2:])  # batch-major: a 'data'-sharded batch stays contiguous
    if current_mesh() is not None:  # members shard over 'data' even when the IC batch is 1
        flat = jax.lax.with_sharding_constraint(flat, IMAGE_SPEC)
    out = _forecast(graphdef, state, flat, steps)  # [b*m, steps+1, ...]
    out = out.reshape((b, m, steps + 1) + out.shape[2:])
    return jnp.swapaxes(out, 1, 2)  # [b, steps+1, m, ...]


def _ensemble_chunk(graphdef, state, x0, std, key, ids, steps, basis=None):
    return _ensemble_from(graphdef, state, _perturb(x0, std, key, ids, basis), steps)  # perturbed: [b, m, ...]


_ensemble_chunk_jit = jax.jit(_ensemble_chunk, static_argnums=(0, 6))


def _bred_chunk(graphdef, state, window, std, key, ids, steps, basis, weights):
    return _ensemble_from(graphdef, state, _bred(graphdef, state, window, std, key, ids, basis, weights), steps)


_bred_chunk_jit = jax.jit(_bred_chunk, static_argnums=(0, 6))
def _ensemble_continue(graphdef, state, ens, steps):
    return _ensemble_from(graphdef, state, ens[:, -1], steps)  # inside jit: also for multi-host arrays


_ensemble_continue_jit = jax.jit(_ensemble_continue, static_argnums=(0, 3))


def ensemble_continue(model_split, ens, steps: int):
    """Continue an ensemble chunk ``ens [batch, lead, member, ...]`` from its last lead by ``steps`` steps.

    Returns ``[batch, steps+1, member, ...]`` whose lead 0 is ``ens``'s last:
    a long ensemble forecast in lead segments (memory for one segment).
    """
    graphdef, state = model_split
    return _ensemble_continue_jit(graphdef, state, ens, int(steps))


def ensemble_chunk(model_split, x0, std, key, member_ids, steps: int, basis: SphericalBasis | None = None):
    """One compiled ensemble chunk ``[batch, steps+1, len(member_ids), lat, lon, channel]``.

    ``model_split``: ``nnx.split(model)`` (split once, reuse for every chunk).
    Chunks of the same size reuse one executable. ``basis``: spatially
    correlated noise instead of white (:func:`perturb`).
    """
    graphdef, state = model_split
    return _ensemble_chunk_jit(graphdef, state, jnp.asarray(x0, jnp.float32), jnp.float32(std), key,
                               jnp.asarray(member_ids, jnp.uint32), int(steps), basis)


def bred_chunk(model_split, window, std, key, member_ids, steps: int, basis: SphericalBasis | None, lat):
    """An ensemble chunk from bred vectors: ``[1, steps+1, len(member_ids), lat, lon, channel]``.

    ``window [cycles + 1, lat, lon, channel]``: normalised analyses every
    step up to the initial time (the last). Each member's noise (``basis``:
    spherical, else white) enters ``cycles`` steps early and is grown by the
    model and scaled back to ``std`` every step (area-weighted by ``cos(lat)``)
    -- :mod:`fcn_jax.inference.perturbations`.
    """
    graphdef, state = model_split
    weights = jnp.asarray(np.cos(np.deg2rad(np.asarray(lat, np.float64))), jnp.float32)
    return _bred_chunk_jit(graphdef, state, jnp.asarray(window, jnp.float32), jnp.float32(std), key,
                           jnp.asarray(member_ids, jnp.uint32), int(steps), basis, weights)


def ensemble_rollout(model: nnx.Module, x0, steps: int, members: int, std: float = 0.3, key=None, *,
                     member_chunk: int | None = None, reduce: Literal[None, "mean"] = None):
    """Ensemble forecast from Gaussian-perturbed ICs, ``[batch, steps+1, member, lat, lon, channel]``.

    The original's perturbation experiment (model spec §15.2): i.i.d.
    ``std * N(0, 1)`` (``n_level``, 0.3 by default) added to every channel and
    grid point of the **normalised** IC, fresh per member, none during the
    rollout. ``member_chunk`` members run per compiled call (bounds memory;
    the result does not depend on it). ``reduce="mean"`` returns only the
    ensemble mean ``[batch, steps+1, lat, lon, channel]``, accumulated chunk by
    chunk.
    """
    if members < 1:
        raise ValueError(f"members must be >= 1, got {members}")
    if reduce not in (None, "mean"):
        raise ValueError(f"reduce must be None or 'mean', got {reduce!r}")
    key = jax.random.key(0) if key is None else key
    chunk = members if member_chunk is None else max(1, min(int(member_chunk), members))
    split = nnx.split(model)
    parts, total = [], None
    for start in range(0, members, chunk):
        out = ensemble_chunk(split, x0, std, key, np.arange(start, min(start + chunk, members)), steps)
        if reduce == "mean":
            part = jnp.sum(out, axis=2)
            total = part if total is None else total + part
        else:
            parts.append(out)
    if reduce == "mean":
        return total / members
    return parts[0] if len(parts) == 1 else jnp.concatenate(parts, axis=2)
