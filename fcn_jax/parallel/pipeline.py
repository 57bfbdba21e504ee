"""Layer pipelining over the ``stage`` mesh axis: a GPipe schedule inside the model's ``shard_map``.

With ``mesh.stage = S > 1`` the mesh is ``(stage, data, channel, height, width)``
and the model's ``depth`` AFNO blocks are split into ``S`` runs of ``depth/S``
consecutive blocks: stage ``s`` runs blocks ``[s*depth/S, (s+1)*depth/S)``. The
blocks' parameters are stacked along a leading *layer* axis sharded over
``stage`` (logical name ``layers``), so each stage's devices hold, and
differentiate, only their own blocks.

Everything runs in the model's one fully manual ``shard_map`` (over all five
axes), so the per-block code -- LayerNorm over ``channel``, the spectral
filter's all-to-alls over ``height``/``width``, the Megatron MLP -- is reused
unchanged (:func:`fcn_jax.model.afnonet._block_local`); only the loop over the
blocks is replaced by the schedule below.

Schedule (GPipe, forward; autodiff runs it backwards)::

    tick i = 0 .. M+S-2:
      stage 0 takes microbatch i (its own patch embedding; i >= M: a discarded copy),
      stage s > 0 takes what stage s-1 produced at tick i-1 (``ppermute`` over ``stage``);
      every stage applies its depth/S blocks (``lax.scan`` over the stacked layers);
      the last stage keeps its result as microbatch i-(S-1) of the output.

``M`` microbatches split each data shard's local batch (``train.microbatches``;
default one sample each). Every stage computes every tick, so ``S-1`` of the
``M+S-1`` ticks are idle work per stage: the bubble fraction
``(S-1)/(M+S-1)`` (:func:`fcn_jax.parallel.mesh.bubble_fraction`). The patch
embedding and the head are replicated over ``stage``: every stage embeds (only
stage 0's is used) and every stage applies the head to its output buffer,
which is zero except on the last stage, so the head's ``psum`` over
``channel`` extended to ``stage`` delivers the last stage's output to all
stages in the same all-reduce. Numerics are the unpipelined model's: each
sample sees the same operations in the same order.

Checkpoints keep the model's canonical per-block parameters (global arrays,
one tree entry per block): :func:`stack_blocks` builds the stacked view inside
the jitted program, so a checkpoint restores onto any mesh and stage count.
"""

from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp
from jax import lax
from jax.sharding import PartitionSpec as P

from fcn_jax.parallel.axes import STAGE
from fcn_jax.parallel.mesh import MeshSizes, bubble_fraction

__all__ = [
    "bubble_fraction",
    "is_stacked",
    "pipeline_blocks",
    "stack_blocks",
    "stack_param_specs",
    "stack_param_values",
    "unstack_blocks",
]


# --------------------------------------------------------------------------- #
# Per-block trees <-> stacked trees
# --------------------------------------------------------------------------- #


def is_stacked(blocks: Any) -> bool:
    """True for a stacked block tree, False for the canonical ``{0: block, 1: block, ...}``."""
    return not (isinstance(blocks, dict) and blocks and all(isinstance(k, int) for k in blocks))


def stack_blocks(blocks: dict) -> Any:
    """``{i: block tree}`` -> one block tree whose leaves have a leading ``[depth]`` layer axis."""
    if is_stacked(blocks):
        return blocks
    layers = [blocks[i] for i in range(len(blocks))]
    return jax.tree.map(lambda *xs: jnp.stack(xs), *layers)


def unstack_blocks(stacked: Any, depth: int) -> dict:
    """Inverse of :func:`stack_blocks`: ``{i: block tree}`` of the ``depth`` layers."""
    return {i: jax.tree.map(lambda a, i=i: a[i], stacked) for i in range(depth)}


