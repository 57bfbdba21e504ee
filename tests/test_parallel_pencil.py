"""The pencil spectral layout: equal to one device, the all-to-alls it compiles to, and when it is chosen.

On the suite's 8 devices: the pencil layout forced on meshes the channel-block
layout could also run, and chosen automatically on meshes whose
``channel*height*width`` does not divide the AFNO blocks (6 = 1*3*2 devices for
8 blocks). The 16-device meshes of issue 12 run in a child process with its own
device count (the 8 here are fixed at import by conftest.py).
"""

import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest
from flax import nnx
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from fcn_jax.config import MeshConfig, ModelConfig
from fcn_jax.model.afnonet import AFNONet, param_shardings, shard_model
from fcn_jax.model.spectral import afno_filter
from fcn_jax.parallel.hlo import collective_counts, collective_shapes
from fcn_jax.parallel.mesh import (
    MeshError,
    MeshSizes,
    build_mesh,
    make_mesh,
    model_sizes,
    use_spectral_layout,
    validate_layout,
)
from tests.helpers import logged_losses, toy_loss_fn, world_overrides
from tests.helpers import max_rel as _max_rel

REPO = Path(__file__).resolve().parent.parent

# 8x16 tokens, 8 blocks of 8 channels, fraction 1 keeps 5 of 9 longitude bins and all 8 rows
CFG8 = ModelConfig(img_size=(32, 64), patch_size=(4, 4), in_channels=4, out_channels=4, embed_dim=64, depth=2,
                   mlp_ratio=2.0, num_blocks=8)
# 12x16 tokens, 8 blocks of 12 channels (divisible by 3), fraction 0.5: rows [4, 10) and 3 bins,
# so the pencil pads 6 rows to 8 over height=4 and 3 bins to 4 over width=2
CFG12 = ModelConfig(img_size=(48, 64), patch_size=(4, 4), in_channels=3, out_channels=3, embed_dim=96, depth=1,
                    mlp_ratio=2.0, num_blocks=8, hard_thresholding_fraction=0.5)
BATCH = 2
IMAGE = P("data", "height", "width", None)


_REFS = {}


def _reference(cfg):
    if cfg not in _REFS:
        model = AFNONet(cfg, seed=0)
        x = jax.random.normal(jax.random.key(1), (BATCH, *cfg.img_size, cfg.in_channels))
        graphdef, params = nnx.split(model, nnx.Param)
        loss = toy_loss_fn(graphdef)
        out = jax.jit(lambda p, xx: nnx.merge(graphdef, p)(xx))(params, x)
        gp, gx = jax.jit(jax.grad(loss, argnums=(0, 1)))(params, x)
        _REFS[cfg] = dict(x=x, out=np.asarray(out), gp=jax.device_get(nnx.to_pure_dict(gp)), gx=np.asarray(gx))
    return _REFS[cfg]


CASES = [
    # (config, mesh, requested layout): pencil forced where channel-block would also run ...
    (CFG8, (1, 2, 2, 2), "pencil"),
    (CFG8, (1, 1, 2, 4), "pencil"),
    pytest.param(CFG8, (2, 1, 1, 4), "pencil", marks=pytest.mark.slow),
    (CFG8, (1, 1, 1, 8), "pencil"),  # 5 bins padded to 8
    pytest.param(CFG8, (1, 8, 1, 1), "pencil", marks=pytest.mark.slow),  # no spatial split: no all-to-all
    (CFG12, (1, 1, 4, 2), "pencil"),  # rows and bins both padded
    # ... and chosen automatically where channel*height*width does not divide the 8 blocks
    (CFG12, (1, 1, 3, 2), "auto"),
    (CFG12, (1, 2, 3, 1), "auto"),
]


def _case_id(case):
    c, s, l = case.values if hasattr(case, "values") else case
    return f"{c.embed_dim}-{'x'.join(map(str, s))}-{l}"


