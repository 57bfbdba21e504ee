"""fcn_jax.cpu_runtime: what the command lines set up for a CPU process, checked in fresh processes."""

from __future__ import annotations

import json
import os
import subprocess
import sys

from fcn_jax import cpu_runtime

PROBE = r"""
import json, os, sys
from fcn_jax.cpu_runtime import tune_cpu_process
done = tune_cpu_process()
out = {"done": done, "xla_flags": os.environ.get("XLA_FLAGS", "")}
if "--model" in sys.argv:
    # the tuned process against the independent float64 reference (tests/reference_fcn.py)
    import numpy as np, jax.numpy as jnp
    from tests import reference_fcn as ref
    from tests.test_model import CONFIGS, nhwc, rel_err, to_model_config
    from fcn_jax.convert import model_from_params, state_dict_to_params
    rc = ref.RefConfig(**CONFIGS["fcn_like_4x8"])
    cfg = to_model_config(rc)
    sd = ref.random_state_dict(rc, "backbone", seed=1)
    model = model_from_params(state_dict_to_params(sd, cfg, "backbone"), cfg, "backbone")
    x = np.random.default_rng(2).standard_normal((2, rc.in_chans, *rc.img_size)).astype(np.float32)
    expected = ref.afnonet_forward(sd, x.astype(np.float64), rc)
    out["rel_err"] = rel_err(np.asarray(model(jnp.asarray(nhwc(x)))), nhwc(expected))
print(json.dumps(out))
"""


def _probe(env_extra, *args):
    env = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", "FCN_JAX_CPU_TUNING")}
    env.update(env_extra)
    r = subprocess.run([sys.executable, "-c", PROBE, *args], capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    return json.loads(r.stdout.strip().splitlines()[-1])


def test_cpu_process_is_tuned_and_the_model_is_unchanged():
    repo = {"PYTHONPATH": os.path.dirname(os.path.dirname(os.path.abspath(__file__)))}  # the tests package
    tuned = _probe({"JAX_PLATFORMS": "cpu", **repo}, "--model")
    plain = _probe({"JAX_PLATFORMS": "cpu", "FCN_JAX_CPU_TUNING": "0", **repo}, "--model")
    assert plain["done"] == {} and plain["xla_flags"] == ""
    # XLA's own choices (flags, dot library) are left alone: only the allocator changes
    assert tuned["xla_flags"] == "" and set(tuned["done"]) == {"allocator"}
    if sys.platform == "linux":
        # what this saves (page faults and system time per step) is measured by bench/bench_model.py
        assert tuned["done"]["allocator"].startswith("heap kept")
    # the reference tolerance of tests/test_model.py, tuned and untuned alike
    assert tuned["rel_err"] < 1e-6 and plain["rel_err"] < 1e-6, (tuned["rel_err"], plain["rel_err"])


def test_user_flags_and_gpu_backends_are_left_alone():
    own = _probe({"JAX_PLATFORMS": "cpu", "XLA_FLAGS": "--xla_cpu_enable_fast_math=false"})
    assert own["xla_flags"] == "--xla_cpu_enable_fast_math=false"
    gpu = _probe({"JAX_PLATFORMS": "cuda"})
    assert gpu == {"done": {}, "xla_flags": ""}


def test_will_run_on_cpu_reads_jax_platforms(monkeypatch):
    monkeypatch.setenv("JAX_PLATFORMS", "cpu")
    assert cpu_runtime.will_run_on_cpu()
    monkeypatch.setenv("JAX_PLATFORMS", "cuda,cpu")
    assert not cpu_runtime.will_run_on_cpu()


def test_a_call_after_the_backend_started_says_so():
    # e.g. forecast.main run in-process after other JAX work: XLA's threads already hold their arenas
    code = ("import jax, jax.numpy as jnp; jnp.ones(3).block_until_ready(); "
            "from fcn_jax.cpu_runtime import keep_host_memory; print(keep_host_memory())")
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    said = r.stdout.strip().splitlines()[-1]
    if sys.platform == "linux":
        assert said.startswith("heap kept") and "threads JAX started earlier" in said, said
    # and before any JAX work the same call claims no exception
    early = subprocess.run([sys.executable, "-c", "from fcn_jax.cpu_runtime import keep_host_memory; "
                            "print(keep_host_memory())"], capture_output=True, text=True, env=env, timeout=300)
    assert early.returncode == 0 and "earlier" not in early.stdout, early.stderr[-3000:]
