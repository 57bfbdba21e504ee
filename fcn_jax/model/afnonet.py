"""AFNONet (FourCastNet backbone) and PrecipNet in Flax NNX.

Channels-last throughout: images are ``[batch, lat, lon, channel]`` in
normalised units, in and out. Parameter shapes mirror the original PyTorch
modules so that checkpoint conversion is at most a transpose or reshape
(model spec §9-§10); every parameter carries logical axis names
(``logical_axes`` metadata) that :mod:`fcn_jax.parallel.axes` maps to mesh axes.

The modules hold parameters; the computation is one function,
:func:`_forward_local`, that runs inside a fully manual ``jax.shard_map`` over
the ``(data, channel, height, width)`` mesh. With no mesh in context the model
uses the trivial one-device mesh, so a single CPU and a 512-GPU job run the
same code.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import PartitionSpec as P

from fcn_jax.config import ModelConfig
from fcn_jax.model.activations import gelu_exact
from fcn_jax.model.spectral import afno_filter
from fcn_jax.parallel.axes import CHANNEL, IMAGE_SPEC, STAGE
from fcn_jax.parallel.mesh import MeshSizes, current_mesh, model_sizes, single_device_mesh
from fcn_jax.parallel.ops import (
    gather_channels,
    halo_pad_lat_lon,
    layer_norm,
    logical_spec,
    psum,
    reduce_scatter_channels,
    vary,
)
from fcn_jax.parallel.pipeline import is_stacked, pipeline_blocks

LN_EPS = 1e-6  # the original's LayerNorm epsilon (not PyTorch's 1e-5 default)


def _param(value, *names: str) -> nnx.Param:
    assert value.ndim == len(names), (value.shape, names)
    return nnx.Param(value, logical_axes=tuple(names), eager_sharding=False)


def _tracing() -> bool:
    """True under ``nnx.eval_shape``/``jit`` tracing (every op is staged: omnistaging)."""
    return isinstance(jnp.zeros(()), jax.core.Tracer)


def _draw(shape, sample):
    # Abstract construction (eval_shape) must not draw 75 M host random numbers.
    if _tracing():
        return jnp.zeros(shape, jnp.float32)
    return jnp.asarray(sample(), jnp.float32)


def _trunc_normal(rng: np.random.Generator, shape, std=0.02):
    # timm trunc_normal_(std=.02) with absolute bounds +-2, i.e. +-100 sigma: effectively
    # an untruncated normal; the clip documents the bound and never binds in practice
    return _draw(shape, lambda: np.clip(std * rng.standard_normal(shape), -2.0, 2.0))


def _uniform(rng: np.random.Generator, shape, bound):
    return _draw(shape, lambda: rng.uniform(-bound, bound, shape))


def _normal(rng: np.random.Generator, shape, std):
    return _draw(shape, lambda: std * rng.standard_normal(shape))


def _init_rng(rngs, seed, rng) -> np.random.Generator:
    """Host RNG for initialisation.

    Parameters are drawn with NumPy on the host: deterministic for a seed,
    independent of the mesh, and free of the per-shape compilation that eager
    ``jax.random`` calls cost (seconds for a small model on a CPU).
    """
    if rng is not None:
        return rng
    if rngs is not None:
        seed = int(jax.random.randint(rngs.params(), (), 0, 2**31 - 1))
    return np.random.default_rng(seed)


# --------------------------------------------------------------------------- #
# Modules (parameter holders with the original's names and shapes)
# --------------------------------------------------------------------------- #


class LayerNorm(nnx.Module):
    """LayerNorm over the embedding (eps 1e-6, biased two-pass variance)."""

    def __init__(self, num_features: int):
        self.scale = _param(jnp.ones((num_features,), jnp.float32), "embed")
        self.bias = _param(jnp.zeros((num_features,), jnp.float32), "embed")


class PatchEmbed(nnx.Module):
    """Conv(kernel = stride = patch) as patch-flatten + matmul; kernel HWIO."""

    def __init__(self, cfg: ModelConfig, rng: np.random.Generator):
        ph, pw = cfg.patch_size
        fan_in = cfg.in_channels * ph * pw
        bound = 1.0 / fan_in**0.5  # PyTorch Conv2d default init
        # kernel: [patch_row, patch_col, in_channel, embed] (torch OIHW transposed (2,3,1,0))
        self.kernel = _param(
            _uniform(rng, (ph, pw, cfg.in_channels, cfg.embed_dim), bound),
            "patch_row", "patch_col", "in_channel", "embed",
        )
        self.bias = _param(_uniform(rng, (cfg.embed_dim,), bound), "embed")


class SpectralFilter(nnx.Module):
    """AFNO2D weights, exactly the original's (re/im, block, in, out) layout."""

    def __init__(self, cfg: ModelConfig, rng: np.random.Generator):
        nb, d = cfg.num_blocks, cfg.block_size
        scale = 0.02  # the original: 0.02 * randn, biases included
        self.w1 = _param(_normal(rng, (2, nb, d, d), scale), "reim", "blocks", "block_in", "block_out")
        self.b1 = _param(_normal(rng, (2, nb, d), scale), "reim", "blocks", "block_out")
        self.w2 = _param(_normal(rng, (2, nb, d, d), scale), "reim", "blocks", "block_in", "block_out")
        self.b2 = _param(_normal(rng, (2, nb, d), scale), "reim", "blocks", "block_out")


