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

Each tick's stage computation is re-materialised (``jax.checkpoint``, as in
GPipe): the backward pass keeps one stage input per tick and recomputes that
tick's ``depth/S`` blocks, so a device holds the activations of ``depth/S``
blocks of one microbatch at a time -- the activation saving of pipelining --
for one extra forward pass of the blocks.

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
    "gpipe_time",
    "is_stacked",
    "local_layers",
    "pipeline_blocks",
    "restore_plan",
    "stack_blocks",
    "stack_model",
    "stage_transfer_bytes",
    "unstack_blocks",
    "unstack_model",
]


# --------------------------------------------------------------------------- #
# Per-block trees <-> stacked trees
# --------------------------------------------------------------------------- #


def is_stacked(blocks: Any) -> bool:
    """True for a stacked block tree, False for the canonical ``{0: block, 1: block, ...}``."""
    return not (isinstance(blocks, dict) and all(isinstance(k, int) for k in blocks))


def stack_blocks(blocks: Any) -> Any:
    """``{i: block tree}`` -> one block tree whose leaves have a leading ``[depth]`` layer axis."""
    if is_stacked(blocks):
        return blocks
    layers = [blocks[i] for i in range(len(blocks))]
    return jax.tree.map(lambda *xs: jnp.stack(xs), *layers)


def unstack_blocks(stacked: Any, depth: int) -> dict:
    """Inverse of :func:`stack_blocks`: ``{i: block tree}`` of the ``depth`` layers."""
    return {i: jax.tree.map(lambda a, i=i: a[i], stacked) for i in range(depth)}


def local_layers(blocks: Any, sizes: MeshSizes) -> Any:
    """This stage's blocks, stacked: every leaf ``[depth/S, ...]`` (inside the ``shard_map``).

    Stacked parameters (sharded over ``stage``, logical axis ``layers``) are
    already local. Canonical per-block parameters are replicated over
    ``stage``: every device holds all of them, stacks them locally and takes
    its stage's run of consecutive blocks -- no communication forward; autodiff
    sums each block's gradient over ``stage`` (only its owner's is non-zero),
    which is what keeps such parameters replicated.
    """
    if is_stacked(blocks):
        return blocks
    stacked = stack_blocks(blocks)
    if sizes.stage == 1:
        return stacked
    depth = len(blocks)
    per_stage = depth // sizes.stage
    start = lax.axis_index(STAGE) * per_stage
    return jax.tree.map(lambda a: lax.dynamic_slice_in_dim(a, start, per_stage, axis=0), stacked)


def _blocks_owner(model):
    """The module that owns ``blocks``: the AFNONet itself or PrecipNet's backbone."""
    return model.backbone if hasattr(model, "backbone") else model


def _is_var(v) -> bool:
    from flax import nnx

    return isinstance(v, nnx.Variable)


def stack_model(model):
    """Replace the model's per-block modules by one block module with stacked Params (in place).

    Every block Param ``[...]`` with logical axes ``names`` becomes one
    ``[depth, ...]`` Param with logical axes ``('layers', *names)``, which the
    sharding rules split over ``stage``: on a pipelined mesh each stage's
    devices then store (and optimise) only their ``depth/S`` blocks. The
    forward pass is the same function (:func:`pipeline_blocks`; on a mesh
    without ``stage``, a ``lax.scan`` over the layers). Returns the model.
    """
    from flax import nnx

    owner = _blocks_owner(model)
    blocks = owner.blocks
    if not isinstance(blocks, nnx.List):
        return model  # already stacked
    if len(blocks) == 0:
        raise ValueError("a model without blocks (depth 0) has nothing to stack")
    graphdef, _ = nnx.split(blocks[0])
    states = [nnx.split(b)[1] for b in blocks]
    stacked = jax.tree.map(
        lambda *vs: vs[0].replace(value=jnp.stack([v[...] for v in vs]),
                                  logical_axes=("layers", *vs[0].get_metadata()["logical_axes"])),
        *states, is_leaf=_is_var,
    )
    owner.blocks = nnx.merge(graphdef, stacked)
    return model


