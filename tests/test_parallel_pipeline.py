"""Layer pipelining over the `stage` mesh axis: equal to one device, the schedule's collectives, refusals.

On the suite's 8 devices: a pipelined (1,1,2,2) x 2-stage mesh with the blocks
stacked over `stage` (the layout training stores), and the refusals. The
16-device meshes of issue 12 -- (2,1,2,2) x 2 and (1,2,2,1) x 4 stages -- run
through the self-test in a child process with its own device count.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from fcn_jax.config import ConfigError, MeshConfig, ModelConfig, load_experiment
from fcn_jax.model.afnonet import AFNONet, shard_model
from fcn_jax.parallel.hlo import collective_counts
from fcn_jax.parallel.mesh import (
    MeshError,
    MeshSizes,
    bubble_fraction,
    build_mesh,
    make_mesh,
    model_sizes,
    resolve_shape,
    use_microbatches,
    validate_layout,
)
from fcn_jax.parallel.pipeline import stack_blocks, stack_model, unstack_model
from tests.helpers import logged_losses, toy_loss_fn, world_overrides
from tests.helpers import max_rel as _max_rel

REPO = Path(__file__).resolve().parent.parent

# 8x16 tokens, 8 blocks of 8 channels, 2 layers
CFG = ModelConfig(img_size=(32, 64), patch_size=(4, 4), in_channels=4, out_channels=4, embed_dim=64, depth=2,
                  mlp_ratio=2.0, num_blocks=8)
BATCH = 4
IMAGE = P("data", "height", "width", None)


_REF = {}


def _reference():
    if not _REF:
        model = AFNONet(CFG, seed=0)
        x = jax.random.normal(jax.random.key(1), (BATCH, *CFG.img_size, CFG.in_channels))
        graphdef, params = nnx.split(model, nnx.Param)
        out = jax.jit(lambda p, xx: nnx.merge(graphdef, p)(xx))(params, x)
        gp, gx = jax.jit(jax.grad(toy_loss_fn(graphdef), argnums=(0, 1)))(params, x)
        gp = jax.device_get(nnx.to_pure_dict(gp))
        _REF.update(x=x, out=np.asarray(out), gp=gp, gx=np.asarray(gx))
    return _REF


def _run(shape, stage, microbatches, stacked):
    ref = _reference()
    mesh = make_mesh(shape, stage=stage)
    with jax.set_mesh(mesh), use_microbatches(microbatches):
        sizes = model_sizes(mesh, CFG, BATCH)
        model = AFNONet(CFG, seed=0)
        if stacked:
            stack_model(model)
        model = shard_model(model, mesh)
        graphdef, params = nnx.split(model, nnx.Param)
        x = jax.device_put(ref["x"], NamedSharding(mesh, IMAGE))
        out = jax.jit(lambda p, xx: nnx.merge(graphdef, p)(xx))(params, x)
        grad_fn = jax.jit(jax.grad(toy_loss_fn(graphdef), argnums=(0, 1)))
        gp, gx = grad_fn(params, x)
        hlo = grad_fn.lower(params, x).compile().as_text()
    return sizes, params, out, jax.device_get(nnx.to_pure_dict(gp)), gx, collective_counts(hlo)


def _assert_equal_to_reference(out, gp, gx, stacked):
    ref = _reference()
    want = dict(ref["gp"])
    if stacked:
        want["blocks"] = jax.device_get(stack_blocks(want["blocks"]))
    assert _max_rel(out, ref["out"]) < 1e-5
    assert _max_rel(gx, ref["gx"]) < 1e-5
    got = jax.tree_util.tree_flatten_with_path(gp)[0]
    want_leaves = jax.tree_util.tree_flatten_with_path(want)[0]
    assert [p for p, _ in got] == [p for p, _ in want_leaves]
    for (path, g), (_, r) in zip(got, want_leaves):
        assert _max_rel(g, r) < 1e-5, jax.tree_util.keystr(path)


def test_stacked_blocks_split_over_stage_equal_one_device():
    """(1,1,2,2) x 2 stages, 2 microbatches of 2 samples: forward, input and every parameter gradient."""
    sizes, params, out, gp, gx, counts = _run((1, 1, 2, 2), 2, 2, stacked=True)
    assert (sizes.stage, sizes.microbatches) == (2, 2)
    # each stage stores only its own block: the stacked layer axis is split over `stage`
    w1 = params["blocks"]["filter"]["w1"][...]
    assert w1.shape == (2, 2, 8, 8, 8)
    assert w1.sharding.spec[0] == "stage"
    assert {s.data.shape[0] for s in w1.addressable_shards} == {1}
    _assert_equal_to_reference(out, gp, gx, stacked=True)
    # the schedule: one ppermute over `stage` per tick, forward and backward (inside the tick loops);
    # the blocks' all-to-alls: 2 per transform and live spatial axis, 2 transforms, in the forward,
    # the backward and the backward's recomputation of each tick's stage (GPipe re-materialisation)
    assert counts["collective-permute"] == 2, counts
    assert counts["all-to-all"] == 2 * 3 * 2, counts
    assert counts["all-gather"] == 0 and counts["reduce-scatter"] == 0, counts


@pytest.mark.slow
def test_canonical_blocks_replicated_over_stage_equal_one_device():
    """Per-block Params (replicated over stage) on (2,1,2,1) x 2 stages: equal; 4 stages for 2 layers: refused."""
    with pytest.raises(MeshError, match=r"stage=4 does not divide the model's depth 2.*valid stage counts: \[1, 2\]"):
        model_sizes(make_mesh((2, 1, 1, 1), stage=4), CFG, BATCH)
    sizes, _, out, gp, gx, counts = _run((2, 1, 2, 1), 2, 0, stacked=False)
    assert sizes.microbatches == 2  # automatic: one sample per microbatch, 4 samples / data 2
    _assert_equal_to_reference(out, gp, gx, stacked=False)
    assert counts["collective-permute"] == 2, counts


def test_stack_and_unstack_model_round_trip():
    model = AFNONet(CFG, seed=0)
    before = jax.device_get(nnx.to_pure_dict(nnx.state(model, nnx.Param)))
    stack_model(model)
    state = nnx.state(model, nnx.Param)
    w1 = state["blocks"]["filter"]["w1"]
    assert w1.shape == (CFG.depth, 2, CFG.num_blocks, CFG.block_size, CFG.block_size)
    assert w1.get_metadata()["logical_axes"] == ("layers", "reim", "blocks", "block_in", "block_out")
    unstack_model(model)
    after = jax.device_get(nnx.to_pure_dict(nnx.state(model, nnx.Param)))
    assert jax.tree.structure(before) == jax.tree.structure(after)
    for a, b in zip(jax.tree.leaves(before), jax.tree.leaves(after)):
        np.testing.assert_array_equal(a, b)


def test_bubble_fraction():
    assert bubble_fraction(1, 8) == 0.0
    assert bubble_fraction(2, 2) == pytest.approx(1 / 3)
    assert bubble_fraction(4, 1) == pytest.approx(3 / 4)
    assert bubble_fraction(4, 12) == pytest.approx(3 / 15)


def test_invalid_pipelines_refused_with_the_sizes_that_would_work():
    deep = ModelConfig(depth=12)
    with pytest.raises(MeshError, match=r"stage=5 does not divide the model's depth 12.*valid stage counts: "
                                        r"\[1, 2, 3, 4, 6, 12\]"):
        validate_layout(MeshSizes(1, 1, 1, 1, stage=5), deep)
    with pytest.raises(MeshError, match=r"train.microbatches=3 does not divide the 4 samples per data shard "
                                        r"\(global batch 8 / data 2\); valid microbatch counts: \[1, 2, 4\]"):
        validate_layout(MeshSizes(2, 1, 1, 1, stage=2), deep, batch_size=8, microbatches=3)
    with pytest.raises(MeshError, match=r"mesh.stage=3 does not divide the 8 available devices; "
                                        r"valid stage counts: \[1, 2, 4, 8\]"):
        resolve_shape((1, 1, 2, 1), 8, stage=3)
    with pytest.raises(MeshError, match=r"needs 8 devices but 4 are available per pipeline stage"):
        resolve_shape((2, 1, 2, 2), 8, stage=2)
    # automatic microbatches: the samples per data shard
    assert validate_layout(MeshSizes(2, 1, 1, 1, stage=2), deep, batch_size=8).microbatches == 4
    # the experiment is checked when it is loaded ...
    with pytest.raises(ConfigError, match=r"mesh.stage: 5 pipeline stages do not divide the model's depth 12"):
        load_experiment("afno_backbone", ["mesh.stage=5"])
    with pytest.raises(ConfigError, match=r"train.microbatches: 5 does not divide the batch of 64"):
        load_experiment("afno_backbone", ["train.microbatches=5"])
    # ... and its mesh before anything compiles; -1 takes the devices left per stage
    mesh = build_mesh(MeshConfig(data=-1, height=2, stage=2), CFG, batch_size=4)
    assert dict(mesh.shape) == {"stage": 2, "data": 2, "channel": 1, "height": 2, "width": 1}
    with use_microbatches(3), pytest.raises(MeshError, match=r"valid microbatch counts: \[1, 2\]"):
        build_mesh(MeshConfig(data=-1, height=2, stage=2), CFG, batch_size=4)
    # without pipelining the mesh is exactly the four-axis one
    assert build_mesh(MeshConfig(data=-1), CFG, batch_size=8).axis_names == ("data", "channel", "height", "width")


SMALL = ["--set", "model.img_size=[32,64]", "--set", "model.patch_size=[4,4]", "--set", "model.embed_dim=64",
         "--set", "model.depth=4", "--set", "model.mlp_ratio=2.0"]


@pytest.mark.slow
def test_self_test_passes_pipelined_meshes_on_16_devices():
    """Issue 12's pipelined meshes through the self-test, in a 16-device child process."""
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONPATH": str(REPO)}
    base = [sys.executable, "-m", "fcn_jax.check", "--experiment", "afno_backbone", "--cpu-devices", "16",
            "--json", *SMALL]
    cases = [("2,1,2,2", 2, 0), ("1,2,2,1", 4, 2)]  # (mesh, stages, microbatches)
    for mesh, stage, micro in cases:
        cmd = [*base, "--set", f"mesh.stage={stage}", "--set", f"train.microbatches={micro}", "--mesh", mesh]
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=900, cwd=REPO, env=env)
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
        r = json.loads([line for line in proc.stdout.splitlines() if line.startswith("{")][-1])
        assert r["mesh"] == [int(v) for v in mesh.split(",")] and r["stage"] == stage
        assert r["devices"] == 16
        assert r["passed"] and r["forward_max_rel_err"] < 1e-5 and r["grad_max_rel_err"] < 1e-5, r
        assert r["microbatches"] == 2  # default batch: two samples per data shard
        assert r["bubble_fraction"] == pytest.approx((stage - 1) / (2 + stage - 1))
        assert r["collectives"]["collective-permute"] == 2, r
    # a stage count that does not divide the depth is refused with the counts that would
    bad = subprocess.run([*base, "--set", "mesh.stage=3", "--mesh", "1,1,1,1"],
                         capture_output=True, text=True, timeout=300, cwd=REPO, env=env)
    assert bad.returncode == 2
    assert "valid: [1, 2, 4]" in json.loads(bad.stdout.splitlines()[-1])["error"]