class Dense(nnx.Module):
    """Linear layer with an (in, out) kernel (torch weight transposed)."""

    def __init__(self, rng: np.random.Generator, d_in: int, d_out: int, in_axis: str, out_axis: str,
                 bias_axis: str | None = None, use_bias: bool = True):
        self.kernel = _param(_trunc_normal(rng, (d_in, d_out)), in_axis, out_axis)
        self.bias = _param(jnp.zeros((d_out,), jnp.float32), bias_axis or out_axis) if use_bias else None


class Mlp(nnx.Module):
    """fc1 (column-parallel over ``channel``) -> exact GELU -> fc2 (row-parallel)."""

    def __init__(self, cfg: ModelConfig, rng: np.random.Generator):
        self.fc1 = Dense(rng, cfg.embed_dim, cfg.mlp_hidden, "embed_full", "mlp")
        # fc2's bias is added after the reduce-scatter, on the channel-sharded output
        self.fc2 = Dense(rng, cfg.mlp_hidden, cfg.embed_dim, "mlp", "embed_full", bias_axis="embed")


class Block(nnx.Module):
    """norm1 -> filter (+skip) -> +x -> norm2 -> mlp -> +x (double skip)."""

    def __init__(self, cfg: ModelConfig, rng: np.random.Generator):
        self.norm1 = LayerNorm(cfg.embed_dim)
        self.filter = SpectralFilter(cfg, rng)
        self.norm2 = LayerNorm(cfg.embed_dim)
        self.mlp = Mlp(cfg, rng)


class AFNONet(nnx.Module):
    """The FourCastNet backbone: ``model(x)`` with x ``[batch, lat, lon, in_channels]``.

    Returns ``[batch, lat, lon, out_channels]`` (normalised units; the full
    next state -- there is no model-level residual).
    """

    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs | None = None, seed: int = 0,
                 rng: np.random.Generator | None = None):
        rng = _init_rng(rngs, seed, rng)
        self.config = cfg
        lat, lon = cfg.token_grid
        self.patch_embed = PatchEmbed(cfg, rng)
        # pos_embed: [1, lat_tokens, lon_tokens, embed]; the original's (1, tokens, embed) reshaped
        self.pos_embed = _param(_trunc_normal(rng, (1, lat, lon, cfg.embed_dim)), "one", "lat", "lon", "embed")
        self.blocks = nnx.List([Block(cfg, rng) for _ in range(cfg.depth)])
        # The original owns a final LayerNorm but never calls it; kept for round-trips.
        self.norm = LayerNorm(cfg.embed_dim)
        ph, pw = cfg.patch_size
        self.head = Dense(rng, cfg.embed_dim, ph * pw * cfg.out_channels, "embed", "head_out", use_bias=False)

    def __call__(self, x):
        return apply_model(self, x)