@pytest.mark.parametrize("cfg,shape,layout", CASES, ids=[_case_id(c) for c in CASES])
def test_pencil_forward_and_every_gradient_equal_single_device(cfg, shape, layout):
    ref = _reference(cfg)
    mesh = make_mesh(shape)
    with jax.set_mesh(mesh), use_spectral_layout(layout):
        assert model_sizes(mesh, cfg).spectral_layout == "pencil"
        model = shard_model(AFNONet(cfg, seed=0), mesh)
        graphdef, params = nnx.split(model, nnx.Param)
        # spectral weights: blocks over `channel` only, replicated over height and width
        w1 = params["blocks"][0]["filter"]["w1"][...]
        assert w1.sharding.is_equivalent_to(NamedSharding(mesh, P(None, "channel")), 4), w1.sharding.spec
        x = jax.device_put(ref["x"], NamedSharding(mesh, IMAGE))
        loss = toy_loss_fn(graphdef)
        out = jax.jit(lambda p, xx: nnx.merge(graphdef, p)(xx))(params, x)
        grad_fn = jax.jit(jax.grad(loss, argnums=(0, 1)))
        gp, gx = grad_fn(params, x)
        hlo = grad_fn.lower(params, x).compile().as_text()

    assert _max_rel(out, ref["out"]) < 1e-5
    assert _max_rel(gx, ref["gx"]) < 1e-5
    got = jax.tree_util.tree_flatten_with_path(jax.device_get(nnx.to_pure_dict(gp)))[0]
    want = jax.tree.leaves(ref["gp"])
    assert len(got) == len(want)
    for (path, g), r in zip(got, want):
        assert _max_rel(g, r) < 1e-5, jax.tree_util.keystr(path)

    # pencil: 2 all-to-alls per live spatial axis per transform; forward + inverse transform,
    # forward + backward pass
    _, pc, ph, pw = shape
    counts = collective_counts(hlo)
    assert counts["all-to-all"] == cfg.depth * 8 * ((ph > 1) + (pw > 1)), counts
    assert counts["all-gather"] == cfg.depth * 2 * (pc > 1), counts
    assert counts["reduce-scatter"] == cfg.depth * 2 * (pc > 1), counts
    assert counts["collective-permute"] == 0, counts


def _filter_case(shape, layout):
    """Compiled forward spectral filter on ``shape`` and its inputs."""
    cfg = CFG8
    nb, d = cfg.num_blocks, cfg.block_size
    lat, lon = cfg.token_grid
    mesh = make_mesh(shape)
    sizes = validate_layout(MeshSizes.of(mesh), cfg, spectral_layout=layout)
    blocks = "channel" if layout == "pencil" else ("channel", "width", "height")
    w_spec, b_spec = P(None, blocks), P(None, blocks)
    tok = P("data", "height", "width", "channel")

    def local(z, w1, b1, w2, b2):
        return afno_filter(z, w1, b1, w2, b2, lat_tokens=lat, lon_tokens=lon, block_size=d,
                           sparsity_threshold=0.01, hard_thresholding_fraction=1.0, sizes=sizes)

    fn = jax.jit(jax.shard_map(local, mesh=mesh, in_specs=(tok, w_spec, b_spec, w_spec, b_spec), out_specs=tok))
    k = jax.random.split(jax.random.key(0), 5)
    z = jax.random.normal(k[0], (1, lat, lon, cfg.embed_dim))
    w1, w2 = (0.1 * jax.random.normal(kk, (2, nb, d, d)) for kk in k[1:3])
    b1, b2 = (0.1 * jax.random.normal(kk, (2, nb, d)) for kk in k[3:5])
    with jax.set_mesh(mesh):
        hlo = fn.lower(z, w1, b1, w2, b2).compile().as_text()
        out = fn(z, w1, b1, w2, b2)
    return hlo, np.asarray(out)


