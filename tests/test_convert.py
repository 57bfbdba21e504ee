"""Import/export of original FourCastNet PyTorch checkpoints, the converter CLI and Orbax restore.

Checkpoints are written here in the original's layout (model spec §8):
``{"iters", "epoch", "model_state": {"module." + key: tensor},
"optimizer_state_dict": ...}``, plus the stray ``ged`` key some released files
carry, with ``fcn_jax.torch_format.save`` (no PyTorch needed; that writer is
checked against ``torch.load`` in test_torch_format.py), and also read from
``tests/fixtures/afno_tiny*.ckpt``, real ``torch.save`` files. Outputs are
compared with the independent NumPy reference in ``tests/reference_fcn.py``.
"""

import collections
import dataclasses
import os
import pickle
import re
import sys
import textwrap
import zipfile
from collections import OrderedDict
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from fcn_jax import torch_format
from fcn_jax.checkpoints import package as checkpoint
from fcn_jax.config import FCN_CHANNELS
from fcn_jax.convert import (
    CheckpointFormatError,
    load_torch_checkpoint,
    main,
    save_torch_checkpoint,
    to_torch_state_dict,
)
from tests import reference_fcn as ref
from tests.fixtures import make_torch_fixtures as fx
from tests.test_model import nhwc, rel_err, to_model_config

FIXTURES = Path(__file__).resolve().parent / "fixtures"

# Non-square token grid (6 x 20) with a fractional hard_thresholding_fraction.
NONSQUARE = ref.RefConfig(img_size=(24, 80), patch_size=(4, 4), in_chans=4, out_chans=4, embed_dim=32, depth=2,
                          num_blocks=4, hard_thresholding_fraction=0.6)
NONSQUARE_PRECIP = dataclasses.replace(NONSQUARE, out_chans=1)
# Valid on the (data, channel, height, width) = (1, 2, 2, 2) mesh: 8 blocks, 4 x 8 tokens, embed/mlp even.
MESHABLE = ref.RefConfig(img_size=(16, 32), patch_size=(4, 4), in_chans=3, out_chans=3, embed_dim=32, depth=2,
                         mlp_ratio=2.0, num_blocks=8)


def _optimizer_state(sd):
    """A plain Adam-like optimizer state (ints, floats, tuples, tensors), as torch.optim writes it."""
    state = {
        i: {"step": np.array(17.0, np.float32), "exp_avg": np.zeros(v.shape, np.float32),
            "exp_avg_sq": np.full(v.shape, 1e-8, np.float32)}
        for i, v in enumerate(sd.values())
    }
    groups = [{"lr": 5e-4, "betas": (0.9, 0.999), "eps": 1e-8, "weight_decay": 0, "amsgrad": False,
               "params": list(range(len(sd)))}]
    return {"state": state, "param_groups": groups}


def write_original_ckpt(path, sd, *, layout="model_state", prefix="module.", ged=True, optimizer=True):
    """Write ``sd`` (torch-layout NumPy arrays) the way the original tooling did."""
    state = OrderedDict()
    items = list(sd.items())
    for i, (k, v) in enumerate(items):
        state[prefix + k] = np.array(v)
        if ged and i == len(items) // 2:  # the stray key, somewhere in the middle
            state[prefix + "ged"] = np.zeros(3, np.float32)
    if layout == "bare":
        obj = state
    else:
        obj = {"iters": 12345, "epoch": 7, layout: state}
        if optimizer:
            obj["optimizer_state_dict"] = _optimizer_state(sd)
    torch_format.save(obj, path)
    return path


def assert_matches_reference(model, sd, rc, kind, seed=0):
    x = np.random.default_rng(seed).standard_normal((2, rc.in_chans, *rc.img_size)).astype(np.float32)
    fwd = ref.precipnet_forward if kind == "precip" else ref.afnonet_forward
    expected = nhwc(fwd(sd, x.astype(np.float64), rc))
    got = np.asarray(model(jnp.asarray(nhwc(x))))
    assert got.shape == expected.shape == (2, *rc.img_size, rc.out_chans)
    err = rel_err(got, expected)
    assert err < 1e-6, err  # within 1e-6 of the largest output magnitude
    return got