class PrecipNet(nnx.Module):
    """AFNONet (20 -> 1) + circular-lon / zero-lat pad + 3x3 conv + ReLU.

    Output is ``log1p(tp / eps)`` (model spec §6), ``[batch, lat, lon, 1]``.
    """

    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs | None = None, seed: int = 0,
                 rng: np.random.Generator | None = None):
        rng = _init_rng(rngs, seed, rng)
        self.config = cfg
        self.backbone = AFNONet(_backbone_config(cfg), rng=rng)
        # conv kernel HWIO [3, 3, 1, 1]; PyTorch default init U(+-1/3) (fan_in 9)
        self.conv_kernel = _param(_uniform(rng, (3, 3, 1, 1), 1.0 / 3.0), "conv_row", "conv_col", "one", "out_channel")
        self.conv_bias = _param(_uniform(rng, (1,), 1.0 / 3.0), "out_channel")

    def __call__(self, x):
        return apply_model(self, x)


def _backbone_config(cfg: ModelConfig) -> ModelConfig:
    return dataclasses.replace(cfg, kind="backbone")


def build_model(cfg: ModelConfig, seed: int = 0) -> AFNONet | PrecipNet:
    """AFNONet for ``kind: backbone``, PrecipNet for ``kind: precip``."""
    return (PrecipNet if cfg.kind == "precip" else AFNONet)(cfg, seed=seed)


# --------------------------------------------------------------------------- #
# Parameters <-> pure trees
# --------------------------------------------------------------------------- #


def _is_var(v) -> bool:
    return isinstance(v, nnx.Variable)


def param_values_and_specs(model: nnx.Module, sizes: MeshSizes):
    """(tree of arrays, tree of PartitionSpecs) of the model's Params, same structure."""
    state = nnx.state(model, nnx.Param)
    values = nnx.to_pure_dict(state)
    specs = jax.tree.map(
        lambda v: logical_spec(v.get_metadata()["logical_axes"], sizes), state, is_leaf=_is_var
    )
    specs = nnx.to_pure_dict(specs)
    return values, specs


def param_shardings(model: nnx.Module, mesh) -> Any:
    """nnx.State of NamedShardings for every Param, by the logical rules.

    The spectral weights' layout follows the spectral layout the model will use
    on ``mesh`` (:func:`fcn_jax.parallel.mesh.model_sizes`).
    """
    from jax.sharding import NamedSharding

    sizes = model_sizes(mesh, model.config)
    state = nnx.state(model, nnx.Param)
    return jax.tree.map(
        lambda v: NamedSharding(mesh, logical_spec(v.get_metadata()["logical_axes"], sizes)),
        state,
        is_leaf=_is_var,
    )


def shard_model(model: nnx.Module, mesh) -> nnx.Module:
    """Place every parameter on ``mesh`` by the sharding rules (in place; returns model)."""
    shardings = param_shardings(model, mesh)
    state = nnx.state(model, nnx.Param)
    placed = jax.tree.map(
        lambda v, s: jax.device_put(v[...], s), state, shardings, is_leaf=_is_var
    )
    nnx.update(model, placed)
    return model


# --------------------------------------------------------------------------- #
# Forward pass
# --------------------------------------------------------------------------- #


def _matmul(x, kernel, dtype):
    """x: [..., d_in] @ kernel [d_in, d_out] with operands in ``dtype`` -> float32 [..., d_out].

    Computed as one 2-D matmul on ``[tokens, d_in]``. With the leading axes kept,
    XLA:CPU's backward of the dot (the kernel gradient contracts three batch-like
    axes) materialised transposed copies of the activations; the 2-D form gives
    plain GEMMs without them (the same products and sums).
    """
    lead = x.shape[:-1]
    x2 = x.reshape(-1, x.shape[-1])  # [tokens, d_in]
    y = jnp.dot(x2.astype(dtype), kernel.astype(dtype), preferred_element_type=jnp.float32)
    return y.reshape(*lead, kernel.shape[-1])