def unstack_model(model):
    """Inverse of :func:`stack_model` (in place): the canonical ``nnx.List`` of blocks. Returns the model."""
    from flax import nnx

    owner = _blocks_owner(model)
    if isinstance(owner.blocks, nnx.List):
        return model
    graphdef, state = nnx.split(owner.blocks)
    depth = jax.tree.leaves(state)[0].shape[0]
    layers = []
    for i in range(depth):
        layer = jax.tree.map(
            lambda v, i=i: v.replace(value=v[...][i], logical_axes=tuple(v.get_metadata()["logical_axes"][1:])),
            state, is_leaf=_is_var,
        )
        layers.append(nnx.merge(graphdef, layer))
    owner.blocks = nnx.List(layers)
    return model


# --------------------------------------------------------------------------- #
# The schedule (inside the fully manual shard_map)
# --------------------------------------------------------------------------- #


def _run_layers(block_fn: Callable, layers: Any, h):
    """Apply stacked layers in order: ``lax.scan`` over their leading axis."""
    return lax.scan(lambda hh, layer: (block_fn(layer, hh), None), h, layers)[0]


def pipeline_blocks(block_fn: Callable, blocks: Any, t, sizes: MeshSizes):
    """Run the blocks over ``sizes.stage`` stages with ``sizes.microbatches`` microbatches (GPipe).

    Local shards inside the model's ``shard_map``:
      block_fn(layer_params, h) -> h   one AFNO block, h: [mb, lat/Ph, lon/Pw, embed/Pc]
      blocks: canonical ``{i: block}`` (replicated over ``stage``) or stacked,
         every leaf [depth/S, ...] (sharded over ``stage``): see :func:`local_layers`
      t: [b, lat/Ph, lon/Pw, embed/Pc]  embedded tokens of the local batch (b = batch/Pd),
         computed on every stage; only stage 0's are used.
    Returns the blocks' output tokens [b, lat/Ph, lon/Pw, embed/Pc] on the last
    stage and exact zeros on every other stage. With one stage: a plain scan
    over the stacked blocks.
    """
    layers = local_layers(blocks, sizes)
    n_stages, n_micro = sizes.stage, sizes.microbatches
    if n_stages == 1:
        return _run_layers(block_fn, layers, t)
    b = t.shape[0]
    if b % n_micro:
        raise ValueError(f"{n_micro} microbatches do not divide the local batch of {b} samples")
    mb = b // n_micro
    xs = t.reshape(n_micro, mb, *t.shape[1:])  # [M, mb, lat/Ph, lon/Pw, embed/Pc]
    stage = lax.axis_index(STAGE)
    first, last = stage == 0, stage == n_stages - 1
    forward = [(s, s + 1) for s in range(n_stages - 1)]  # stage s -> s+1; stage 0 receives zeros

    # GPipe's re-materialisation: a tick keeps only its stage input for the backward pass and
    # recomputes its depth/S blocks there. Without it every tick -- bubble ticks included --
    # would keep all its blocks' activations, (M+S-1)/S times those of the whole unpipelined
    # model per microbatch: no activation memory saved at all (measured: 0.1 deg/p4/24 layers,
    # (1,2,2,2) x 2 stages, batch 1: 147 GB per device against 104 GB unpipelined on 8).
    run_stage = jax.checkpoint(lambda lay, h: _run_layers(block_fn, lay, h))

    def tick(carry, i):
        received, outs = carry
        mine = lax.dynamic_index_in_dim(xs, jnp.minimum(i, n_micro - 1), 0, keepdims=False)
        h = run_stage(layers, jnp.where(first, mine, received))
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


# --------------------------------------------------------------------------- #
# Cost terms for the performance model
# --------------------------------------------------------------------------- #


def gpipe_time(stage_time_per_sample: float, local_batch: int, stages: int, microbatches: int,
               transfer_time: float = 0.0) -> float:
    """Predicted time of the pipelined blocks, forward + backward (GPipe).

    ``stage_time_per_sample``: one stage's ``depth/S`` blocks, forward + backward,
    for one sample; ``transfer_time``: one tick's ``ppermute`` (forward + backward).
    Every stage works for all ``M+S-1`` ticks of a microbatch of ``b/M`` samples,
    so the unpipelined ``b * stage_time`` grows by ``(M+S-1)/M`` -- the bubble.
    """
    return (microbatches + stages - 1) * (stage_time_per_sample * local_batch / microbatches + transfer_time)


