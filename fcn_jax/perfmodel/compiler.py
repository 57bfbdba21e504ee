"""What the compiler says: abstract compilation of the train step, its costs and collectives.

Nothing of the model's size is allocated: the train state and the batch are
sharded ``jax.ShapeDtypeStruct``s (``nnx.eval_shape`` / ``jax.eval_shape``),
the step is lowered and compiled, and the compiled program is read:
``cost_analysis()`` (per device, after partitioning), ``memory_analysis()``
and the HLO text for collectives.
"""

from __future__ import annotations

import math
import re
import time

DTYPE_BYTES = {
    "pred": 1, "s8": 1, "u8": 1, "s16": 2, "u16": 2, "f16": 2, "bf16": 2, "s32": 4, "u32": 4, "f32": 4,
    "s64": 8, "u64": 8, "f64": 8, "c64": 8, "c128": 16,
}
OPS = ("all-to-all", "all-gather", "reduce-scatter", "all-reduce", "collective-permute")
_INSTR = re.compile(
    r"^\s*(?:ROOT\s+)?%?[\w.\-]+\s*=\s*(?P<shape>.*?)\s(?P<op>" + "|".join(OPS) + r")(?P<start>-start)?\((?P<rest>.*)$"
)
_ARRAY = re.compile(r"\b(" + "|".join(DTYPE_BYTES) + r")\[([\d,]*)\]")
WINDOW_AXES = ("data", None, "height", "width", None)


def _shape_bytes(text: str) -> int:
    total = 0
    for dt, dims in _ARRAY.findall(text):
        n = math.prod(int(d) for d in dims.split(",") if d) if dims else 1
        total += n * DTYPE_BYTES[dt]
    return total


def _group_size(rest: str, n_devices: int) -> int:
    # mesh form: replica_groups=mesh['axis_0'=2,...][, device_ids=(...)] {'axis_1','axis_2'}
    m = re.search(r"replica_groups=mesh\[([^\]]*)\][^{]*\{([^}]*)\}", rest)
    if m:
        sizes = {k: int(v) for k, v in re.findall(r"'([^']+)'=(\d+)", m.group(1))}
        names = re.findall(r"'([^']+)'", m.group(2))
        return math.prod(sizes[n] for n in names)
    m = re.search(r"replica_groups=\{(\{[\d,]*\})", rest)
    if m:
        inner = m.group(1).strip("{}")
        return len([x for x in inner.split(",") if x]) or n_devices
    m = re.search(r"replica_groups=\[([\d,]+)\]<=", rest)  # iota form [groups, size]<=[...]
    if m:
        return int(m.group(1).split(",")[-1])
    return n_devices  # replica_groups={} = all devices


def hlo_collective_bytes(hlo_text: str, n_devices: int) -> dict:
    """Bytes moved per device by each collective kind (the convention of :mod:`fcn_jax.perfmodel.layouts`)."""
    out = {op: 0.0 for op in OPS}
    for line in hlo_text.splitlines():
        m = _INSTR.match(line)
        if not m:
            continue
        op, shape, rest = m.group("op"), m.group("shape"), m.group("rest")
        nbytes = _shape_bytes(shape)
        if m.group("start") and shape.lstrip().startswith("(") and op in ("all-gather", "all-reduce"):
            # async start ops return (operand(s), result(s)): count the result half only
            nbytes = nbytes / 2 if op == "all-reduce" else nbytes  # all-gather: approximate
        if op == "collective-permute":
            out[op] += nbytes
            continue
        p = _group_size(rest, n_devices)
        if p <= 1:
            continue
        factor = {"all-to-all": (p - 1) / p, "all-gather": (p - 1) / p, "reduce-scatter": p - 1,
                  "all-reduce": 2 * (p - 1) / p}[op]
        out[op] += nbytes * factor
    return out