def _train_state(model, mesh):
    import optax

    from fcn_jax.training.step import TrainState, init_opt_state

    model = shard_model(model, mesh)
    _, params = nnx.split(model, nnx.Param)
    tx = optax.adam(1e-3)
    opt_state = init_opt_state(tx, params)
    # one Adam step with the parameters as gradients: non-trivial moments to carry over
    _, opt_state = jax.jit(tx.update)(params, opt_state, params)
    return TrainState(params=params, opt_state=opt_state, step=jnp.ones((), jnp.int32))


def _pure(state):
    """Params and Adam's mu as plain per-block dicts on the host."""
    def canon(tree):
        tree = jax.device_get(nnx.to_pure_dict(tree))
        if "0" not in map(str, tree["blocks"]):  # stacked -> per block
            depth = jax.tree.leaves(tree["blocks"])[0].shape[0]
            tree["blocks"] = {i: jax.tree.map(lambda a, i=i: a[i], tree["blocks"]) for i in range(depth)}
        return tree

    return canon(state.params), canon(state.opt_state[0].mu)


@pytest.mark.slow
def test_checkpoints_restore_across_stage_counts(tmp_path):
    """Saved stacked on 2 stages -> per-block on a 4-axis mesh, and per-block -> stacked on other 2 stages."""
    from fcn_jax.checkpoints.train_state import RunCheckpoints, abstract_like

    devices = jax.devices()
    staged = make_mesh((1, 1, 2, 1), devices=devices[:4], stage=2)
    plain = make_mesh((2, 1, 2, 2), devices=devices)
    staged2 = make_mesh((2, 1, 1, 2), devices=devices, stage=2)
    with jax.set_mesh(staged):
        saved = _train_state(stack_model(AFNONet(CFG, seed=3)), staged)
        assert saved.params["blocks"]["mlp"]["fc1"]["kernel"][...].sharding.spec[0] == "stage"
        ck = RunCheckpoints(tmp_path / "a", async_save=False)
        ck.save(1, saved, {"pos": 1}, {"m": 2}, force=True)
        ck.wait()
    want = _pure(saved)

    def check(state, mesh, stacked):
        blocks = state.params["blocks"]
        assert ("filter" in blocks) == stacked
        leaf = blocks["filter"]["w1"][...] if stacked else blocks[0]["filter"]["w1"][...]
        assert leaf.sharding.mesh.shape == mesh.shape
        got = _pure(state)
        for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
            np.testing.assert_array_equal(a, b)

    with jax.set_mesh(plain):  # stacked -> per block, no stage axis
        target = abstract_like(_train_state(AFNONet(CFG, seed=0), plain))
        state, data, meta = RunCheckpoints(tmp_path / "a").restore(1, target)
        assert data == {"pos": 1} and meta == {"m": 2}
        check(state, plain, stacked=False)
        ck = RunCheckpoints(tmp_path / "b", async_save=False)
        ck.save(1, state, {}, {}, force=True)
        ck.wait()
    with jax.set_mesh(staged2):  # per block -> stacked on another stage mesh
        target = abstract_like(_train_state(stack_model(AFNONet(CFG, seed=0)), staged2))
        state, _, _ = RunCheckpoints(tmp_path / "b").restore(1, target)
        check(state, staged2, stacked=True)
        assert state.params["blocks"]["filter"]["w1"][...].sharding.spec == target.params["blocks"]["filter"]["w1"].sharding.spec


