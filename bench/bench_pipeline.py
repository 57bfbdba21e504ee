"""Compile-only memory of a pipelined train step (issue 12): ``mesh.stage`` stages x a (D,C,H,W) mesh.

Builds the abstract train state with the blocks stacked and split over
``stage`` (as training stores them), compiles the train step (relative L2 +
Adam) for emulated CPU devices and prints XLA's per-device memory analysis
(argument + output - alias + temp, see jax-notes §11) and the collectives::

    python bench/bench_pipeline.py --config 0.1 --mesh 1,2,2,2 --stage 2 --cpu-devices 16
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time

CONFIGS = {
    "0.25": dict(img_size=(720, 1440), patch_size=(8, 8), depth=12),
    "0.1": dict(img_size=(1800, 3600), patch_size=(4, 4), depth=24),
}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", choices=sorted(CONFIGS), default="0.1")
    ap.add_argument("--mesh", default="1,2,2,2", help="D,C,H,W per stage")
    ap.add_argument("--stage", type=int, default=2)
    ap.add_argument("--microbatches", type=int, default=0, help="per data shard; 0 = one sample each")
    ap.add_argument("--batch", type=int, default=1, help="samples per data shard")
    ap.add_argument("--cpu-devices", type=int, default=16)
    ap.add_argument("--remat", action="store_true")
    args = ap.parse_args(argv)
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    import jax

    jax.config.update("jax_num_cpu_devices", args.cpu_devices)
    import jax.numpy as jnp
    import optax
    from flax import nnx
    from jax.sharding import NamedSharding
    from jax.sharding import PartitionSpec as P

    from fcn_jax.config import ModelConfig
    from fcn_jax.model.afnonet import AFNONet, param_shardings
    from fcn_jax.parallel.hlo import collective_counts
    from fcn_jax.parallel.mesh import bubble_fraction, make_mesh, model_sizes, use_microbatches
    from fcn_jax.parallel.pipeline import stack_model
    from fcn_jax.training.step import TrainState, make_train_step

    shape = tuple(int(v) for v in args.mesh.split(","))
    cfg = ModelConfig(**CONFIGS[args.config], remat=args.remat)
    mesh = make_mesh(shape, stage=args.stage)
    global_batch = shape[0] * args.batch
    with jax.set_mesh(mesh), use_microbatches(args.microbatches):
        sizes = model_sizes(mesh, cfg, global_batch)
        abstract = nnx.eval_shape(lambda: stack_model(AFNONet(cfg, seed=0)) if args.stage > 1 else AFNONet(cfg))
        graphdef, params = nnx.split(abstract, nnx.Param)
        shardings = param_shardings(abstract, mesh)
        params = jax.tree.map(lambda v, s: v.replace(jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=s)),
                              params, shardings, is_leaf=lambda v: isinstance(v, nnx.Variable))
        tx = optax.adam(5e-4)
        param_def = jax.tree.structure(params)
        param_sh = jax.tree.map(lambda x: x.sharding, params)
        replicated = NamedSharding(mesh, P())
        is_pt = lambda n: jax.tree.structure(n) == param_def  # noqa: E731
        opt_abs = jax.eval_shape(tx.init, params)
        opt_sh = jax.tree.map(lambda n: param_sh if is_pt(n) else replicated, opt_abs, is_leaf=is_pt)
        opt = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), opt_abs, opt_sh)
        state = TrainState(params=params, opt_state=opt, step=jax.ShapeDtypeStruct((), jnp.int32, sharding=replicated))
        window = jax.ShapeDtypeStruct((global_batch, 2, *cfg.img_size, cfg.in_channels), jnp.float32,
                                      sharding=NamedSharding(mesh, P("data", None, "height", "width", None)))
        t0 = time.perf_counter()
        compiled = make_train_step(graphdef, tx).lower(state, window).compile()
        compile_s = time.perf_counter() - t0
    m = compiled.memory_analysis()
    total = m.argument_size_in_bytes + m.output_size_in_bytes - m.alias_size_in_bytes + m.temp_size_in_bytes
    param_bytes = sum(math.prod(x.sharding.shard_shape(x.shape)) * x.dtype.itemsize for x in jax.tree.leaves(params))
    print(json.dumps({
        "config": args.config, "mesh": list(shape), "stage": args.stage, "devices": math.prod(shape) * args.stage,
        "microbatches": sizes.microbatches, "bubble_fraction": bubble_fraction(args.stage, sizes.microbatches),
        "spectral_layout": sizes.spectral_layout, "remat": args.remat,
        "gb_per_device": total / 1e9, "argument_gb": m.argument_size_in_bytes / 1e9,
        "temp_gb": m.temp_size_in_bytes / 1e9, "param_gb_per_device": param_bytes / 1e9,
        "compile_s": compile_s, "collectives": collective_counts(compiled.as_text()),
    }))


if __name__ == "__main__":
    sys.exit(main())