def stage_transfer_bytes(model_cfg, sizes: MeshSizes, local_batch: int, itemsize: int = 4) -> int:
    """Bytes one device sends over ``stage`` per tick, forward (the backward sends as many).

    One microbatch's local tokens: ``[b/M, lat/Ph, lon/Pw, embed/Pc]``.
    """
    lat, lon = model_cfg.token_grid
    mb = local_batch // sizes.microbatches
    return mb * (lat // sizes.height) * (lon // sizes.width) * (model_cfg.embed_dim // sizes.channel) * itemsize


# --------------------------------------------------------------------------- #
# Checkpoints across stage counts: per-block <-> stacked trees by path
# --------------------------------------------------------------------------- #


def _key_str(k) -> str:
    for attr in ("key", "name", "idx"):
        if hasattr(k, attr):
            return str(getattr(k, attr))
    return str(k)


def _norm_path(path) -> tuple[str, ...]:
    return tuple(_key_str(k) for k in path)


def _split_blocks(path: tuple[str, ...]):
    """(prefix up to and including 'blocks', layer index or None, rest) or None without 'blocks'."""
    if "blocks" not in path:
        return None
    i = path.index("blocks")
    nxt = path[i + 1] if i + 1 < len(path) else ""
    if nxt.isdigit():
        return path[: i + 1], int(nxt), path[i + 2:]
    return path[: i + 1], None, path[i + 1:]


def restore_plan(saved_paths, target_abstract):
    """How to read a checkpoint whose blocks are stacked/per-block into a target of the other kind.

    ``saved_paths``: normalized paths (tuples of str) of the saved leaves;
    ``target_abstract``: the restore target (leaves: ShapeDtypeStruct with a
    NamedSharding). Returns None when the trees agree (an ordinary restore), else
    ``(read, build)``: ``read`` maps each saved path to the sharding to read it
    with on the target's mesh (a block's layer axis is never split there: stacked
    leaves read ``P(None, *spec)``, per-block leaves ``P(*spec[1:])``), and
    ``build(arrays_by_saved_path)`` returns the target tree.
    """
    from jax.sharding import NamedSharding

    leaves, treedef = jax.tree_util.tree_flatten_with_path(target_abstract)
    targets = [(_norm_path(p), leaf) for p, leaf in leaves]
    saved = set(saved_paths)
    if {p for p, _ in targets} == saved:
        return None
    depth_saved = 1 + max((s[1] for s in map(_split_blocks, saved) if s and s[1] is not None), default=-1)
    read, recipe = {}, []
    for path, leaf in targets:
        sharding = leaf.sharding
        split = _split_blocks(path)
        if path in saved or split is None:
            read[path] = sharding
            recipe.append(("same", path, sharding))
            continue
        prefix, layer, rest = split
        if layer is not None:  # target per-block, saved stacked
            src = prefix + rest
            if src not in saved:
                raise KeyError(f"checkpoint has no leaf {'/'.join(src)} for {'/'.join(path)}")
            read[src] = NamedSharding(sharding.mesh, P(None, *sharding.spec))
            recipe.append(("index", (src, layer), sharding))
        else:  # target stacked, saved per-block
            srcs = [prefix + (str(i),) + rest for i in range(depth_saved)]
            missing = [s for s in srcs if s not in saved]
            if not srcs or missing:
                raise KeyError(f"checkpoint has no per-block leaves for {'/'.join(path)}")
            spec = tuple(sharding.spec) + (None,) * (len(leaf.shape) - len(sharding.spec))
            for s in srcs:
                read[s] = NamedSharding(sharding.mesh, P(*spec[1:]))
            recipe.append(("stack", srcs, sharding))
    unused = saved - set(read)
    if unused:
        raise KeyError(f"checkpoint leaves not in the target: {sorted('/'.join(p) for p in unused)[:5]}")

    def build(arrays):
        moved = [(n, kind, src) for n, (kind, src, _) in enumerate(recipe) if kind != "same"]

        def convert(arrs):  # one program for every stacked / indexed leaf
            return [arrs[src[0]][src[1]] if kind == "index" else jnp.stack([arrs[s] for s in src])
                    for _, kind, src in moved]

        needed = {}
        for _, kind, src in moved:
            for s in ([src[0]] if kind == "index" else src):
                needed[s] = arrays[s]
        converted = jax.jit(convert, out_shardings=[recipe[n][2] for n, _, _ in moved])(needed)
        out = [arrays[src] if kind == "same" else None for kind, src, _ in recipe]
        for (n, _, _), value in zip(moved, converted):
            out[n] = value
        return jax.tree_util.tree_unflatten(treedef, out)

    return read, build
