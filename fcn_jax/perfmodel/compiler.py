"""What the compiler says: abstract compilation of the train step, for the performance model's check.

Nothing of the model's size is allocated: the train state and the batch are
sharded ``jax.ShapeDtypeStruct``s (``nnx.eval_shape`` / ``jax.eval_shape``),
the step is lowered and compiled, and the compiled program is read by
:mod:`fcn_jax.parallel.hlo` (``cost_analysis()`` per device after
partitioning, ``memory_analysis()``, collectives from the HLO text).
"""

from __future__ import annotations

import math
import time

from fcn_jax.parallel import hlo


def abstract_train_inputs(cfg, mesh, tx, global_batch: int, rollout: int = 1):
    """(graphdef, abstract TrainState, abstract window, parameter count); every leaf a sharded ShapeDtypeStruct.

    The model comes from ``nnx.eval_shape`` (its blocks stacked over ``stage`` on a
    pipelined mesh, as training stores them), parameter shardings from
    ``param_shardings``, the optimiser state's from
    :func:`fcn_jax.training.step.opt_state_shardings` (as ``init_opt_state``).
    """
    import jax
    import jax.numpy as jnp
    from flax import nnx
    from jax.sharding import NamedSharding
    from jax.sharding import PartitionSpec as P

    from fcn_jax.model.afnonet import AFNONet, count_params, param_shardings
    from fcn_jax.parallel.axes import STAGE, WINDOW_SPEC
    from fcn_jax.parallel.pipeline import stack_model
    from fcn_jax.training.step import TrainState, opt_state_shardings

    stacked = mesh.shape.get(STAGE, 1) > 1
    abstract_model = nnx.eval_shape(lambda: stack_model(AFNONet(cfg, seed=0)) if stacked else AFNONet(cfg, seed=0))
    graphdef, params = nnx.split(abstract_model, nnx.Param)
    shardings = param_shardings(abstract_model, mesh)
    params = jax.tree.map(
        lambda v, s: v.replace(jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=s)), params, shardings,
        is_leaf=lambda v: isinstance(v, nnx.Variable),
    )
    opt_state = jax.tree.map(
        lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
        jax.eval_shape(tx.init, params), opt_state_shardings(tx, params),
    )
    replicated = NamedSharding(mesh, P())
    state = TrainState(params=params, opt_state=opt_state,
                       step=jax.ShapeDtypeStruct((), jnp.int32, sharding=replicated))
    window = jax.ShapeDtypeStruct(
        (global_batch, rollout + 1, *cfg.img_size, cfg.in_channels), jnp.float32,
        sharding=NamedSharding(mesh, WINDOW_SPEC),
    )
    return graphdef, state, window, count_params(abstract_model)


def compile_train_step(cfg, mesh_shape=(1, 1, 1, 1), batch: int = 1, tx=None, rollout: int = 1,
                       spectral_layout: str = "auto", stage: int = 1, microbatches: int = 0,
                       census: bool = False) -> dict:
    """Compile the train step from abstract inputs on ``mesh_shape`` and read what the compiler says.

    Returns flops per device (``cost_analysis`` of the compiled and of the lowered
    program), memory analysis, collective counts and bytes from the HLO, parameter /
    optimiser bytes per device, the spectral layout in use and the seconds of
    lowering and of compiling; with ``census``, the HLO op census too (:func:`fcn_jax.parallel.hlo.op_census`).
    Needs ``stage * prod(mesh_shape)`` devices. ``spectral_layout``: ``auto``,
    ``channel_block`` or ``pencil`` (the experiment's ``mesh.spectral_layout``);
    ``stage`` > 1 pipelines the blocks over that many stages of ``mesh_shape``
    each, ``microbatches`` per data shard (0: one sample each).
    """
    import jax
    import optax

    from fcn_jax.parallel.mesh import make_mesh, model_sizes, use_microbatches, use_spectral_layout
    from fcn_jax.training.step import make_train_step

    tx = tx or optax.adam(5e-4)
    mesh = make_mesh(tuple(mesh_shape), stage=stage)
    with use_spectral_layout(spectral_layout), use_microbatches(microbatches):
        sizes = model_sizes(mesh, cfg, batch)
        graphdef, state, window, n_params = abstract_train_inputs(cfg, mesh, tx, batch, rollout)
        step = make_train_step(graphdef, tx)
        with jax.set_mesh(mesh):
            t0 = time.perf_counter()
            lowered = step.lower(state, window)
            t1 = time.perf_counter()
            compiled = lowered.compile()
    t2 = time.perf_counter()
    text = compiled.as_text()
    n = math.prod(mesh_shape) * stage
    out = {
        "params": n_params,
        "spectral_layout": sizes.spectral_layout,
        "stage": sizes.stage,
        "microbatches": sizes.microbatches,
        "lower_s": t1 - t0,
        "compile_s": t2 - t1,
        "flops_per_device": hlo.cost_flops(compiled),
        "flops_lowered_global": hlo.cost_flops(lowered),
        "memory": hlo.memory_stats(compiled),
        "collectives": hlo.collective_counts(text),
        "collective_bytes": hlo.collective_bytes(text, n),
        "param_bytes_per_device": hlo.local_bytes(state.params),
        "optimizer_bytes_per_device": hlo.local_bytes(state.opt_state),
        "devices": n,
    }
    if census:
        out["op_census"] = hlo.op_census(text)
    return out
