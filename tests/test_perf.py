"""The performance model against the compiler (abstract compilation, nothing executed)."""

from __future__ import annotations

import json

import optax
import pytest

from fcn_jax.config import ModelConfig, TrainConfig
from fcn_jax.parallel import hlo
from fcn_jax.parallel.mesh import MeshSizes
from fcn_jax.perfmodel import compiler
from fcn_jax.perfmodel import model as pm
from fcn_jax.perfmodel.hardware import get_hardware
from fcn_jax.training.optim import make_optimizer

# small configurations that differ in patch, width, depth, channels and grid
CONFIGS = {
    "p4_w256_d2_c8": dict(img_size=(64, 128), patch_size=(4, 4), embed_dim=256, depth=2, in_channels=8, out_channels=8),
    "p4_w256_d4_c8": dict(img_size=(64, 128), patch_size=(4, 4), embed_dim=256, depth=4, in_channels=8, out_channels=8),
    "p8_w384_d2_c20": dict(img_size=(64, 128), patch_size=(8, 8), embed_dim=384, depth=2, in_channels=20,
                           out_channels=20),
    "p2_w192_d3_c4_b2": dict(img_size=(32, 64), patch_size=(2, 2), embed_dim=192, depth=3, in_channels=4,
                             out_channels=4, mlp_ratio=2.0),
}


def _setting(cfg, mesh=(1, 1, 1, 1), batch=1, layout="channel_block"):
    return pm.Setting(cfg, MeshSizes(*mesh), batch, get_hardware("cpu"), layout)


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_train_step_flops_match_cost_analysis(name):
    cfg = ModelConfig(**CONFIGS[name])
    batch = 2 if name.endswith("_b2") else 1
    got = compiler.compile_train_step(cfg, (1, 1, 1, 1), batch)
    pred = pm.train_step_work(_setting(cfg, batch=batch)).flops
    assert got["flops_per_device"] > 0
    assert pred == pytest.approx(got["flops_per_device"], rel=0.05), (pred, got["flops_per_device"])


@pytest.mark.parametrize("mesh,layout", [((2, 1, 2, 2), "channel_block"), ((1, 2, 2, 2), "channel_block"),
                                         ((1, 1, 2, 4), "channel_block"), ((1, 8, 1, 1), "channel_block"),
                                         ((1, 1, 2, 4), "pencil"), ((1, 2, 2, 2), "pencil")])
def test_sharded_flops_params_and_collectives_match_compiler(mesh, layout):
    cfg = ModelConfig(**CONFIGS["p4_w256_d2_c8"])
    batch = mesh[0]
    got = compiler.compile_train_step(cfg, mesh, batch, spectral_layout=layout)
    assert got["spectral_layout"] == layout
    s = _setting(cfg, mesh, batch, layout)
    w = pm.train_step_work(s)
    assert w.flops == pytest.approx(got["flops_per_device"], rel=0.05)
    # parameter and optimiser bytes exact (pencil: spectral weights replicated over height x width)
    assert pm.param_bytes_per_device(cfg, s.mesh, layout) == got["param_bytes_per_device"]
    assert pm.optimizer_bytes_per_device(cfg, s.mesh, layout) == got["optimizer_bytes_per_device"]
    # collective bytes per kind equal to the compiled HLO
    pred = w.collective_bytes()
    for op in hlo.COLLECTIVES:
        # all-reduce: within 5e-4 (under 100 bytes of loss/metric scalars, see layouts.scalar_reductions)
        rel = 5e-4 if op == "all-reduce" else 1e-9
        assert pred.get(op, 0.0) == pytest.approx(got["collective_bytes"][op], rel=rel, abs=1.0), op


def test_param_and_optimizer_bytes_exact_published_model():
    cfg = ModelConfig()  # 720x1440, p8, 768, 12 layers: abstract only
    from fcn_jax.parallel.mesh import make_mesh

    for shape in [(1, 1, 1, 1), (1, 2, 2, 2), (2, 1, 2, 2)]:
        mesh = make_mesh(shape)
        for tcfg, counts in [(None, 1), (TrainConfig(), 2)]:
            tx = optax.adam(5e-4) if tcfg is None else make_optimizer(tcfg)[0]
            _, state, _, n = compiler.abstract_train_inputs(cfg, mesh, tx, shape[0])
            sizes = MeshSizes(*shape)
            assert pm.param_count(cfg) == n
            assert pm.param_bytes_per_device(cfg, sizes) == hlo.local_bytes(state.params)
            assert pm.optimizer_bytes_per_device(cfg, sizes, counts=counts) == hlo.local_bytes(state.opt_state)