def abstract_train_inputs(cfg, mesh, tx, global_batch: int, rollout: int = 1):
    """(graphdef, abstract TrainState, abstract window, parameter count); every leaf a sharded ShapeDtypeStruct.

    The model comes from ``nnx.eval_shape``, the optimiser state from
    ``jax.eval_shape(tx.init, ...)``; parameter shardings from ``param_shardings``;
    optimiser subtrees shaped like the parameters get the parameters' shardings and
    everything else is replicated (as ``init_opt_state``).
    """
    import jax
    import jax.numpy as jnp
    from flax import nnx
    from jax.sharding import NamedSharding
    from jax.sharding import PartitionSpec as P

    from fcn_jax.model.afnonet import AFNONet, count_params, param_shardings
    from fcn_jax.training.step import TrainState

    abstract_model = nnx.eval_shape(lambda: AFNONet(cfg, seed=0))
    graphdef, params = nnx.split(abstract_model, nnx.Param)
    shardings = param_shardings(abstract_model, mesh)
    params = jax.tree.map(
        lambda v, s: v.replace(jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=s)), params, shardings,
        is_leaf=lambda v: isinstance(v, nnx.Variable),
    )
    replicated = NamedSharding(mesh, P())
    param_def = jax.tree.structure(params)
    param_sds = jax.tree.map(lambda x: x.sharding, params)

    def is_param_tree(node):
        return jax.tree.structure(node) == param_def

    opt_abstract = jax.eval_shape(tx.init, params)
    opt_shardings = jax.tree.map(
        lambda node: param_sds if is_param_tree(node) else replicated, opt_abstract, is_leaf=is_param_tree
    )
    opt_state = jax.tree.map(
        lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), opt_abstract, opt_shardings
    )
    state = TrainState(params=params, opt_state=opt_state,
                       step=jax.ShapeDtypeStruct((), jnp.int32, sharding=replicated))
    window = jax.ShapeDtypeStruct(
        (global_batch, rollout + 1, *cfg.img_size, cfg.in_channels), jnp.float32,
        sharding=NamedSharding(mesh, P(*WINDOW_AXES)),
    )
    return graphdef, state, window, count_params(abstract_model)


def local_bytes(tree) -> int:
    """Bytes one device holds of a tree of sharded ShapeDtypeStructs / arrays."""
    import jax

    total = 0
    for x in jax.tree.leaves(tree):
        shape = x.sharding.shard_shape(x.shape) if getattr(x, "sharding", None) is not None else x.shape
        total += math.prod(shape) * x.dtype.itemsize
    return total


def memory_stats(compiled) -> dict:
    m = compiled.memory_analysis()
    out = {k: int(getattr(m, k + "_size_in_bytes")) for k in ("argument", "output", "alias", "temp", "generated_code")}
    out["peak_memory"] = int(getattr(m, "peak_memory_in_bytes", -1))
    out["total"] = out["argument"] + out["output"] - out["alias"] + out["temp"]
    return out


def cost_flops(compiled_or_lowered) -> float:
    ca = compiled_or_lowered.cost_analysis()
    if isinstance(ca, (list, tuple)):  # older JAX returned a list of dicts
        ca = ca[0] if ca else {}
    return float((ca or {}).get("flops", float("nan")))


def compile_train_step(cfg, mesh_shape=(1, 1, 1, 1), batch: int = 1, tx=None, rollout: int = 1,
                       spectral_layout: str = "auto") -> dict:
    """Compile the train step from abstract inputs on ``mesh_shape`` and read what the compiler says.

    Returns flops per device (``cost_analysis`` of the compiled and of the lowered
    program), memory analysis, collective counts and bytes from the HLO, parameter /
    optimiser bytes per device, the spectral layout in use and lower/compile
    seconds. Needs ``prod(mesh_shape)`` devices. ``spectral_layout``: ``auto``,
    ``channel_block`` or ``pencil`` (the experiment's ``mesh.spectral_layout``).
    """
    import jax
    import optax

    from fcn_jax.parallel.hlo import collective_counts
    from fcn_jax.parallel.mesh import make_mesh, model_sizes, use_spectral_layout
    from fcn_jax.training.step import make_train_step

    tx = tx or optax.adam(5e-4)
    mesh = make_mesh(tuple(mesh_shape))
    t0 = time.perf_counter()
    with use_spectral_layout(spectral_layout):
        layout = model_sizes(mesh, cfg, batch).spectral_layout
        graphdef, state, window, n_params = abstract_train_inputs(cfg, mesh, tx, batch, rollout)
        step = make_train_step(graphdef, tx)
        with jax.set_mesh(mesh):
            lowered = step.lower(state, window)
            t1 = time.perf_counter()
            compiled = lowered.compile()
    t2 = time.perf_counter()
    hlo = compiled.as_text()
    n = math.prod(mesh_shape)
    return {
        "params": n_params,
        "spectral_layout": layout,
        "lower_s": t1 - t0,
        "compile_s": t2 - t1,
        "flops_per_device": cost_flops(compiled),
        "flops_lowered_global": cost_flops(lowered),
        "memory": memory_stats(compiled),
        "collectives": collective_counts(hlo),
        "collective_bytes": hlo_collective_bytes(hlo, n),
        "param_bytes_per_device": local_bytes(state.params),
        "optimizer_bytes_per_device": local_bytes(state.opt_state),
        "devices": n,
    }
