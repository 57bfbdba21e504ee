"""The jit-compiled train step: loss, gradients, optimiser update.

State is ``(params, opt_state)`` as pytrees of global arrays sharded by the
rules in :mod:`fcn_jax.parallel.axes`; gradient reductions over ``data`` (and
over any axis a parameter is replicated on) are inserted by autodiff through
the model's ``shard_map``.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from fcn_jax.training.losses import rollout_loss


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


def init_opt_state(tx: optax.GradientTransformation, params):
    """Optimiser state whose per-parameter trees (mu, nu, ...) share the parameters' shardings.

    ``jit(tx.init)`` on an Auto mesh would return *replicated* moments. Instead,
    every subtree of the state with the parameters' tree structure gets the
    parameters' shardings; other leaves (step counts, scalars) are replicated.
    """
    from jax.sharding import NamedSharding, PartitionSpec

    param_def = jax.tree.structure(params)
    param_shardings = jax.tree.map(lambda p: p.sharding, params)
    first = jax.tree.leaves(params)[0]
    replicated = NamedSharding(first.sharding.mesh, PartitionSpec()) if hasattr(first.sharding, "mesh") else first.sharding

    def is_param_tree(node):
        return jax.tree.structure(node) == param_def

    abstract = jax.eval_shape(tx.init, params)
    out_shardings = jax.tree.map(
        lambda node: param_shardings if is_param_tree(node) else replicated, abstract, is_leaf=is_param_tree
    )
    return jax.jit(tx.init, out_shardings=out_shardings)(params)


def make_loss_fn(graphdef, loss_weights=None) -> Callable:
    def loss_fn(params, window):
        model = nnx.merge(graphdef, params)
        total, per_step = rollout_loss(model, window, loss_weights)
        return total, per_step

    return loss_fn


def make_train_step(graphdef, tx: optax.GradientTransformation, loss_weights=None, donate: bool = True):
    """``step(state, window) -> (state, metrics)``, jit-compiled with the state donated.

    window: [batch, k+1, lat, lon, channel] normalised, sharded
    ``P('data', None, 'height', 'width', None)``.
    """
    loss_fn = make_loss_fn(graphdef, loss_weights)

    def step(state: TrainState, window):
        (loss, per_step), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params, window)
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        metrics = {"loss": loss, "loss_per_step": per_step, "grad_norm": optax.tree.norm(grads)}
        return TrainState(params=params, opt_state=opt_state, step=state.step + 1), metrics

    return jax.jit(step, donate_argnums=(0,) if donate else ())