def test_cli_json_contract(capsys):
    from fcn_jax.perf import main

    assert main(["--experiment", "world", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["flops_per_step"] > 0
    assert set(out["memory_per_device_bytes"]) >= {"params", "optimizer", "activations", "total"}
    assert set(out["step_time_s"]) >= {"compute", "memory", "communication", "total"}
    assert isinstance(out["collective_bytes_per_device"], dict)
    assert main(["--experiment", "afno_backbone", "--mesh", "8,2,2,2", "--hardware", "a100-80gb", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["collective_bytes_per_device"]["all-to-all"] > 0
    # flops_per_step is the global batch's step on all devices together
    cfg = ModelConfig()
    one = pm.train_step_work(pm.Setting(cfg, MeshSizes(), 1, get_hardware("a100-80gb"))).flops
    assert out["flops_per_step"] >= 64 * one * 0.999
    # 16 model-parallel devices: auto resolves to the pencil layout, as the model does
    assert main(["--experiment", "afno_backbone", "--mesh", "1,2,2,4", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["spectral_layout"] == "pencil" and out["collective_bytes_per_device"]["all-to-all"] > 0
    assert main(["--experiment", "afno_backbone", "--mesh", "1,2,2,4", "--layout", "channel_block"]) == 2
    assert "channel-block" in capsys.readouterr().err


def test_layouts_refuse_meshes_they_cannot_run():
    from fcn_jax.parallel.mesh import MeshError
    from fcn_jax.perfmodel.layouts import LAYOUTS, spectral_bytes_per_transform
    from fcn_jax.perfmodel.predict import meshes_for

    cfg = ModelConfig()  # 8 AFNO blocks, 90x180 tokens
    with pytest.raises(MeshError, match="channel-block"):
        LAYOUTS["channel_block"].validate(cfg, MeshSizes(1, 2, 2, 4), 1)
    LAYOUTS["pencil"].validate(cfg, MeshSizes(1, 2, 2, 4), 1)
    assert all(m.model_parallel <= 8 for m in meshes_for(cfg, 16, "channel_block"))
    assert MeshSizes(1, 2, 2, 4) in meshes_for(cfg, 16, "pencil")
    # README: 9.4 vs 15.8 MB per transform for the published model on a 2x2 split
    two = MeshSizes(1, 1, 2, 2)
    assert spectral_bytes_per_transform(cfg, two, 1, "channel_block") / 1e6 == pytest.approx(9.4, abs=0.05)
    assert spectral_bytes_per_transform(cfg, two, 1, "pencil") / 1e6 == pytest.approx(15.8, abs=0.05)


def test_cli_rejects_bad_mesh_and_hardware(capsys):
    from fcn_jax.perf import main

    assert main(["--experiment", "afno_backbone", "--mesh", "1,1,4,2"]) == 2
    assert "height=4" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["--experiment", "afno_backbone", "--hardware", "tpu9000"])


@pytest.mark.slow
def test_gpu_check_cases_run_on_cpu_with_a_tiny_model():
    """bench/gpu_check.py's cases, in process on the CPU (--cpu-smoke): parity, a train step, a forecast."""
    import importlib.util
    import pathlib

    path = pathlib.Path(__file__).resolve().parents[1] / "bench" / "gpu_check.py"
    spec = importlib.util.spec_from_file_location("gpu_check", path)
    gc = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(gc)
    par = gc.run_child({"name": "parity", "kind": "parity", "opts": {}, "smoke": True, "runs": 1})
    assert par["ok"] and par["rel_err"] <= gc.PARITY_TOL
    tr = gc.run_child({"name": "t", "kind": "train", "opts": {"compute_dtype": "float32"}, "smoke": True, "runs": 1})
    assert tr["ok"] and tr["hardware"] == "cpu" and tr["predicted_s"] > 0 and tr["mfu"] > 0
    fc = gc.run_child({"name": "f", "kind": "forecast", "opts": {"steps": 2}, "smoke": True, "runs": 1})
    assert fc["ok"] and fc["shape"][1] == 3  # rollout layout [batch, lead, lat, lon, channel]: IC + 2 steps
    with pytest.raises(RuntimeError, match="no GPU"):
        gc.run_child({"name": "t", "kind": "train", "opts": {}, "smoke": False, "runs": 1})