@pytest.mark.slow
def test_training_resumes_from_one_stage_onto_two(world_store, tmp_path):
    """4 steps on (8,1,1,1), 4 more pipelined on (2,1,2,1) x 2 stages: same losses as 8 straight steps.

    The checkpoint holds per-block global arrays; the pipelined run restores them
    into its stacked, stage-split parameters and Adam moments.
    """
    from fcn_jax.training.loop import train

    ov = world_overrides(world_store, validate_every=100, **{"model.depth": 2})
    first = load_experiment("world", [*ov, "mesh.data=8"])
    train(first, tmp_path / "a", progress=False, max_steps=4)
    second = load_experiment("world", [*ov, "mesh.data=2", "mesh.height=2", "mesh.stage=2", "train.microbatches=2"])
    summary = train(second, tmp_path / "a", progress=False)
    assert summary["start_step"] == 4 and summary["final_step"] == 8
    assert (summary["stage"], summary["microbatches"]) == (2, 2)
    assert summary["bubble_fraction"] == pytest.approx(1 / 3)
    train(first, tmp_path / "b", progress=False)
    a, b = logged_losses(tmp_path / "a"), logged_losses(tmp_path / "b")
    for step in range(1, 9):
        assert a[step] == pytest.approx(b[step], rel=2e-5), step
    # the exported model holds per-block weights, loadable on any mesh
    from fcn_jax.checkpoints.package import load_model

    model = load_model(tmp_path / "a" / "model_final")
    assert len(model.blocks) == 2


