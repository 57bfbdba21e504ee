"""fcn_jax.cpu_runtime: what the command lines set up for a CPU process, checked in fresh processes."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from fcn_jax import cpu_runtime

PROBE = r"""
import json, os, sys
from fcn_jax.cpu_runtime import tune_cpu_process
done = tune_cpu_process()
out = {"done": done, "xla_flags": os.environ.get("XLA_FLAGS", "")}
if "--model" in sys.argv:
    import numpy as np, jax, jax.numpy as jnp
    from fcn_jax.config import ModelConfig
    from fcn_jax.model.afnonet import AFNONet
    cfg = ModelConfig(img_size=(16, 32), patch_size=(4, 4), in_channels=3, out_channels=3, embed_dim=32, depth=2,
                      num_blocks=4, mlp_ratio=4.0)
    x = np.random.default_rng(0).standard_normal((2, 16, 32, 3)).astype(np.float32)
    m = AFNONet(cfg, seed=0)
    out["y"] = np.asarray(m(jnp.asarray(x))).ravel().tolist()
print(json.dumps(out))
"""


def _probe(env_extra, *args):
    env = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", "FCN_JAX_CPU_TUNING")}
    env.update(env_extra)
    r = subprocess.run([sys.executable, "-c", PROBE, *args], capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    return json.loads(r.stdout.strip().splitlines()[-1])


def test_cpu_process_is_tuned_and_the_model_is_unchanged():
    tuned = _probe({"JAX_PLATFORMS": "cpu"}, "--model")
    plain = _probe({"JAX_PLATFORMS": "cpu", "FCN_JAX_CPU_TUNING": "0"}, "--model")
    assert plain["done"] == {} and plain["xla_flags"] == ""
    assert "--xla_cpu_experimental_ynn_fusion_type=" in tuned["xla_flags"]
    assert tuned["done"]["dots"].startswith("YNN library fusions off")
    if sys.platform == "linux":
        # what this saves (page faults and system time per step) is measured by bench/bench_model.py
        assert tuned["done"]["allocator"].startswith("heap kept")
    y0, y1 = (pytest.importorskip("numpy").asarray(p["y"]) for p in (plain, tuned))
    assert abs(y1 - y0).max() <= 1e-6 * abs(y0).max()


def test_user_flags_and_gpu_backends_are_left_alone():
    own = _probe({"JAX_PLATFORMS": "cpu", "XLA_FLAGS": "--xla_cpu_experimental_ynn_fusion_type=dot"})
    assert own["xla_flags"] == "--xla_cpu_experimental_ynn_fusion_type=dot"
    assert own["done"]["dots"].startswith("kept the user's")
    gpu = _probe({"JAX_PLATFORMS": "cuda"})
    assert gpu == {"done": {}, "xla_flags": ""}


def test_will_run_on_cpu_reads_jax_platforms(monkeypatch):
    monkeypatch.setenv("JAX_PLATFORMS", "cpu")
    assert cpu_runtime.will_run_on_cpu()
    monkeypatch.setenv("JAX_PLATFORMS", "cuda,cpu")
    assert not cpu_runtime.will_run_on_cpu()
