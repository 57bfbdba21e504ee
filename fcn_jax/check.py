"""Self-test of a mesh layout: ``python -m fcn_jax.check``.

Runs an experiment's model on the requested ``(data, channel, height, width)``
mesh and on a single device with the same weights and batch, and reports the
largest relative difference of the output and of the parameter gradients, plus
the collectives in the compiled train step. Run it on a new cluster before a
long job::

    python -m fcn_jax.check world --mesh 1,2,2,2 --cpu-devices 8
    python -m fcn_jax.check world --mesh 1,2,2,4 --cpu-devices 16   # pencil (auto)
    python -m fcn_jax.check world --mesh 1,2,2,2 --cpu-devices 8 \
        --set mesh.spectral_layout=pencil

Layer pipelining: ``--set mesh.stage=S`` runs the model pipelined over ``S``
stages (``S*D*C*H*W`` devices) with ``train.microbatches`` microbatches per
data shard, its blocks stacked and split over ``stage`` as training stores
them; the report gives the GPipe bubble fraction ``(S-1)/(M+S-1)``::

    python -m fcn_jax.check world --mesh 2,1,2,2 --cpu-devices 16 \
        --set mesh.stage=2 --set model.depth=4 --batch 4

The spectral layout is the experiment's ``mesh.spectral_layout`` (``auto`` picks
channel-block when ``channel*height*width`` divides the AFNO blocks, pencil
otherwise); the report names the one used.

Exit status: 0 when both errors are within the tolerance (default 1e-5), 1 when
they are not, 2 when the mesh or the experiment is invalid (with several
``--mesh``, the worst of them; one report per mesh).
"""

from __future__ import annotations

import argparse
import json
import math
import sys

from fcn_jax import cli


def build_parser() -> argparse.ArgumentParser:
    ap = cli.parser("check", "Compare an experiment's model on a device mesh against one device: forward output, "
                             "parameter gradients, and the collectives of the compiled train step.")
    cli.add_experiment(ap)
    cli.add_mesh(ap, repeatable=True, required=True,
                 help="D,C,H,W sizes; one may be -1 = the remaining devices (repeatable: each mesh is checked in turn)")
    ap.add_argument("--batch", type=int, default=0, help="global batch (default: the data-axis size)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--tolerance", type=float, default=1e-5, help="largest acceptable relative error")
    ap.add_argument("--json", action="store_true", help="print one JSON object")
    cli.add_runtime(ap, multihost=False)
    return ap


def _max_rel(a, b) -> float:
    import numpy as np

    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    scale = float(np.max(np.abs(b))) if b.size else 0.0
    diff = float(np.max(np.abs(a - b))) if b.size else 0.0
    if scale == 0.0:
        return diff  # e.g. the unused final norm: both gradients must be exactly zero
    return diff / scale


def run_check(cfg, mesh_shape, batch: int = 0, seed: int = 0) -> dict:
    """Compare ``cfg``'s model on ``mesh_shape`` against one device; returns the report dict.

    Runs under the experiment's ``mesh.spectral_layout``, pipelined over
    ``mesh.stage`` stages with ``train.microbatches`` microbatches.
    """
    from fcn_jax.parallel.mesh import use_microbatches, use_spectral_layout

    with use_spectral_layout(cfg.mesh.spectral_layout), use_microbatches(cfg.train.microbatches):
        return _run_check(cfg, mesh_shape, batch, seed)


