"""The GPU path, checked without a GPU: the published configuration lowered for CUDA on 8-device meshes.

``jax.export`` lowers for a platform that is not present. The train step, the
forward pass and the forecast rollout of ``afno_backbone`` (720 x 1440, patch 8,
768 wide, 12 blocks; float32 and the bf16 compute dtype) are lowered for
``cuda`` and for ``cpu`` on the (2,1,2,2) and (1,2,2,2) meshes, and the two
modules must hold the same collectives (the explicit ones of ``shard_map``:
the partitioner's come later, at compile time) and no custom call: a construct
only the CPU backend accepts fails here, in CI, not on the user's cluster.
Nothing of the model's size is allocated (abstract, sharded inputs).
"""

import re

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from jax.sharding import NamedSharding

from fcn_jax.config import load_experiment
from fcn_jax.inference.rollout import rollout_states
from fcn_jax.parallel.axes import IMAGE_SPEC
from fcn_jax.parallel.hlo import stablehlo_op_counts
from fcn_jax.parallel.mesh import make_mesh
from fcn_jax.perfmodel.compiler import abstract_train_inputs
from fcn_jax.training.step import make_train_step

MESHES = [(2, 1, 2, 2), (1, 2, 2, 2)]


def _lowered(fn, args, platform):
    return jax.export.export(fn, platforms=(platform,))(*args).mlir_module()


def _programs(cfg, mesh, batch):
    """name -> (jitted function, abstract arguments) for the train step, forward pass and rollout."""
    tx = optax.adam(5e-4)
    graphdef, train_state, window, _ = abstract_train_inputs(cfg, mesh, tx, batch, 1)
    params = train_state.params
    x = jax.ShapeDtypeStruct((batch, *cfg.img_size, cfg.in_channels), jnp.float32,
                             sharding=NamedSharding(mesh, IMAGE_SPEC))

    def forward(params, x):  # x: [batch, lat, lon, channel]
        return nnx.merge(graphdef, params)(x)

    def rollout(params, x):  # what forecasts jit: the one rollout's scan over the model
        return rollout_states(nnx.merge(graphdef, params), x, 2)

    return {"train_step": (make_train_step(graphdef, tx), (train_state, window)),
            "forward": (jax.jit(forward), (params, x)),
            "rollout": (jax.jit(rollout), (params, x))}


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("shape", MESHES, ids=lambda s: "mesh" + "x".join(map(str, s)))
def test_published_config_lowers_for_cuda_with_the_cpu_collectives(shape, dtype):
    cfg = load_experiment("afno_backbone", [f"model.compute_dtype={dtype}"]).model
    mesh = make_mesh(shape)
    with jax.set_mesh(mesh):
        for name, (fn, args) in _programs(cfg, mesh, batch=shape[0]).items():
            cpu = stablehlo_op_counts(_lowered(fn, args, "cpu"))
            cuda_text = _lowered(fn, args, "cuda")
            cuda = stablehlo_op_counts(cuda_text)
            assert cuda == cpu, (name, cuda, cpu)
            assert cuda["fft"] > 0, name  # the spectral filter is there
            assert cuda["all_to_all"] > 0, name  # ... distributed: every mesh here splits height x width
            assert cuda["custom_call"] == 0, (name, re.findall(r'call_target_name = "([^"]+)"', cuda_text))
    if shape[1] > 1:  # channel parallel: the MLP's gathers and reduce-scatters are in the module too
        assert cpu["all_gather"] > 0 or cpu["reduce_scatter"] > 0 or cpu["all_reduce"] > 0


def test_stablehlo_op_counts_reads_the_ops():
    text = ('%0 = "stablehlo.all_to_all"(%a) : ...\n  %1 = stablehlo.all_reduce(%b) ...\n'
            '%2 = stablehlo.fft %c, type = RFFT ...\n %3 = stablehlo.add %x, %y')
    counts = stablehlo_op_counts(text)
    assert counts["all_to_all"] == 1 and counts["all_reduce"] == 1 and counts["fft"] == 1
    assert counts["all_gather"] == 0 and counts["custom_call"] == 0 and np.sum(list(counts.values())) == 3
