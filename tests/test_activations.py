"""The exact GELU with an explicit derivative (fcn_jax/model/activations.py).

It must equal `jax.nn.gelu(x, approximate=False)` (forward bit for bit, gradient to float32
rounding), match the analytic derivative Phi(x) + x phi(x), and be differentiable inside
`jax.shard_map` on sharded operands with replicated weights, which jax 0.12's own erf derivative
is not (see the module docstring).
"""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from fcn_jax.model.activations import gelu_exact
from fcn_jax.parallel.axes import DATA, HEIGHT, WIDTH
from fcn_jax.parallel.mesh import make_mesh

JAX_VERSION = tuple(int(p) for p in jax.__version__.split(".")[:2])


def _points(dtype=np.float32):
    """Dense sweep over the range where GELU and its slope change, plus the tails and 0."""
    x = np.concatenate([np.linspace(-12.0, 12.0, 4001), [-40.0, -9.5, -0.0, 0.0, 1e-30, 9.5, 40.0]])
    return jnp.asarray(x, dtype)


def _gelu_grad_f64(x):
    """Phi(x) + x phi(x) in float64 (math.erfc is correctly rounded to double)."""
    x = np.asarray(x, np.float64)
    cdf = np.array([0.5 * math.erfc(-v / math.sqrt(2.0)) for v in x])
    pdf = np.exp(-0.5 * x * x) / math.sqrt(2.0 * math.pi)
    return cdf + x * pdf


@pytest.mark.parametrize("dtype", [np.float32, jnp.bfloat16])
def test_forward_is_bitwise_jax_gelu(dtype):
    x = _points(dtype)
    got = jax.jit(gelu_exact)(x)
    want = jax.jit(lambda v: jax.nn.gelu(v, approximate=False))(x)
    assert got.dtype == want.dtype == x.dtype
    np.testing.assert_array_equal(np.asarray(got, np.float32), np.asarray(want, np.float32))


def test_gradient_matches_jax_gelu_and_analytic():
    x = _points()
    grad = jax.jit(jax.vmap(jax.grad(gelu_exact)))
    got = np.asarray(grad(x))
    want = np.asarray(jax.jit(jax.vmap(jax.grad(lambda v: jax.nn.gelu(v, approximate=False))))(x))
    exact = _gelu_grad_f64(x)
    assert np.all(np.isfinite(got))
    # Against the float64 derivative: float32 rounding of a handful of operations.
    np.testing.assert_allclose(got, exact, rtol=2e-6, atol=1e-7)
    if JAX_VERSION < (0, 12):
        # Same operations in the same order as jax's own derivative: bit for bit.
        np.testing.assert_array_equal(got, want)
    else:
        # jax 0.12 evaluates exp(-x^2) by a split square (a few ulp more accurate in the tails).
        np.testing.assert_allclose(got, want, rtol=2e-6, atol=1e-7)


def test_jvp_and_vjp_agree():
    x = _points()[::7]
    t = jnp.linspace(-2.0, 3.0, x.shape[0], dtype=jnp.float32)
    _, jvp_out = jax.jvp(gelu_exact, (x,), (t,))
    _, vjp = jax.vjp(gelu_exact, x)
    (vjp_out,) = vjp(t)
    np.testing.assert_allclose(np.asarray(jvp_out), np.asarray(vjp_out), rtol=1e-6, atol=1e-7)


def test_gradient_inside_shard_map_with_replicated_weight(devices):
    """Sharded activations, replicated weight: the case that fails with jax.nn.gelu on jax 0.12.

    The gradient of the replicated weight is reduced over the mesh by shard_map's manual-axis
    typing; it must equal the single-device gradient.
    """
    mesh = make_mesh((2, 1, 2, 2))
    spec = P(DATA, HEIGHT, WIDTH, None)
    x_axes = (DATA, HEIGHT, WIDTH)  # the axes x varies over

    def local_loss(w, x):  # x: [batch/Pd, lat/Ph, lon/Pw, channel]; w: [channel]
        return jax.lax.psum(jnp.sum(gelu_exact(x * w) ** 2), x_axes)

    sharded = jax.shard_map(local_loss, mesh=mesh, in_specs=(P(), spec), out_specs=P())

    def single(w, x):
        return jnp.sum(gelu_exact(x * w) ** 2)

    key_x, key_w = jax.random.split(jax.random.key(0))
    x = 2.0 * jax.random.normal(key_x, (4, 6, 8, 3), jnp.float32)
    w = 1.0 + 0.5 * jax.random.normal(key_w, (3,), jnp.float32)
    x_sharded = jax.device_put(x, NamedSharding(mesh, spec))

    loss_s, (gw_s, gx_s) = jax.jit(jax.value_and_grad(sharded, argnums=(0, 1)))(w, x_sharded)
    loss_1, (gw_1, gx_1) = jax.jit(jax.value_and_grad(single, argnums=(0, 1)))(w, x)
    np.testing.assert_allclose(float(loss_s), float(loss_1), rtol=1e-6)
    np.testing.assert_allclose(np.asarray(gw_s), np.asarray(gw_1), rtol=1e-5)
    np.testing.assert_allclose(np.asarray(gx_s), np.asarray(gx_1), rtol=1e-5, atol=1e-7)
    # And against jax.nn.gelu on one device (no shard_map), where every jax version works.
    ref = jax.jit(jax.grad(lambda w_, x_: jnp.sum(jax.nn.gelu(x_ * w_, approximate=False) ** 2)))(w, x)
    np.testing.assert_allclose(np.asarray(gw_s), np.asarray(ref), rtol=1e-5)
