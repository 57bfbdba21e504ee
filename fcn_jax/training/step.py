"""The jit-compiled train step: loss, gradients, optimiser update.

State is ``(params, opt_state)`` as pytrees of global arrays sharded by the
rules in :mod:`fcn_jax.parallel.axes`; gradient reductions over ``data`` (and
over any axis a parameter is replicated on) are inserted by autodiff through
the model's ``shard_map``.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from fcn_jax.inference.rollout import rollout_states
from fcn_jax.normalize import normalize, precip_to_log
from fcn_jax.training.losses import rollout_loss, step_losses


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class TrainState:
    """Everything the optimiser carries from step to step."""

    params: Any  # nnx.State of the model's Params
    opt_state: Any
    step: jax.Array


def init_train_state(model, tx: optax.GradientTransformation) -> tuple[Any, TrainState]:
    """(graphdef, state) with the optimiser state laid out like the parameters.

    Call under ``jax.set_mesh(mesh)`` after :func:`fcn_jax.model.afnonet.shard_model`
    so that mu/nu inherit the parameter shardings.
    """
    graphdef, params = nnx.split(model, nnx.Param)
    opt_state = init_opt_state(tx, params)
    return graphdef, TrainState(params=params, opt_state=opt_state, step=jnp.zeros((), jnp.int32))


def opt_state_shardings(tx: optax.GradientTransformation, params):
    """Shardings of ``tx.init(params)``: per-parameter subtrees (mu, nu, ...) get the parameters' shardings.

    Every subtree of the optimiser state with the parameters' tree structure gets
    the parameters' shardings; other leaves (step counts, scalars) are replicated.
    ``params``: arrays or sharded ``jax.ShapeDtypeStruct``s (an abstract state,
    :func:`fcn_jax.perfmodel.compiler.abstract_train_inputs`); nothing is computed.
    """
    from jax.sharding import NamedSharding, PartitionSpec

    param_def = jax.tree.structure(params)
    param_shardings = jax.tree.map(lambda p: p.sharding, params)
    first = jax.tree.leaves(params)[0]
    replicated = NamedSharding(first.sharding.mesh, PartitionSpec()) if hasattr(first.sharding, "mesh") else first.sharding

    def is_param_tree(node):
        return jax.tree.structure(node) == param_def

    abstract = jax.eval_shape(tx.init, params)
    return jax.tree.map(lambda node: param_shardings if is_param_tree(node) else replicated, abstract,
                        is_leaf=is_param_tree)


def init_opt_state(tx: optax.GradientTransformation, params):
    """Optimiser state laid out by :func:`opt_state_shardings`.

    ``jit(tx.init)`` on an Auto mesh would return *replicated* moments; the
    moments of a sharded parameter are sharded like it instead.
    """
    return jax.jit(tx.init, out_shardings=opt_state_shardings(tx, params))(params)


def make_loss_fn(graphdef, loss_weights=None, mode: str = "pretrain", precip_eps: float = 1e-5,
                 frozen=None) -> Callable:
    """``loss_fn(params, batch) -> (loss, per-step losses)`` on normalised batches.

    batch["fields"]: [batch, k+1, lat, lon, channel] normalised states.
    Pre-training / fine-tuning: k-step autoregressive relative L2.
    Precipitation: the frozen backbone rolls x_t out to x_{t+1} .. x_{t+k} (no
    gradient; k = 1 is the original's recipe), PrecipNet maps each predicted state
    to log1p(tp/eps), compared with batch["tp"]: [batch, k, lat, lon, 1] in metres
    (the 6 h accumulations ending at t+1 .. t+k); the loss is the weighted sum of
    the per-lead relative L2 (default weights 1/k: the mean). Its loss takes the frozen
    parameters as an optional third argument, ``loss_fn(params, batch,
    frozen_params)``: pass them under ``jit`` rather than closing over them --
    a closed-over array becomes a compile-time constant (the whole published
    backbone baked into the program) and one sharded over several processes'
    devices cannot be closed over at all. Without it the
    weights of ``frozen`` are used.
    """
    if mode == "precip":
        if frozen is None:
            raise ValueError("precipitation training needs the frozen backbone")
        fgraph, fparams_default = nnx.split(frozen, nnx.Param)

        def precip_loss(params, batch, fparams=None):
            wind = nnx.merge(fgraph, fparams_default if fparams is None else fparams)
            loss, per_step, _ = precip_forward(nnx.merge(graphdef, params), wind, batch, precip_eps, loss_weights)
            return loss, per_step

        return precip_loss

    def loss_fn(params, batch):
        model = nnx.merge(graphdef, params)
        return rollout_loss(model, batch["fields"], loss_weights)

    return loss_fn


def precip_forward(model, wind, batch: dict, eps: float, weights: Sequence[float] | None = None):
    """(loss, per-lead losses [k], prediction log1p(tp/eps) [batch, k, lat, lon, 1]) of PrecipNet.

    The frozen wind model rolls the normalised ``batch["fields"][:, 0]`` out k
    steps (no gradient), k = ``batch["tp"].shape[1]``; PrecipNet maps every
    predicted state to log1p(tp/eps), compared with log1p(batch["tp"]/eps) by
    relative L2 per lead. Training at the leads PrecipNet is used at in a
    forecast (k > 1) lets it learn what a k-step backbone state can tell about
    the rain; k = 1 is the original's recipe. ``weights``: one per lead
    (default 1/k each, the mean, so the loss's scale does not depend on k).
    """
    tp = batch["tp"]  # tp: [batch, k, lat, lon, 1], metres
    n, k = tp.shape[:2]
    states = jax.lax.stop_gradient(rollout_states(wind, batch["fields"][:, 0], k))  # [batch, k, lat, lon, C]
    # the leads fold into the batch (batch-major, so the data sharding of the batch carries over)
    pred = model(states.reshape(n * k, *states.shape[2:]))  # [batch * k, lat, lon, 1]
    pred = pred.reshape(n, k, *pred.shape[1:])
    loss, per_step = step_losses(pred, precip_to_log(tp, eps), weights or (1.0 / k,) * k)
    return loss, per_step, pred


def normalize_batch(batch: dict, norm) -> dict:
    """z-score the ``fields`` of a raw batch on the device: (x - mean_c) / std_c."""
    if norm is None:
        return batch
    mean, std = norm
    out = dict(batch)
    out["fields"] = normalize(batch["fields"].astype(jnp.float32), mean, std)
    return out


def make_train_step(graphdef, tx: optax.GradientTransformation, loss_weights=None, donate: bool = True,
                    mode: str = "pretrain", precip_eps: float = 1e-5, frozen=None, norm=None):
    """``step(state, batch) -> (state, metrics)``, jit-compiled with the state donated.

    batch: ``{"fields": [batch, k+1, lat, lon, channel]}`` sharded
    :data:`fcn_jax.parallel.axes.WINDOW_SPEC` (raw physical values when
    ``norm=(mean, std)`` is given, else normalised), plus ``"tp"`` for precipitation.
    A bare array is taken as ``fields``.
    """
    loss_fn = make_loss_fn(graphdef, loss_weights, mode=mode, precip_eps=precip_eps, frozen=frozen)
    precip = mode == "precip"

    def step(state: TrainState, batch, frozen_params=None):
        if not isinstance(batch, dict):
            batch = {"fields": batch}
        batch = normalize_batch(batch, norm)
        extra = (frozen_params,) if precip else ()
        (loss, per_step), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params, batch, *extra)
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        metrics = {"loss": loss, "loss_per_step": per_step, "grad_norm": optax.tree.norm(grads)}
        return TrainState(params=params, opt_state=opt_state, step=state.step + 1), metrics

    jitted = jax.jit(step, donate_argnums=(0,) if donate else ())
    if not precip:
        return jitted
    # The frozen backbone's weights enter as an argument (see make_loss_fn), never donated.
    fparams = nnx.split(frozen, nnx.Param)[1]

    def precip_step(state: TrainState, batch):
        return jitted(state, batch, fparams)

    return precip_step