def test_filter_all_to_alls_follow_the_design():
    """Forward filter on (1, 1, 2, 4): 4 per live axis for pencil, 2 for channel-block, same result."""
    hlo_p, out_p = _filter_case((1, 1, 2, 4), "pencil")
    hlo_b, out_b = _filter_case((1, 1, 2, 4), "channel_block")
    assert collective_counts(hlo_p)["all-to-all"] == 8
    assert collective_counts(hlo_b)["all-to-all"] == 4
    np.testing.assert_allclose(out_p, out_b, rtol=0, atol=1e-5)
    # what each all-to-all moves (XLA:CPU writes a tiled all-to-all as a tuple of P pieces):
    # local activation [1, 8/2, 16/4, 64]; 5 longitude bins padded to 8; 8 latitude rows
    def moves(hlo):
        out = []
        for s in collective_shapes(hlo, "all-to-all"):
            pieces = re.findall(r"(f32|c64)\[([\d,]*)\]", s)
            out.append((pieces[0][0], len(pieces), sum(math.prod(map(int, d.split(","))) for _, d in pieces)))
        return sorted(out)

    assert moves(hlo_p) == sorted([
        ("f32", 4, 1 * 4 * 4 * 64),  # width: [lat/2, lon/4, C] -> [lat/2, lon, C/4], and back
        ("f32", 4, 1 * 4 * 4 * 64),
        ("c64", 4, 1 * 4 * 8 * 16),  # width: [lat/2, 8 bins, C/4] -> [lat/2, 8/4 bins, C], and back
        ("c64", 4, 1 * 4 * 8 * 16),
        ("c64", 2, 1 * 4 * 2 * 64),  # height: [lat/2, 2 bins, C] -> [lat, 2 bins, C/2], and back
        ("c64", 2, 1 * 4 * 2 * 64),
        ("c64", 2, 1 * 8 * 2 * 32),  # height: [8 rows, 2 bins, C/2] -> [8/2 rows, 2 bins, C] pencils, and back
        ("c64", 2, 1 * 8 * 2 * 32),
    ])
    assert moves(hlo_b) == sorted([
        ("f32", 4, 1 * 4 * 4 * 64), ("f32", 4, 1 * 4 * 4 * 64),  # width: channels for longitudes
        ("c64", 2, 1 * 4 * 5 * 16), ("c64", 2, 1 * 4 * 5 * 16),  # height: 5 bins, channels for latitudes
    ])


def test_auto_picks_channel_block_when_it_applies_and_pencil_otherwise():
    published = ModelConfig()  # 90x180 tokens, 768 channels, 8 blocks
    pick = lambda s: validate_layout(MeshSizes(*s), published).spectral_layout  # noqa: E731
    assert pick((1, 2, 2, 2)) == "channel_block"
    assert pick((1, 1, 2, 4)) == "channel_block"
    assert pick((1, 2, 2, 4)) == "pencil"  # 16 model-parallel devices for 8 blocks
    assert pick((1, 1, 3, 2)) == "pencil"  # 6 does not divide 8
    assert pick((1, 8, 2, 4)) == "pencil"  # 64 model-parallel devices
    # the sharding of the spectral weights follows the layout
    mesh = make_mesh((1, 1, 2, 4))
    with use_spectral_layout("pencil"):
        sharding = param_shardings(AFNONet(CFG8, seed=0), mesh)["blocks"][0]["filter"]["w1"]
    assert sharding.is_fully_replicated  # over height x width
    sharding = param_shardings(AFNONet(CFG8, seed=0), mesh)["blocks"][0]["filter"]["w1"]
    assert sharding.is_equivalent_to(NamedSharding(mesh, P(None, ("width", "height"))), 4)


def test_explicit_layouts_refused_with_what_would_work():
    published = ModelConfig()
    with pytest.raises(MeshError, match=r"= 16 does not divide the 8 AFNO blocks.*valid products: \[1, 2, 4, 8\]"):
        validate_layout(MeshSizes(1, 2, 2, 4), published, spectral_layout="channel_block")
    with pytest.raises(MeshError, match=r"height=5 does not divide the 768 channels .*valid height sizes: \[1, 2, 3, 6"):
        validate_layout(MeshSizes(1, 1, 5, 1), published, spectral_layout="pencil")
    with pytest.raises(MeshError, match=r"not a layout; valid: \['auto', 'channel_block', 'pencil'\]"):
        validate_layout(MeshSizes(1, 1, 1, 1), published, spectral_layout="slab")
    # the experiment's mesh section is checked before anything compiles
    with pytest.raises(MeshError, match="channel-block spectral layout gives each device whole blocks"):
        build_mesh(MeshConfig(data=1, channel=1, height=3, width=2, spectral_layout="channel_block"), CFG12,
                   batch_size=2, devices=jax.devices()[:6])
    mesh = build_mesh(MeshConfig(data=1, channel=1, height=3, width=2), CFG12, batch_size=2, devices=jax.devices()[:6])
    assert dict(mesh.shape)["height"] == 3
    from fcn_jax.config import ConfigError

    with pytest.raises(ConfigError, match="mesh.spectral_layout"):
        MeshConfig(spectral_layout="slab")