def _run_check(cfg, mesh_shape, batch: int, seed: int) -> dict:
    import jax
    import jax.numpy as jnp
    import optax
    from flax import nnx
    from jax.sharding import NamedSharding

    from fcn_jax.model.afnonet import build_model, shard_model
    from fcn_jax.parallel.axes import IMAGE_SPEC
    from fcn_jax.parallel.hlo import collective_counts
    from fcn_jax.parallel.mesh import MeshSizes, bubble_fraction, make_mesh, resolve_shape, validate_layout
    from fcn_jax.parallel.pipeline import stack_blocks, stack_model
    from fcn_jax.training.losses import relative_l2

    stage = int(cfg.mesh.stage)
    n_dev = len(jax.devices())
    if -1 not in tuple(mesh_shape) and 0 < math.prod(mesh_shape) * stage < n_dev:
        n_dev = math.prod(mesh_shape) * stage  # a smaller mesh runs on the first devices
    shape = resolve_shape(mesh_shape, n_dev, stage)
    model_cfg = cfg.model
    if not batch:  # one sample per data shard, or two per stage when pipelined (a real schedule)
        batch = shape[0] * (max(cfg.train.microbatches, 2) if stage > 1 else 1)
    sizes = validate_layout(MeshSizes(*shape, stage=stage), model_cfg, batch_size=batch)
    layout = sizes.spectral_layout

    kx, ky = jax.random.split(jax.random.key(seed + 1))
    x = jax.random.normal(kx, (batch, *model_cfg.img_size, model_cfg.in_channels), jnp.float32)
    y = jax.random.normal(ky, (batch, *model_cfg.img_size, model_cfg.out_channels), jnp.float32)

    def run(mesh):
        model = build_model(model_cfg, seed=seed)
        if mesh is not None and stage > 1:
            stack_model(model)  # blocks stacked and split over `stage`, as training stores them
        graphdef, params = nnx.split(model, nnx.Param)

        def loss_fn(p, xx, yy):
            return relative_l2(nnx.merge(graphdef, p)(xx), yy)

        if mesh is None:
            out = jax.jit(lambda p, xx: nnx.merge(graphdef, p)(xx))(params, x)
            grads = jax.jit(jax.grad(loss_fn))(params, x, y)
            return jax.device_get(out), jax.device_get(nnx.to_pure_dict(grads)), None
        with jax.set_mesh(mesh):
            model = shard_model(model, mesh)
            graphdef, params = nnx.split(model, nnx.Param)
            sharding = NamedSharding(mesh, IMAGE_SPEC)
            xs, ys = jax.device_put(x, sharding), jax.device_put(y, sharding)
            out = jax.jit(lambda p, xx: nnx.merge(graphdef, p)(xx))(params, xs)
            grads = jax.jit(jax.grad(loss_fn))(params, xs, ys)
            # the compiled train step: gradients + Adam update, state donated
            tx = optax.adam(1e-4)

            def step(p, o, xx, yy):
                g = jax.grad(loss_fn)(p, xx, yy)
                u, o = tx.update(g, o, p)
                return optax.apply_updates(p, u), o

            from fcn_jax.training.step import init_opt_state

            opt_state = init_opt_state(tx, params)
            hlo = jax.jit(step, donate_argnums=(0, 1)).lower(params, opt_state, xs, ys).compile().as_text()
            return jax.device_get(out), jax.device_get(nnx.to_pure_dict(grads)), collective_counts(hlo)

    ref_out, ref_grads, _ = run(None)
    out, grads, counts = run(make_mesh(shape, stage=stage))
    if stage > 1:  # compare stacked gradients with the reference's, stacked
        holder = ref_grads["backbone"] if "backbone" in ref_grads else ref_grads
        holder["blocks"] = jax.device_get(stack_blocks(holder["blocks"]))
    grad_errs = {}
    for path, g in jax.tree_util.tree_flatten_with_path(grads)[0]:
        ref = ref_grads
        for k in path:
            ref = ref[k.key]
        grad_errs[jax.tree_util.keystr(path)] = _max_rel(g, ref)
    worst = max(grad_errs, key=grad_errs.get)
    return {
        "mesh": list(shape),
        "stage": stage,
        "microbatches": sizes.microbatches,
        "bubble_fraction": bubble_fraction(stage, sizes.microbatches),
        "spectral_layout": layout,
        "devices": int(jax.device_count()),
        "platform": jax.devices()[0].platform,
        "batch": batch,
        "forward_max_rel_err": _max_rel(out, ref_out),
        "grad_max_rel_err": grad_errs[worst],
        "worst_grad_param": worst,
        "collectives": counts,
    }


def main(argv=None) -> int:
    args = cli.parse(build_parser(), argv)

    def json_error(e: BaseException) -> None:
        if args.json:
            print(json.dumps({"error": str(e)}))

    def body() -> int:
        cfg = cli.load_experiment(args)
        cli.start(args)
        import jax

        # both sides at full float32 matmul precision, so the comparison measures layout, not precision
        jax.config.update("jax_default_matmul_precision", "highest")
        return max(_check_one(cfg, mesh, args) for mesh in args.mesh)

    return cli.run(body, on_error=json_error)


def _check_one(cfg, mesh, args) -> int:
    """One mesh's report; an invalid mesh is reported and counts as exit status 2 (the others still run)."""
    from fcn_jax.parallel.mesh import MeshError

    try:
        report = run_check(cfg, mesh, batch=args.batch, seed=args.seed)
    except MeshError as e:
        if args.json:
            print(json.dumps({"mesh": list(mesh), "error": str(e)}))
        print(f"error: {e}", file=sys.stderr)
        return e.exit_code
    report["tolerance"] = args.tolerance
    report["passed"] = bool(
        report["forward_max_rel_err"] <= args.tolerance and report["grad_max_rel_err"] <= args.tolerance
    )
    if args.json:
        print(json.dumps(report), flush=True)
    else:
        d, c, h, w = report["mesh"]
        staged = ""
        if report["stage"] > 1:
            staged = (f" x stage {report['stage']} ({report['microbatches']} microbatches per data shard, "
                      f"GPipe bubble {report['bubble_fraction']:.3f})")
        print(f"mesh data={d} channel={c} height={h} width={w}{staged} on {report['devices']} {report['platform']} "
              f"devices, batch {report['batch']}, spectral layout {report['spectral_layout']}")
        print(f"  forward  max rel err  {report['forward_max_rel_err']:.3e}")
        print(f"  gradient max rel err  {report['grad_max_rel_err']:.3e}  ({report['worst_grad_param']})")
        print("  collectives in the compiled train step:")
        for name, n in report["collectives"].items():
            print(f"    {name:<20s}{n:>5d}")
        print("  PASSED" if report["passed"] else f"  FAILED: error above tolerance {args.tolerance:g}", flush=True)
    return 0 if report["passed"] else 1


if __name__ == "__main__":
    sys.exit(main())