@pytest.fixture(scope="module")
def backbone_sd():
    return ref.random_state_dict(NONSQUARE, "backbone", seed=11)


@pytest.fixture(scope="module")
def backbone_ckpt(tmp_path_factory, backbone_sd):
    return write_original_ckpt(tmp_path_factory.mktemp("ckpt") / "backbone.ckpt", backbone_sd)


# --------------------------------------------------------------------------- #
# Import: the original's format gives the original's outputs
# --------------------------------------------------------------------------- #


def test_backbone_checkpoint_matches_reference(backbone_ckpt, backbone_sd):
    cfg = to_model_config(NONSQUARE)
    assert cfg.token_grid == (6, 20) and cfg.hard_thresholding_fraction == 0.6
    model = load_torch_checkpoint(backbone_ckpt, cfg, "backbone")
    assert model.config.kind == "backbone"
    assert_matches_reference(model, backbone_sd, NONSQUARE, "backbone")


@pytest.mark.parametrize("name", ["afno_tiny.ckpt", "afno_tiny_legacy.ckpt"])
def test_real_torch_save_fixture_matches_reference(name):
    # written by torch.save (tests/fixtures/make_torch_fixtures.py), read here without PyTorch
    model = load_torch_checkpoint(FIXTURES / name, to_model_config(fx.TINY), "backbone")
    assert_matches_reference(model, fx.tiny_state_dict(), fx.TINY, "backbone", seed=4)
    out = to_torch_state_dict(model)
    for k, v in fx.tiny_state_dict().items():
        np.testing.assert_array_equal(out[k], v)


def test_half_precision_weights_are_widened(tmp_path, backbone_sd):
    import ml_dtypes

    for dtype in (np.float16, ml_dtypes.bfloat16, np.float64):
        low = OrderedDict((k, v.astype(dtype)) for k, v in backbone_sd.items())
        path = write_original_ckpt(tmp_path / "low.ckpt", low)
        out = to_torch_state_dict(load_torch_checkpoint(path, to_model_config(NONSQUARE), "backbone"))
        for k, v in low.items():
            assert out[k].dtype == np.float32
            np.testing.assert_array_equal(out[k], v.astype(np.float32))


def test_precip_checkpoint_matches_reference(tmp_path):
    sd = ref.random_state_dict(NONSQUARE_PRECIP, "precip", seed=12)
    assert list(sd)[0] == "backbone.pos_embed" and list(sd)[-2:] == ["conv.weight", "conv.bias"]
    path = write_original_ckpt(tmp_path / "precip.ckpt", sd)
    cfg = to_model_config(NONSQUARE_PRECIP, kind="precip")
    model = load_torch_checkpoint(path, cfg, "precip")
    got = assert_matches_reference(model, sd, NONSQUARE_PRECIP, "precip", seed=1)
    assert (got >= 0).all() and (got == 0).any() and (got > 0).any()  # the ReLU bites, but not everywhere
    # export gives back the original keys, order and values
    out = to_torch_state_dict(model)
    assert list(out) == list(sd)
    for k in sd:
        np.testing.assert_array_equal(out[k], sd[k])


@pytest.mark.parametrize(
    "layout,prefix,ged,optimizer",
    [
        ("state_dict", "module.", True, True),  # legacy key
        ("model_state", "", True, False),  # no DDP prefix
        ("bare", "module.", False, False),  # a bare state dict
        ("bare", "", True, False),
    ],
)
def test_accepted_layouts(tmp_path, backbone_sd, layout, prefix, ged, optimizer):
    path = write_original_ckpt(tmp_path / "x.ckpt", backbone_sd, layout=layout, prefix=prefix, ged=ged,
                               optimizer=optimizer)
    model = load_torch_checkpoint(path, to_model_config(NONSQUARE), "backbone")
    out = to_torch_state_dict(model)
    assert list(out) == list(backbone_sd)
    for k, v in backbone_sd.items():
        np.testing.assert_array_equal(out[k], v)


