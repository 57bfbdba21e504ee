"""The JAX model against the independent NumPy reference of the original (tests/reference_fcn.py)."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from fcn_jax.config import ModelConfig
from fcn_jax.convert import checkpoint_layout, model_from_params, state_dict_to_params
from fcn_jax.model.afnonet import AFNONet, PrecipNet, count_params
from tests import reference_fcn as ref

# Small configurations with the published structure: square and non-square token
# grids, odd longitude token counts, fractional hard thresholding (which keeps the
# *middle* latitude rows), and a truncation wider than the longitude half-spectrum.
CONFIGS = {
    "square_tokens": dict(img_size=(32, 32), patch_size=(4, 4), in_chans=3, out_chans=3, embed_dim=32,
                          depth=2, num_blocks=4),
    "fcn_like_4x8": dict(img_size=(32, 64), patch_size=(8, 8), in_chans=5, out_chans=5, embed_dim=48,
                         depth=2, num_blocks=8),
    "nonsquare_fraction": dict(img_size=(24, 80), patch_size=(4, 4), in_chans=4, out_chans=4, embed_dim=32,
                               depth=2, num_blocks=4, hard_thresholding_fraction=0.6),
    "odd_lon_fraction": dict(img_size=(20, 36), patch_size=(2, 4), in_chans=2, out_chans=2, embed_dim=16,
                             depth=3, num_blocks=2, hard_thresholding_fraction=0.45),
    "tall_grid": dict(img_size=(48, 16), patch_size=(4, 4), in_chans=3, out_chans=3, embed_dim=24,
                      depth=1, num_blocks=3, mlp_ratio=2.0),
}


def to_model_config(rc: ref.RefConfig, kind="backbone") -> ModelConfig:
    return ModelConfig(
        img_size=rc.img_size, patch_size=rc.patch_size, in_channels=rc.in_chans, out_channels=rc.out_chans,
        embed_dim=rc.embed_dim, depth=rc.depth, mlp_ratio=rc.mlp_ratio, num_blocks=rc.num_blocks,
        sparsity_threshold=rc.sparsity_threshold, hard_thresholding_fraction=rc.hard_thresholding_fraction,
        kind=kind,
    )


def rel_err(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.max(np.abs(a - b)) / np.max(np.abs(b)))


def nhwc(x_nchw):
    return np.ascontiguousarray(np.transpose(x_nchw, (0, 2, 3, 1)))


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_backbone_matches_reference(name):
    rc = ref.RefConfig(**CONFIGS[name])
    cfg = to_model_config(rc)
    sd = ref.random_state_dict(rc, "backbone", seed=1)
    model = model_from_params(state_dict_to_params(sd, cfg, "backbone"), cfg, "backbone")
    x = np.random.default_rng(2).standard_normal((2, rc.in_chans, *rc.img_size)).astype(np.float32)
    expected = ref.afnonet_forward(sd, x.astype(np.float64), rc)
    got = np.asarray(model(jnp.asarray(nhwc(x))))
    assert got.shape == (2, *rc.img_size, rc.out_chans)
    # within 1e-6 of the largest output magnitude: float32 rounding, not a semantic slip
    assert rel_err(got, nhwc(expected)) < 1e-6


@pytest.mark.parametrize("name", ["fcn_like_4x8", "nonsquare_fraction"])
def test_precipnet_matches_reference(name):
    rc = dataclasses.replace(ref.RefConfig(**CONFIGS[name]), out_chans=1)
    cfg = to_model_config(rc, kind="precip")
    sd = ref.random_state_dict(rc, "precip", seed=3)
    model = model_from_params(state_dict_to_params(sd, cfg, "precip"), cfg, "precip")
    x = np.random.default_rng(4).standard_normal((2, rc.in_chans, *rc.img_size)).astype(np.float32)
    expected = ref.precipnet_forward(sd, x.astype(np.float64), rc)
    got = np.asarray(model(jnp.asarray(nhwc(x))))
    assert got.shape == (2, *rc.img_size, 1)
    assert (got >= 0).all()
    assert rel_err(got, nhwc(expected)) < 1e-6


def test_tolerance_detects_tanh_gelu_and_wrong_eps():
    """The 1e-6 tolerance is tight enough to tell the exact GELU from the tanh one."""
    rc = ref.RefConfig(**CONFIGS["fcn_like_4x8"])
    sd = ref.random_state_dict(rc, "backbone", seed=1)
    x = np.random.default_rng(2).standard_normal((1, rc.in_chans, *rc.img_size))
    exact = ref.afnonet_forward(sd, x, rc)
    tanh = ref.afnonet_forward(sd, x, rc, gelu=ref.gelu_tanh)
    assert rel_err(tanh, exact) > 1e-5


def test_final_norm_is_unused_but_kept():
    rc = ref.RefConfig(**CONFIGS["square_tokens"])
    cfg = to_model_config(rc)
    sd = ref.random_state_dict(rc, "backbone", seed=5)
    x = jnp.asarray(np.random.default_rng(0).standard_normal((1, *rc.img_size, rc.in_chans)), jnp.float32)
    m1 = model_from_params(state_dict_to_params(sd, cfg, "backbone"), cfg, "backbone")
    sd2 = dict(sd, **{"norm.weight": sd["norm.weight"] * 3, "norm.bias": sd["norm.bias"] + 1})
    m2 = model_from_params(state_dict_to_params(sd2, cfg, "backbone"), cfg, "backbone")
    np.testing.assert_array_equal(np.asarray(m1(x)), np.asarray(m2(x)))
    np.testing.assert_array_equal(np.asarray(m2.norm.scale[...]), sd2["norm.weight"])


PUBLISHED = ModelConfig(img_size=(720, 1440), patch_size=(8, 8), in_channels=20, out_channels=20, embed_dim=768,
                        depth=12, mlp_ratio=4.0, num_blocks=8, sparsity_threshold=0.01,
                        hard_thresholding_fraction=1.0)


@pytest.mark.parametrize("kind,count,tensors", [("backbone", 74_691_840, 150), ("precip", 73_757_962, 152)])
def test_published_parameter_count_and_shapes(kind, count, tensors):
    cfg = dataclasses.replace(PUBLISHED, kind=kind, out_channels=1 if kind == "precip" else 20)
    abstract = nnx.eval_shape(lambda: (PrecipNet if kind == "precip" else AFNONet)(cfg))  # no 300 MB allocation
    assert count_params(abstract) == count
    # every original key maps to a Flax parameter of the converted shape
    flax_params = nnx.to_pure_dict(nnx.state(abstract, nnx.Param))
    layout = checkpoint_layout(cfg, kind)
    rc = ref.PUBLISHED_PRECIP if kind == "precip" else ref.PUBLISHED
    assert [(e.torch_key, e.torch_shape) for e in layout] == ref.state_dict_keys_and_shapes(rc, kind)
    assert len(layout) == tensors
    seen = 0
    for e in layout:
        node = flax_params
        for p in e.path:
            node = node[p]
        fake = np.broadcast_to(np.float32(0), e.torch_shape)  # zero-stride view, no allocation
        assert e.to_flax(fake).shape == node.shape, e.torch_key
        seen += 1
    assert seen == len(jax.tree.leaves(flax_params))


def test_config_properties_of_published_model():
    assert PUBLISHED.token_grid == (90, 180)
    assert PUBLISHED.kept_modes == 46
    assert PUBLISHED.block_size == 96 and PUBLISHED.mlp_hidden == 3072


def test_forward_rejects_wrong_input_shape():
    cfg = to_model_config(ref.RefConfig(**CONFIGS["square_tokens"]))
    model = AFNONet(cfg)
    with pytest.raises(ValueError, match="img_size"):
        model(jnp.zeros((1, 16, 32, 3)))
    with pytest.raises(ValueError, match="in_channels=3"):
        model(jnp.zeros((1, 32, 32, 4)))


def test_gradients_flow_to_every_used_parameter():
    cfg = to_model_config(ref.RefConfig(**CONFIGS["fcn_like_4x8"]))
    model = AFNONet(cfg, seed=0)
    x = jax.random.normal(jax.random.key(0), (2, *cfg.img_size, cfg.in_channels))
    grads = nnx.grad(lambda m: jnp.mean(m(x) ** 2))(model)
    flat = {".".join(map(str, k)): v for k, v in nnx.to_flat_state(grads)}
    for name, g in flat.items():
        norm = float(jnp.linalg.norm(g[...]))
        if name.startswith("norm."):
            assert norm == 0.0, name  # the unused final norm gets no gradient
        else:
            assert norm > 0.0, name


def test_bfloat16_compute_is_close_to_float32():
    rc = ref.RefConfig(**CONFIGS["fcn_like_4x8"])
    cfg = to_model_config(rc)
    sd = ref.random_state_dict(rc, "backbone", seed=1)
    params = state_dict_to_params(sd, cfg, "backbone")
    m32 = model_from_params(params, cfg, "backbone")
    m16 = model_from_params(params, dataclasses.replace(cfg, compute_dtype="bfloat16"), "backbone")
    x = jnp.asarray(np.random.default_rng(2).standard_normal((1, *rc.img_size, rc.in_chans)), jnp.float32)
    y32, y16 = np.asarray(m32(x)), np.asarray(m16(x))
    assert y16.dtype == np.float32
    err = rel_err(y16, y32)
    assert 1e-5 < err < 5e-2  # really ran in bf16, and still the same function


def test_remat_gives_identical_gradients():
    cfg = to_model_config(ref.RefConfig(**CONFIGS["square_tokens"]))
    x = jax.random.normal(jax.random.key(0), (1, *cfg.img_size, cfg.in_channels))
    loss = lambda m: jnp.mean(m(x) ** 2)  # noqa: E731
    g0 = nnx.grad(loss)(AFNONet(cfg, seed=0))
    g1 = nnx.grad(loss)(AFNONet(dataclasses.replace(cfg, remat=True), seed=0))
    for a, b in zip(jax.tree.leaves(g0), jax.tree.leaves(g1)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-7)
