"""Every sharded layout against the single-device result, and the communication it compiles to."""

import math
import re

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from fcn_jax.config import ModelConfig
from fcn_jax.model.afnonet import AFNONet, PrecipNet, shard_model
from fcn_jax.parallel.axes import WINDOW_SPEC
from fcn_jax.parallel.hlo import collective_counts, collective_shapes
from fcn_jax.parallel.mesh import MeshError, MeshSizes, build_mesh, make_mesh, resolve_shape, validate_layout
from fcn_jax.parallel.ops import layer_norm
from fcn_jax.training.step import init_train_state, make_loss_fn, make_train_step
from tests.helpers import max_rel as _max_rel

# Realistic structure at a small size: an 8x16 token grid, 8 AFNO blocks, a
# truncating filter (fraction 1 keeps 5 of 9 longitude bins, as 46 of 91 in the
# published model), 2 blocks deep so inter-block layouts are exercised.
CFG = ModelConfig(img_size=(32, 64), patch_size=(4, 4), in_channels=4, out_channels=4, embed_dim=64, depth=2,
                  mlp_ratio=2.0, num_blocks=8)
BATCH = 8
MESHES = [(1, 1, 1, 1), (8, 1, 1, 1), (1, 8, 1, 1), (1, 4, 1, 1), (1, 1, 2, 4), (1, 2, 2, 2), (2, 2, 2, 1),
          (2, 1, 2, 2), (1, 1, 1, 8), (4, 2, 1, 1)]
#: Every axis split alone and in a hybrid: run always; the other MESHES are marked slow (``make test-all``).
FAST_MESHES = {(1, 1, 1, 1), (8, 1, 1, 1), (1, 1, 2, 4), (1, 2, 2, 2), (2, 2, 2, 1)}


def _mesh_params(shapes, fast):
    return [pytest.param(s, id="x".join(map(str, s)), marks=() if s in fast else pytest.mark.slow) for s in shapes]


def _window(k=1, seed=1):
    return jax.random.normal(jax.random.key(seed), (BATCH, k + 1, *CFG.img_size, CFG.in_channels))


@pytest.fixture(scope="module")
def reference():
    """Forward output and parameter gradients on one device (no mesh in context)."""
    model = AFNONet(CFG, seed=0)
    window = _window()
    graphdef, params = nnx.split(model, nnx.Param)
    loss_fn = make_loss_fn(graphdef)
    (loss, _), grads = jax.jit(jax.value_and_grad(loss_fn, has_aux=True))(params, {"fields": window})
    out = jax.jit(lambda p, x: nnx.merge(graphdef, p)(x))(params, window[:, 0])
    return {"out": np.asarray(out), "loss": float(loss), "grads": nnx.to_pure_dict(grads)}


def _flat(tree, prefix=""):
    for k, v in tree.items():
        if isinstance(v, dict):
            yield from _flat(v, f"{prefix}{k}.")
        else:
            yield f"{prefix}{k}", v


def _expected_counts(shape, depth):
    _, pc, ph, pw = shape
    return {
        # channel-block layout: 2 all-to-alls per transform per mesh axis in use,
        # forward + inverse transform, forward + backward pass
        "all-to-all": depth * 4 * ((pw > 1) + (ph > 1)),
        # Megatron MLP in sequence-parallel form: gather + reduce-scatter, transposed in backward
        "all-gather": depth * 2 * (pc > 1),
        "reduce-scatter": depth * 2 * (pc > 1),
        "collective-permute": 0,
    }