def test_export_equals_original_exactly_and_in_order(backbone_ckpt, backbone_sd):
    model = load_torch_checkpoint(backbone_ckpt, to_model_config(NONSQUARE), "backbone")
    out = to_torch_state_dict(model)
    assert isinstance(out, OrderedDict)
    # the original's state_dict() order, 'module.' and 'ged' dropped
    original_keys = [k[len("module."):] for k in torch_format.load(backbone_ckpt)["model_state"]]
    assert list(out) == [k for k in original_keys if k != "ged"] == list(backbone_sd)
    assert list(out) == [k for k, _ in ref.state_dict_keys_and_shapes(NONSQUARE, "backbone")]
    for k, v in backbone_sd.items():
        assert out[k].dtype == np.float32 and out[k].shape == v.shape, k
        np.testing.assert_array_equal(out[k], v)


@pytest.mark.parametrize("ddp_prefix", [True, False])
def test_save_then_load_torch_checkpoint(tmp_path, backbone_ckpt, backbone_sd, ddp_prefix):
    cfg = to_model_config(NONSQUARE)
    model = load_torch_checkpoint(backbone_ckpt, cfg, "backbone")
    path = tmp_path / "exported.ckpt"
    save_torch_checkpoint(model, path, ddp_prefix=ddp_prefix)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["exported.ckpt"]  # no temp file left
    raw = torch_format.load(path)
    prefix = "module." if ddp_prefix else ""
    assert raw["iters"] == 0 and raw["epoch"] == 0
    assert list(raw["model_state"]) == [prefix + k for k in backbone_sd]
    for k, v in backbone_sd.items():
        assert raw["model_state"][prefix + k].dtype == np.float32
        np.testing.assert_array_equal(raw["model_state"][prefix + k], v)
    again = load_torch_checkpoint(path, cfg, "backbone")
    out = to_torch_state_dict(again)
    for k, v in backbone_sd.items():
        np.testing.assert_array_equal(out[k], v)
    assert_matches_reference(again, backbone_sd, NONSQUARE, "backbone", seed=3)


# --------------------------------------------------------------------------- #
# Error paths
# --------------------------------------------------------------------------- #


def _shape(s):
    return re.escape(str(tuple(s)))


def test_missing_key_names_key_and_shape(tmp_path, backbone_sd):
    sd = OrderedDict((k, v) for k, v in backbone_sd.items() if k != "blocks.1.filter.w2")
    path = write_original_ckpt(tmp_path / "m.ckpt", sd)
    with pytest.raises(CheckpointFormatError,
                       match=re.escape(str(path)) + r"[\s\S]*missing key 'blocks\.1\.filter\.w2'.*" + _shape((2, 4, 8, 8))):
        load_torch_checkpoint(path, to_model_config(NONSQUARE), "backbone")


def test_extra_key_names_key_and_shape(tmp_path, backbone_sd):
    sd = OrderedDict(backbone_sd)
    sd["blocks.2.norm1.weight"] = np.ones(32, np.float32)  # a block the config does not have
    path = write_original_ckpt(tmp_path / "e.ckpt", sd)
    with pytest.raises(CheckpointFormatError, match=r"unexpected key 'blocks\.2\.norm1\.weight'.*" + _shape((32,))):
        load_torch_checkpoint(path, to_model_config(NONSQUARE), "backbone")


def test_shape_mismatch_names_key_and_both_shapes(tmp_path, backbone_sd):
    path = write_original_ckpt(tmp_path / "s.ckpt", backbone_sd)
    cfg = dataclasses.replace(to_model_config(NONSQUARE), in_channels=5, out_channels=5)
    with pytest.raises(CheckpointFormatError) as e:
        load_torch_checkpoint(path, cfg, "backbone")
    msg = str(e.value)
    assert re.search(r"'patch_embed\.proj\.weight'.*" + _shape((32, 4, 4, 4)) + ".*" + _shape((32, 5, 4, 4)), msg)
    assert re.search(r"'head\.weight'.*" + _shape((64, 32)) + ".*" + _shape((80, 32)), msg)
    # a backbone checkpoint is not a PrecipNet
    with pytest.raises(CheckpointFormatError, match=r"missing key 'backbone\.pos_embed'.*" + _shape((1, 120, 32))):
        load_torch_checkpoint(path, to_model_config(NONSQUARE_PRECIP, kind="precip"), "precip")