SMALL8 = ["--set", "model.img_size=[32,64]", "--set", "model.patch_size=[4,4]", "--set", "model.embed_dim=64",
          "--set", "model.depth=1", "--set", "model.mlp_ratio=2.0"]


@pytest.mark.slow
def test_self_test_passes_pencil_meshes_on_16_devices():
    """Issue 12's meshes, through the user-facing self-test, in a 16-device child process."""
    meshes = ["1,2,2,4", "1,4,2,2", "1,1,2,8", "2,2,2,2"]
    cmd = [sys.executable, "-m", "fcn_jax.check", "--experiment", "afno_backbone", "--cpu-devices", "16",
           "--json", *SMALL8]
    for m in meshes:
        cmd += ["--mesh", m]
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONPATH": str(REPO)}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=900, cwd=REPO, env=env)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    reports = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    assert [r["mesh"] for r in reports] == [[int(v) for v in m.split(",")] for m in meshes]
    for r in reports:
        d, c, h, w = r["mesh"]
        assert r["devices"] == 16
        assert r["spectral_layout"] == ("channel_block" if c * h * w <= 8 else "pencil")
        assert r["passed"] and r["forward_max_rel_err"] < 1e-5 and r["grad_max_rel_err"] < 1e-5, r
        per_axis = 8 if r["spectral_layout"] == "pencil" else 4  # depth 1, fwd+bwd
        assert r["collectives"]["all-to-all"] == per_axis * ((h > 1) + (w > 1)), r
    # an impossible 16-device mesh is refused with the sizes that would work
    bad = subprocess.run([sys.executable, "-m", "fcn_jax.check", "--experiment", "afno_backbone",
                          "--cpu-devices", "16", "--json", *SMALL8, "--mesh", "1,16,1,1"],
                         capture_output=True, text=True, timeout=300, cwd=REPO, env=env)
    assert bad.returncode == 2
    assert "valid channel sizes: [1, 2, 4, 8]" in json.loads(bad.stdout.splitlines()[-1])["error"]


@pytest.mark.slow
def test_training_resumes_from_channel_block_onto_pencil(world_store, tmp_path):
    """4 steps on (8,1,1,1), 4 more with the pencil layout on (2,1,2,2): same losses as 8 straight steps.

    The checkpoint holds global arrays; restoring it reshards the spectral weights from
    the channel-block layout (blocks over channel x width x height) to the pencil's.
    """
    from fcn_jax.config import load_experiment
    from fcn_jax.training.loop import train

    ov = world_overrides(world_store, validate_every=100)
    first = load_experiment("world", [*ov, "mesh.data=8"])
    train(first, tmp_path / "a", progress=False, max_steps=4)
    second = load_experiment("world", [*ov, "mesh.data=2", "mesh.height=2", "mesh.width=2",
                                       "mesh.spectral_layout=pencil"])
    summary = train(second, tmp_path / "a", progress=False)
    assert summary["start_step"] == 4 and summary["final_step"] == 8
    assert summary["spectral_layout"] == "pencil"
    assert train(first, tmp_path / "b", progress=False)["spectral_layout"] == "channel_block"
    a, b = logged_losses(tmp_path / "a"), logged_losses(tmp_path / "b")
    for step in range(1, 9):
        assert a[step] == pytest.approx(b[step], rel=2e-5), step