@pytest.mark.slow
def test_two_processes_pipelined_match_one_unpipelined(world_store, tmp_path):
    """2 processes x 8 emulated devices on (2,1,2,2) x 2 stages: the losses of 8 devices without pipelining."""
    from fcn_jax.training.loop import train
    from tests.multiproc import free_port

    ov = world_overrides(world_store, validate_every=3, steps=3, checkpoint_every=3, **{"model.depth": 2})
    train(load_experiment("world", [*ov, "mesh.data=8"]), tmp_path / "one", progress=False)
    piped = [*ov, "mesh.data=2", "mesh.height=2", "mesh.width=2", "mesh.stage=2"]
    port = free_port()
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONPATH": str(REPO)}
    procs = [
        subprocess.Popen([sys.executable, "-m", "fcn_jax.train", "world", "--workdir", str(tmp_path / "two"),
                          "--no-progress", *sum((["--set", o] for o in piped), []), "--cpu-devices", "8",
                          "--coordinator", f"127.0.0.1:{port}", "--num-processes", "2", "--process-id", str(i)],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO, env=env)
        for i in range(2)
    ]
    outs = [p.communicate(timeout=1200) for p in procs]
    for p, (out, err) in zip(procs, outs):
        assert p.returncode == 0, err[-3000:]
    assert "pipeline: 2 stages x 4 microbatches per data shard, GPipe bubble 0.200" in outs[0][0]
    a, b = logged_losses(tmp_path / "one"), logged_losses(tmp_path / "two")
    assert sorted(a) == sorted(b) == [1, 2, 3]
    for step in a:
        assert b[step] == pytest.approx(a[step], rel=1e-5), step


def test_cost_terms():
    from fcn_jax.parallel.pipeline import gpipe_time, stage_transfer_bytes

    # 4 stages, 12 microbatches of 1 sample: 15 ticks of 1 s = 12 s of work x 15/12
    assert gpipe_time(1.0, 12, 4, 12) == pytest.approx(15.0)
    assert gpipe_time(1.0, 12, 1, 1) == pytest.approx(12.0)  # no pipeline: no bubble
    sizes = MeshSizes(1, 2, 2, 2, stage=2, microbatches=2)
    # published model: 90x180 tokens x 768 channels, 2 samples per microbatch on a 2x2x2 split
    assert stage_transfer_bytes(ModelConfig(), sizes, 4) == 2 * 45 * 90 * 384 * 4