def test_saved_checkpoint_loads_in_torch(tmp_path, backbone_ckpt, backbone_sd):
    torch = pytest.importorskip("torch")
    model = load_torch_checkpoint(backbone_ckpt, to_model_config(NONSQUARE), "backbone")
    path = tmp_path / "exported.ckpt"
    save_torch_checkpoint(model, path)
    raw = torch.load(path, map_location="cpu", weights_only=True)  # what the original's loader does
    assert list(raw["model_state"]) == ["module." + k for k in backbone_sd]
    for k, v in backbone_sd.items():
        assert raw["model_state"]["module." + k].dtype == torch.float32
        np.testing.assert_array_equal(raw["model_state"]["module." + k].numpy(), v)


def test_torch_save_checkpoint_loads(tmp_path, backbone_sd):
    torch = pytest.importorskip("torch")
    state = OrderedDict(("module." + k, torch.from_numpy(v)) for k, v in backbone_sd.items())
    path = tmp_path / "torch.ckpt"
    torch.save({"iters": 1, "epoch": 2, "model_state": state}, path)
    out = to_torch_state_dict(load_torch_checkpoint(path, to_model_config(NONSQUARE), "backbone"))
    for k, v in backbone_sd.items():
        np.testing.assert_array_equal(out[k], v)