def _dense(x, kernel, bias, dtype):
    y = _matmul(x, kernel, dtype)
    if bias is not None:
        y = y + bias
    return y.astype(dtype)


def _block_local(p, x, cfg: ModelConfig, sizes: MeshSizes):
    """One AFNO block on local shards. x: [b, lat/Ph, lon/Pw, embed/Pc]."""
    dtype = x.dtype
    lat, lon = cfg.token_grid
    z = layer_norm(x, p["norm1"]["scale"], p["norm1"]["bias"], eps=LN_EPS, num_features=cfg.embed_dim, sizes=sizes)
    f = p["filter"]
    y = afno_filter(
        z, f["w1"], f["b1"], f["w2"], f["b2"],
        lat_tokens=lat, lon_tokens=lon, block_size=cfg.block_size,
        sparsity_threshold=cfg.sparsity_threshold,
        hard_thresholding_fraction=cfg.hard_thresholding_fraction, sizes=sizes,
    )  # = spectral(z) + z
    x = y + x  # first skip
    z = layer_norm(x, p["norm2"]["scale"], p["norm2"]["bias"], eps=LN_EPS, num_features=cfg.embed_dim, sizes=sizes)
    # Megatron MLP: gather channels -> column-parallel fc1 -> GELU -> row-parallel fc2 -> reduce-scatter
    z = gather_channels(z, sizes)  # [b, lat/Ph, lon/Pw, embed]
    h = _dense(z, p["mlp"]["fc1"]["kernel"], p["mlp"]["fc1"]["bias"], dtype)  # [.., mlp/Pc]
    h = gelu_exact(h)  # exact erf GELU, as the original (explicit derivative: see activations.py)
    h = _dense(h, p["mlp"]["fc2"]["kernel"], None, jnp.float32)  # partial sums [.., embed]
    h = reduce_scatter_channels(h, sizes)  # [.., embed/Pc]
    h = (h + p["mlp"]["fc2"]["bias"]).astype(dtype)  # bias once, after the reduction
    return (x + h).astype(dtype)  # second skip


def _backbone_local(p, x, cfg: ModelConfig, sizes: MeshSizes):
    """x: [b, H/Ph, W/Pw, in] pixels -> [b, H/Ph, W/Pw, out] pixels (local tiles)."""
    dtype = jnp.dtype(cfg.compute_dtype)
    ph, pw = cfg.patch_size
    b, hh, ww, cin = x.shape
    hl, wl = hh // ph, ww // pw
    # patchify: [b, hl, ph, wl, pw, cin] -> [b, hl, wl, ph*pw*cin] in (row, col, channel) order
    patches = x.reshape(b, hl, ph, wl, pw, cin).transpose(0, 1, 3, 2, 4, 5).reshape(b, hl, wl, ph * pw * cin)
    pe = p["patch_embed"]
    kernel = pe["kernel"].reshape(ph * pw * cin, -1)
    t = _dense(patches, kernel, pe["bias"], dtype)  # [b, hl, wl, embed/Pc]
    t = (t + p["pos_embed"]).astype(dtype)

    block_fn = functools.partial(_block_local, cfg=cfg, sizes=sizes)
    if cfg.remat:
        block_fn = jax.checkpoint(block_fn)
    if sizes.stage > 1 or is_stacked(p["blocks"]):
        # pipelined over `stage` (GPipe), or stacked blocks: tokens on the last stage, zeros elsewhere
        t = pipeline_blocks(block_fn, p["blocks"], t, sizes)
    else:
        for i in range(cfg.depth):
            t = block_fn(p["blocks"][i], t)

    # head: row-parallel over channel, partial sums reduced across `channel` (and across
    # `stage` when pipelined: only the last stage's are non-zero)
    feat = jnp.dot(t.astype(dtype), p["head"]["kernel"].astype(dtype), preferred_element_type=jnp.float32)
    feat = psum(feat, (CHANNEL, STAGE), sizes)  # [b, hl, wl, ph*pw*out]
    cout = feat.shape[-1] // (ph * pw)
    # un-patchify: feature (i*pw + j)*out + c of token (h, w) -> pixel (h*ph+i, w*pw+j, c)
    out = feat.reshape(b, hl, wl, ph, pw, cout).transpose(0, 1, 3, 2, 4, 5).reshape(b, hl * ph, wl * pw, cout)
    return out