def _blocks_holder(tree: dict) -> dict:
    """The dict that holds ``blocks``: the model's top level, or PrecipNet's ``backbone``."""
    if "blocks" in tree:
        return tree
    if "backbone" in tree and "blocks" in tree["backbone"]:
        return tree["backbone"]
    raise KeyError(f"no 'blocks' in the parameter tree (keys {sorted(tree)})")


def _replace_blocks(tree: dict, fn: Callable[[Any], Any]) -> dict:
    out = dict(tree)
    if "blocks" in tree:
        out["blocks"] = fn(tree["blocks"])
    else:
        out["backbone"] = _replace_blocks(tree["backbone"], fn)
    return out


def stack_param_values(values: dict) -> dict:
    """The model's parameter values with ``blocks`` stacked (run under ``jit``: no copy kept)."""
    return _replace_blocks(values, stack_blocks)


def stack_param_specs(specs: dict) -> dict:
    """PartitionSpecs for :func:`stack_param_values`: ``P('stage', *spec of one block's leaf)``.

    Block ``i``'s parameters are replicated over ``stage`` in the canonical
    tree; stacked, their leading layer axis is split over ``stage``.
    """

    def stacked(blocks):
        if is_stacked(blocks):
            return blocks
        return jax.tree.map(lambda s: P(STAGE, *s), blocks[0], is_leaf=lambda s: isinstance(s, P))

    return _replace_blocks(specs, stacked)


# --------------------------------------------------------------------------- #
# The schedule (inside the fully manual shard_map)
# --------------------------------------------------------------------------- #


def pipeline_blocks(block_fn: Callable, blocks: Any, t, sizes: MeshSizes):
    """Run the stacked blocks over ``sizes.stage`` stages with ``sizes.microbatches`` microbatches (GPipe).

    Local shards inside the model's ``shard_map``:
      block_fn(layer_params, h) -> h   one AFNO block, h: [mb, lat/Ph, lon/Pw, embed/Pc]
      blocks: this stage's layers, every leaf [depth/S, ...] (stacked, sharded over ``stage``)
      t: [b, lat/Ph, lon/Pw, embed/Pc]  embedded tokens of the local batch (b = batch/Pd),
         computed on every stage; only stage 0's are used.
    Returns the blocks' output tokens [b, lat/Ph, lon/Pw, embed/Pc] on the last
    stage and exact zeros on every other stage.
    """
    n_stages, n_micro = sizes.stage, sizes.microbatches
    b = t.shape[0]
    if b % n_micro:
        raise ValueError(f"{n_micro} microbatches do not divide the local batch of {b} samples")
    mb = b // n_micro
    xs = t.reshape(n_micro, mb, *t.shape[1:])  # [M, mb, lat/Ph, lon/Pw, embed/Pc]
    stage = lax.axis_index(STAGE)
    first, last = stage == 0, stage == n_stages - 1
    forward = [(s, s + 1) for s in range(n_stages - 1)]  # stage s -> s+1; stage 0 receives zeros

    def run_stage(h):
        return lax.scan(lambda hh, layer: (block_fn(layer, hh), None), h, blocks)[0]

    def tick(carry, i):
        received, outs = carry
        mine = lax.dynamic_index_in_dim(xs, jnp.minimum(i, n_micro - 1), 0, keepdims=False)
        h = run_stage(jnp.where(first, mine, received))
        # the last stage finishes microbatch i-(S-1) at tick i
        j = i - (n_stages - 1)
        jc = jnp.clip(j, 0, n_micro - 1)
        done = jnp.logical_and(last, j >= 0)
        kept = lax.dynamic_index_in_dim(outs, jc, 0, keepdims=False)
        outs = lax.dynamic_update_index_in_dim(outs, jnp.where(done, h, kept), jc, 0)
        return (lax.ppermute(h, STAGE, forward), outs), None

    carry = (jnp.zeros_like(xs[0]), jnp.zeros_like(xs))
    (_, outs), _ = lax.scan(tick, carry, jnp.arange(n_micro + n_stages - 1))
    return outs.reshape(t.shape)