class _Canary:
    """Unpickling this runs ``os.mkdir(marker)``: proof that pickled code executed."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (os.mkdir, (self.marker,))


def _counter_fn():  # a module-level function, pickled by reference
    return 0


@pytest.mark.parametrize("payload", ["canary", "deque", "function"])
def test_pickled_objects_are_refused_and_never_run(tmp_path, backbone_sd, payload):
    marker = tmp_path / "code_ran"
    obj, name = {"canary": (_Canary(marker), f"{os.mkdir.__module__}.mkdir"),
                 "deque": (collections.deque([1, 2]), "collections.deque"),
                 "function": (_counter_fn, f"{__name__}._counter_fn")}[payload]
    path = tmp_path / "evil.ckpt"
    with zipfile.ZipFile(path, "w") as zf:  # torch.save's layout; the object sits in the optimizer state
        evil = {"iters": 0, "epoch": 0, "model_state": {}, "optimizer_state_dict": {"extra": obj}}
        zf.writestr("evil/data.pkl", pickle.dumps(evil, protocol=2))
        zf.writestr("evil/version", "3\n")
    with pytest.raises(CheckpointFormatError, match=re.escape(str(path)) + f".*refused.*'{re.escape(name)}'"):
        load_torch_checkpoint(path, to_model_config(NONSQUARE), "backbone")
    assert not marker.exists()
    if payload == "canary":  # the payload is live: unpickling it unsafely would have run it
        live = tmp_path / "live"
        pickle.loads(pickle.dumps(_Canary(live)))
        assert live.is_dir()


def test_optimizer_state_with_plain_data_is_accepted(tmp_path, backbone_sd):
    path = write_original_ckpt(tmp_path / "ok.ckpt", backbone_sd)
    ckpt = torch_format.load(path)
    assert ckpt["optimizer_state_dict"]["param_groups"][0]["betas"] == (0.9, 0.999)
    out = to_torch_state_dict(load_torch_checkpoint(path, to_model_config(NONSQUARE), "backbone"))
    np.testing.assert_array_equal(out["head.weight"], backbone_sd["head.weight"])


def test_not_a_checkpoint(tmp_path):
    junk = tmp_path / "junk.ckpt"
    junk.write_bytes(b"this is not a torch file")
    with pytest.raises(CheckpointFormatError, match=re.escape(str(junk))):
        load_torch_checkpoint(junk, to_model_config(NONSQUARE), "backbone")
    nodict = tmp_path / "list.ckpt"
    torch_format.save([np.zeros(2, np.float32)], nodict)
    with pytest.raises(CheckpointFormatError, match=re.escape(str(nodict)) + ".*expected a dict"):
        load_torch_checkpoint(nodict, to_model_config(NONSQUARE), "backbone")
    nostate = tmp_path / "nostate.ckpt"
    torch_format.save({"iters": 1, "epoch": 2}, nostate)
    with pytest.raises(CheckpointFormatError, match=r"model_state.*state_dict"):
        load_torch_checkpoint(nostate, to_model_config(NONSQUARE), "backbone")


def test_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError, match=re.escape(str(tmp_path / "nope.ckpt"))):
        load_torch_checkpoint(tmp_path / "nope.ckpt", to_model_config(NONSQUARE), "backbone")


def test_bad_kind(backbone_ckpt):
    with pytest.raises(ValueError, match="backbone.*precip"):
        load_torch_checkpoint(backbone_ckpt, to_model_config(NONSQUARE), "wind")


def test_without_torch_import_and_export_work(monkeypatch, backbone_ckpt, backbone_sd, tmp_path):
    monkeypatch.setitem(sys.modules, "torch", None)  # `import torch` now raises ImportError
    model = load_torch_checkpoint(backbone_ckpt, to_model_config(NONSQUARE), "backbone")
    save_torch_checkpoint(model, tmp_path / "out.ckpt")
    out = to_torch_state_dict(load_torch_checkpoint(tmp_path / "out.ckpt", to_model_config(NONSQUARE), "backbone"))
    for k, v in backbone_sd.items():
        np.testing.assert_array_equal(out[k], v)


# --------------------------------------------------------------------------- #
# CLI -> Orbax -> load_model (one device and an 8-device mesh)
# --------------------------------------------------------------------------- #


def _experiment_yaml(tmp_path, rc):
    channels = ", ".join(FCN_CHANNELS[: rc.in_chans])
    path = tmp_path / "tiny.yaml"
    path.write_text(textwrap.dedent(f"""\
        base: afno_backbone
        name: tiny
        model:
          img_size: [{rc.img_size[0]}, {rc.img_size[1]}]
          patch_size: [{rc.patch_size[0]}, {rc.patch_size[1]}]
          in_channels: {rc.in_chans}
          out_channels: {rc.out_chans}
          embed_dim: {rc.embed_dim}
          depth: {rc.depth}
          mlp_ratio: {rc.mlp_ratio}
          num_blocks: {rc.num_blocks}
          sparsity_threshold: {rc.sparsity_threshold}
          hard_thresholding_fraction: {rc.hard_thresholding_fraction}
        data:
          channels: [{channels}]
        """))
    return path


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    """The CLI run once on a mesh-compatible tiny model: (out dir, state dict, ckpt, yaml)."""
    tmp = tmp_path_factory.mktemp("cli")
    sd = ref.random_state_dict(MESHABLE, "backbone", seed=21)
    ckpt = write_original_ckpt(tmp / "backbone.ckpt", sd)
    yaml_path = _experiment_yaml(tmp, MESHABLE)
    out = tmp / "converted"
    assert main([str(ckpt), "--experiment", str(yaml_path), "--out", str(out)]) == 0
    return out, sd, ckpt, yaml_path


def test_cli_writes_orbax_checkpoint_that_load_model_restores(converted, capsys):
    out, sd, ckpt, _ = converted
    assert (out / "model.json").is_file() and (out / "params").is_dir()
    assert not list(out.parent.glob("converted*tmp*"))
    model = checkpoint.load_model(out)
    assert model.config == to_model_config(MESHABLE)
    exported = to_torch_state_dict(model)
    assert list(exported) == list(sd)
    for k, v in sd.items():
        np.testing.assert_array_equal(exported[k], v)
    direct = load_torch_checkpoint(ckpt, to_model_config(MESHABLE), "backbone")
    x = jnp.asarray(np.random.default_rng(5).standard_normal((2, *MESHABLE.img_size, MESHABLE.in_chans)),
                    jnp.float32)
    np.testing.assert_array_equal(np.asarray(model(x)), np.asarray(direct(x)))
    assert_matches_reference(model, sd, MESHABLE, "backbone", seed=6)


def test_cli_refuses_existing_out(converted, capsys):
    out, _, ckpt, yaml_path = converted
    before = sorted(p.relative_to(out) for p in out.rglob("*"))
    assert main([str(ckpt), "--experiment", str(yaml_path), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "error" in err and str(out) in err and "already exists" in err
    assert sorted(p.relative_to(out) for p in out.rglob("*")) == before


def test_cli_failures_leave_no_directory(tmp_path, converted, capsys, monkeypatch):
    _, sd, ckpt, yaml_path = converted
    # a checkpoint that does not match the experiment: exit 2, message, nothing written
    bad = write_original_ckpt(tmp_path / "bad.ckpt", OrderedDict((k, v) for k, v in sd.items() if k != "head.weight"))
    out = tmp_path / "out1"
    assert main([str(bad), "--experiment", str(yaml_path), "--out", str(out)]) == 2
    assert "missing key 'head.weight'" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == [bad]
    # an unknown experiment / a missing checkpoint: same
    assert main([str(ckpt), "--experiment", "no_such_experiment", "--out", str(out)]) == 2
    assert "no_such_experiment" in capsys.readouterr().err
    assert main([str(tmp_path / "none.ckpt"), "--experiment", str(yaml_path), "--out", str(out)]) == 2
    assert "none.ckpt" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == [bad]
    # a malicious pickle (a real torch.save file): refused by name, nothing run, nothing written
    monkeypatch.chdir(tmp_path)
    assert main([str(FIXTURES / "evil_exec.ckpt"), "--experiment", str(yaml_path), "--out", str(out)]) == 2
    assert "refused to load global 'builtins.exec'" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == [bad]

    # a failure while writing (after Orbax wrote the parameters): no partial directory stays behind
    def boom(cfg):
        raise OSError("disk full")

    monkeypatch.setattr(checkpoint, "_model_dict", boom)
    with pytest.raises(OSError, match="disk full"):
        main([str(ckpt), "--experiment", str(yaml_path), "--out", str(out)])
    assert list(tmp_path.iterdir()) == [bad]


def test_load_model_onto_an_8_device_mesh(converted, devices):
    from fcn_jax.parallel.mesh import make_mesh

    out, sd, _, _ = converted
    single = checkpoint.load_model(out)
    mesh = make_mesh((1, 2, 2, 2))
    sharded = checkpoint.load_model(out, mesh=mesh)
    # parameters are laid out over the mesh, not replicated on one device
    w1 = sharded.blocks[0].filter.w1[...]
    fc1 = sharded.blocks[0].mlp.fc1.kernel[...]
    pos = sharded.pos_embed[...]
    for arr in (w1, fc1, pos):
        assert isinstance(arr.sharding, NamedSharding) and arr.sharding.mesh == mesh
        assert len(arr.sharding.device_set) == 8
    assert any(not arr.sharding.is_fully_replicated for arr in (w1, fc1, pos))
    assert w1.sharding.shard_shape(w1.shape) != w1.shape  # AFNO blocks split over the devices
    np.testing.assert_array_equal(np.asarray(w1), sd["blocks.0.filter.w1"])

    x = np.random.default_rng(7).standard_normal((2, *MESHABLE.img_size, MESHABLE.in_chans)).astype(np.float32)
    expected = np.asarray(single(jnp.asarray(x)))
    with jax.set_mesh(mesh):
        xs = jax.device_put(x, NamedSharding(mesh, P("data", "height", "width", None)))
        got = sharded(xs)
    assert got.shape == expected.shape
    assert rel_err(np.asarray(got), expected) < 1e-5