@pytest.mark.parametrize("shape", _mesh_params(MESHES, FAST_MESHES))
def test_sharded_forward_and_gradients_equal_single_device(shape, reference):
    mesh = make_mesh(shape)
    with jax.set_mesh(mesh):
        model = shard_model(AFNONet(CFG, seed=0), mesh)
        window = jax.device_put(_window(), NamedSharding(mesh, WINDOW_SPEC))
        graphdef, params = nnx.split(model, nnx.Param)
        loss_fn = make_loss_fn(graphdef)
        grad_fn = jax.jit(jax.value_and_grad(loss_fn, has_aux=True))
        (loss, _), grads = grad_fn(params, {"fields": window})
        out = jax.jit(lambda p, x: nnx.merge(graphdef, p)(x))(params, window[:, 0])
        step_hlo = grad_fn.lower(params, {"fields": window}).compile().as_text()

    assert out.sharding.is_equivalent_to(NamedSharding(mesh, P("data", "height", "width", None)), 4)
    assert _max_rel(out, reference["out"]) < 1e-5
    assert abs(float(loss) - reference["loss"]) < 1e-5 * abs(reference["loss"])
    ref_grads = dict(_flat(reference["grads"]))
    got_grads = dict(_flat(nnx.to_pure_dict(grads)))
    assert set(got_grads) == set(ref_grads)
    for name, g in got_grads.items():
        assert _max_rel(g, ref_grads[name]) < 1e-5, name

    # the communication is exactly what the layout intends
    counts = collective_counts(step_hlo)
    for op, n in _expected_counts(shape, CFG.depth).items():
        assert counts[op] == n, (op, counts)
    _, pc, ph, pw = shape
    # LayerNorm statistics (2 psums per norm, forward and backward) when channels are split,
    # plus a few reductions of the loss and of replicated parameters' gradients
    assert counts["all-reduce"] <= 8 * CFG.depth * (pc > 1) + 8, counts
    if pc > 1:
        assert counts["all-reduce"] >= 8 * CFG.depth, counts
    # nothing is ever gathered spatially: every all-gather is the MLP's channel gather
    # of one device's spatial tile
    lat_local, lon_local = CFG.token_grid[0] // ph, CFG.token_grid[1] // pw
    for s in collective_shapes(step_hlo, "all-gather"):
        dims = [int(d) for d in re.search(r"\[([\d,]*)\]", s).group(1).split(",")]
        assert dims == [BATCH // shape[0], lat_local, lon_local, CFG.embed_dim], s
    # every FFT transforms at most this device's share of the activations
    local_elems = (BATCH // shape[0]) * math.prod(CFG.token_grid) * CFG.embed_dim // (pc * ph * pw)
    ffts = re.findall(r"=\s*[cf](?:32|64)\[([\d,]+)\][^\n]*? fft\(", step_hlo)
    assert ffts, "no FFT found in the compiled step"
    for dims in ffts:
        assert math.prod(int(d) for d in dims.split(",")) <= local_elems, dims


@pytest.mark.parametrize("shape", _mesh_params([(1, 2, 2, 2), (2, 1, 2, 2)], {(1, 2, 2, 2)}))
def test_optimizer_step_on_mesh_equals_single_device(shape):
    tx = optax.chain(optax.clip_by_global_norm(1.0), optax.adam(1e-3))
    window = _window(k=2, seed=3)

    def two_steps(mesh):
        ctx = jax.set_mesh(mesh) if mesh is not None else _nullcontext()
        with ctx:
            model = AFNONet(CFG, seed=0)
            if mesh is not None:
                model = shard_model(model, mesh)
            graphdef, state = init_train_state(model, tx)
            w = window if mesh is None else jax.device_put(window, NamedSharding(mesh, WINDOW_SPEC))
            step = make_train_step(graphdef, tx)
            losses = []
            for _ in range(2):
                state, metrics = step(state, w)
                losses.append(float(metrics["loss"]))
            return losses, nnx.to_pure_dict(state.params), state

    ref_losses, ref_params, _ = two_steps(None)
    losses, params, state = two_steps(make_mesh(shape))
    np.testing.assert_allclose(losses, ref_losses, rtol=1e-5)
    assert losses[1] < losses[0]
    # Adam normalises each update to O(lr) whatever the gradient's size, so parameter
    # differences are judged against the update size as well as the parameter's size
    for (name, p), (_, r) in zip(_flat(params), _flat(ref_params)):
        np.testing.assert_allclose(np.asarray(p), np.asarray(r), rtol=1e-5, atol=1e-3 * 1e-3, err_msg=name)
    # optimiser moments are laid out like the parameters
    mu_w1 = state.opt_state[1][0].mu["blocks"][0]["filter"]["w1"]
    assert mu_w1.sharding.spec == state.params["blocks"][0]["filter"]["w1"].sharding.spec


class _nullcontext:
    def __enter__(self):
        return self

    def __exit__(self, *a):
        return False


def test_parameters_and_optimizer_state_memory_fall_with_model_parallelism():
    tx = optax.adam(1e-3)
    per_device, predicted = {}, {}
    for shape in [(1, 1, 1, 1), (1, 2, 2, 2), (1, 8, 1, 1)]:
        mesh = make_mesh(shape)
        with jax.set_mesh(mesh):
            _, state = init_train_state(shard_model(AFNONet(CFG, seed=0), mesh), tx)
        leaves = [x for x in jax.tree.leaves((state.params, state.opt_state)) if x.ndim > 0]
        per_device[shape] = sum(x.addressable_shards[0].data.nbytes for x in leaves)
        # what the sharding rules promise: each tensor divided by the mesh axes in its spec
        predicted[shape] = sum(
            x.nbytes // math.prod(mesh.shape[a] for e in x.sharding.spec if e for a in ((e,) if isinstance(e, str) else e))
            for x in leaves
        )
    assert per_device == predicted
    # channel parallelism splits every large tensor; spatial decomposition splits the
    # position embedding and the spectral weights (MLP weights stay replicated over space)
    assert per_device[(1, 8, 1, 1)] < per_device[(1, 1, 1, 1)] / 6
    assert per_device[(1, 2, 2, 2)] < 0.85 * per_device[(1, 1, 1, 1)]


@pytest.mark.parametrize("shape", _mesh_params([(1, 1, 2, 2), (2, 1, 1, 4), (1, 1, 2, 1)], {(1, 1, 2, 1)}))
def test_precipnet_halo_matches_single_device(shape):
    cfg = ModelConfig(img_size=(32, 64), patch_size=(4, 4), in_channels=4, out_channels=1, embed_dim=32, depth=1,
                      mlp_ratio=2.0, num_blocks=4, kind="precip")
    model = PrecipNet(cfg, seed=0)
    x = jax.random.normal(jax.random.key(0), (4, *cfg.img_size, cfg.in_channels))
    graphdef, params = nnx.split(model, nnx.Param)

    def loss(p, xx):
        return jnp.mean(nnx.merge(graphdef, p)(xx) ** 2)

    ref_out = np.asarray(model(x))
    ref_g = nnx.to_pure_dict(jax.grad(loss)(params, x))
    mesh = make_mesh(shape)
    with jax.set_mesh(mesh):
        sharded = shard_model(PrecipNet(cfg, seed=0), mesh)
        xs = jax.device_put(x, NamedSharding(mesh, P("data", "height", "width", None)))
        gd, ps = nnx.split(sharded, nnx.Param)
        out = jax.jit(lambda p, xx: nnx.merge(gd, p)(xx))(ps, xs)
        g = nnx.to_pure_dict(jax.jit(jax.grad(loss))(ps, xs))
        hlo = jax.jit(lambda p, xx: nnx.merge(gd, p)(xx)).lower(ps, xs).compile().as_text()
    assert _max_rel(out, ref_out) < 1e-5
    for (name, a), (_, b) in zip(_flat(g), _flat(ref_g)):
        assert _max_rel(a, b) < 1e-5, name
    # halo rows/columns come from neighbours: one permute per split direction and side
    assert collective_counts(hlo)["collective-permute"] == 2 * (shape[2] > 1) + 2 * (shape[3] > 1)


def test_layer_norm_sharded_two_pass_is_accurate_far_from_zero():
    """|mean|/std = 1e4: the E[x^2]-E[x]^2 shortcut would return garbage (even negative variances)."""
    rng = np.random.default_rng(0)
    x = (1000.0 + 0.1 * rng.standard_normal((64, 768))).astype(np.float32)
    scale, bias = np.ones(768, np.float32), np.zeros(768, np.float32)
    mesh = make_mesh((1, 8, 1, 1))
    sizes = MeshSizes.of(mesh)
    fn = jax.shard_map(lambda a, s, b: layer_norm(a, s, b, eps=1e-6, num_features=768, sizes=sizes),
                       mesh=mesh, in_specs=(P(None, "channel"), P("channel"), P("channel")),
                       out_specs=P(None, "channel"))
    got = np.asarray(jax.jit(fn)(x, scale, bias))
    x64 = x.astype(np.float64)
    want = (x64 - x64.mean(-1, keepdims=True)) / np.sqrt(x64.var(-1, keepdims=True) + 1e-6)
    # float32 rounding of the mean at |x| ~ 1e3 (ulp 6e-5 against std 0.1) bounds what any method can do
    assert np.max(np.abs(got - want)) < 5e-3
    # the one-pass shortcut E[x^2] - E[x]^2 in float32 is wrong by orders of magnitude here
    x32 = x.astype(np.float32)
    naive_var = np.mean(x32 * x32, -1, keepdims=True) - np.mean(x32, -1, keepdims=True) ** 2
    naive = (x32 - x32.mean(-1, keepdims=True)) / np.sqrt(np.maximum(naive_var, 0) + 1e-6)
    assert np.max(np.abs(naive - want)) > 100 * np.max(np.abs(got - want))


PUBLISHED = ModelConfig()  # 720x1440, patch 8 -> 90x180 tokens, 768 embed, 8 blocks


@pytest.mark.parametrize(
    "sizes,match",
    [
        ((1, 1, 4, 1), r"height=4 does not split .* 90 latitude rows; valid height sizes: \[1, 2, 3, 5, 6, 9, 10"),
        ((1, 1, 1, 7), r"width=7 .* 180 longitude columns.*; valid width sizes: \[1, 2, 3, 4, 5, 6, 9"),
        ((1, 5, 1, 1), r"channel=5 does not divide embed_dim 768 .*valid channel sizes: \[1, 2, 3, 4"),
        # neither spectral layout: 16 > 8 blocks for channel-block, and pencil splits blocks over channel
        ((1, 16, 1, 1), r"channel\*height\*width = 16\*1\*1 = 16 does not divide the 8 AFNO blocks.*\[1, 2, 4, 8\]"
                        r"(.|\n)*channel=16 does not divide the 8 AFNO blocks \(pencil"),
        ((1, 1, 1, 5), r"width=5 does not divide the 768 channels per channel slice.*valid width sizes: \[1, 2, 3, 4, 6"),
        ((3, 1, 1, 1), r"data=3 does not divide the global batch 64"),
    ],
)
def test_invalid_layouts_are_refused_with_valid_choices(sizes, match):
    with pytest.raises(MeshError, match=match):
        validate_layout(MeshSizes(*sizes), PUBLISHED, batch_size=64)


def test_invalid_device_counts_are_refused():
    with pytest.raises(MeshError, match="needs 16 devices but 8 are available"):
        resolve_shape((2, 2, 2, 2), 8)
    with pytest.raises(MeshError, match="at most one mesh axis may be -1"):
        resolve_shape((-1, -1, 1, 1), 8)
    with pytest.raises(MeshError, match="does not divide the 8 available"):
        resolve_shape((-1, 3, 1, 1), 8)
    assert resolve_shape((-1, 2, 2, 1), 8) == (2, 2, 2, 1)


def test_build_mesh_from_config_validates_before_compiling():
    from fcn_jax.config import MeshConfig

    mesh = build_mesh(MeshConfig(data=-1, channel=1, height=2, width=2), CFG, batch_size=8)
    assert dict(mesh.shape) == {"data": 2, "channel": 1, "height": 2, "width": 2}
    assert mesh.axis_names == ("data", "channel", "height", "width")
    with pytest.raises(MeshError, match="does not divide the 4 AFNO blocks"):
        build_mesh(MeshConfig(data=1, channel=8, height=1, width=1), ModelConfig(
            img_size=(32, 64), patch_size=(4, 4), in_channels=4, out_channels=4, embed_dim=64, depth=1,
            num_blocks=4), batch_size=8)
    # the model refuses a bad mesh in context too, before compiling
    model = AFNONet(CFG, seed=0)
    with jax.set_mesh(make_mesh((1, 1, 3, 1))):
        with pytest.raises(MeshError, match="height=3 does not split"):
            model(jnp.zeros((1, *CFG.img_size, CFG.in_channels)))