def _precip_local(p, x, cfg: ModelConfig, sizes: MeshSizes):
    y = _backbone_local(p["backbone"], x, cfg, sizes)  # [b, H/Ph, W/Pw, 1]
    yp = halo_pad_lat_lon(y, sizes)  # [b, H/Ph+2, W/Pw+2, 1]
    k = p["conv_kernel"][:, :, 0, 0]
    hh, ww = y.shape[1], y.shape[2]
    out = p["conv_bias"][0] + sum(
        k[i, j] * yp[:, i : i + hh, j : j + ww, :] for i in range(3) for j in range(3)
    )  # 3x3 cross-correlation, 'valid' on the padded tile
    return jax.nn.relu(out)


def apply_model(model: AFNONet | PrecipNet, x, mesh=None):
    """Run the model on the mesh in context (or the one-device mesh).

    x: [batch, lat, lon, in_channels] -> [batch, lat, lon, out_channels], float32.
    """
    cfg: ModelConfig = model.config
    if mesh is None:
        mesh = current_mesh()
    if mesh is None:
        mesh = single_device_mesh()
    sizes = model_sizes(mesh, cfg, batch_size=x.shape[0])  # validated, spectral layout resolved
    if tuple(x.shape[1:3]) != tuple(cfg.img_size):
        raise ValueError(
            f"input has lat x lon = {tuple(x.shape[1:3])} but the model was built for img_size "
            f"{tuple(cfg.img_size)}; expected [batch, lat, lon, channel]"
        )
    if x.shape[3] != cfg.in_channels:
        raise ValueError(f"input has {x.shape[3]} channels, the model expects in_channels={cfg.in_channels}")

    values, specs = param_values_and_specs(model, sizes)
    spec_leaves, spec_tree = jax.tree.flatten(specs, is_leaf=lambda s: isinstance(s, P))
    fn = _sharded_forward(cfg, sizes, mesh, tuple(spec_leaves), spec_tree)
    return fn(values, x.astype(jnp.float32))


@functools.lru_cache(maxsize=64)
def _sharded_forward(cfg: ModelConfig, sizes: MeshSizes, mesh, spec_leaves, spec_tree):
    """jit(shard_map(local forward)), cached per (config, mesh, parameter layout).

    Jitting matters outside an enclosing ``jit``: an eager ``shard_map`` would
    dispatch every primitive separately. Inside a ``jit`` this one is inlined.
    """
    specs = jax.tree.unflatten(spec_tree, spec_leaves)
    image_spec = logical_image_spec(sizes)
    local_fn = _precip_local if cfg.kind == "precip" else _backbone_local
    bb_cfg = cfg if cfg.kind == "backbone" else _backbone_config(cfg)

    def local(p, xx):
        # one gradient reduction per parameter (see fcn_jax.parallel.ops.vary)
        p = jax.tree.map(lambda a: vary(a, sizes), p)
        return local_fn(p, xx, bb_cfg, sizes)

    fn = jax.shard_map(
        local,
        mesh=mesh,
        in_specs=(specs, image_spec),
        out_specs=image_spec,
    )
    return jax.jit(fn)


def logical_image_spec(sizes: MeshSizes) -> P:
    """IMAGE_SPEC with size-1 mesh axes dropped."""
    from fcn_jax.parallel.ops import spec_for_mesh

    return spec_for_mesh(IMAGE_SPEC, sizes)


def count_params(model_or_state) -> int:
    """Number of scalar parameters (works on abstract models/states too)."""
    state = model_or_state if isinstance(model_or_state, nnx.State) else nnx.state(model_or_state, nnx.Param)
    return sum(math.prod(v.shape) for v in jax.tree.leaves(state))
