"""Activation functions used by the AFNO network.

`gelu_exact` is the exact (erf) GELU of the original FourCastNet, with an explicit derivative.

Why not `jax.nn.gelu(x, approximate=False)`: on jax 0.12 the derivative of `lax.erf`/`lax.erfc`
evaluates `exp(-x^2)` through `lax.polynomial`, whose constant coefficients carry no manual-axis
(VMA) type. Inside `jax.shard_map` with a sharded operand this fails at trace time with
"Primitive polynomial requires varying manual axes to match" (upstream jax bug, present in
0.12.0.1; 0.10.2 and 0.11.2 are fine). Minimal reproduction, on any number of devices:

    mesh = jax.sharding.Mesh(np.array(jax.devices()[:1]), ("x",))
    f = jax.shard_map(lambda x: jax.lax.polynomial(x, [1.0, 2.0, 3.0]),
                      mesh=mesh, in_specs=P("x"), out_specs=P("x"))
    f(jnp.ones(4))   # ValueError: Primitive polynomial requires varying manual axes to match

The forward pass of `erfc` still lowers to XLA's erfc, so only the derivative needs replacing.
`jax.custom_jvp` keeps the manual-axis typing intact (every operation below is an ordinary
elementwise op that inserts the needed `pvary` itself), unlike `check_vma=False`, which would
also change how the gradients of replicated parameters are reduced.

Numerics: the forward is the same expression as `jax.nn.gelu(x, approximate=False)` (bit-identical
on every jax version), and the tangent is the chain rule written in the same operation order as
jax 0.10.2's autodiff of it, so gradients equal jax 0.10.2's bit for bit (tests/test_activations.py).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax


@jax.custom_jvp
def gelu_exact(x: jax.Array) -> jax.Array:
    """Exact GELU, x * Phi(x) = x/2 * erfc(-x/sqrt(2)), elementwise; same dtype as x.

    Derivative: Phi(x) + x * phi(x), with phi(x) = exp(-x^2/2) / sqrt(2 pi).
    """
    sqrt_half = np.sqrt(0.5).astype(x.dtype)
    return 0.5 * x * lax.erfc(-x * sqrt_half)


@gelu_exact.defjvp
def _gelu_exact_jvp(primals, tangents):
    (x,), (x_dot,) = primals, tangents
    sqrt_half = np.sqrt(0.5).astype(x.dtype)
    u = -x * sqrt_half  # erfc argument
    erfc_u = lax.erfc(u)
    half_x = 0.5 * x
    y = half_x * erfc_u
    # d/dx [x/2 * erfc(u)] = 1/2 * erfc(u) + x/2 * erfc'(u) * du/dx, erfc'(u) = -2/sqrt(pi) exp(-u^2),
    # du/dx = -sqrt(1/2); i.e. Phi(x) + x phi(x). Written in the order of jax 0.10.2's own JVP of
    # the forward (product rule, then erfc's rule) so that the result is bitwise the same.
    u_dot = -x_dot * sqrt_half
    erfc_dot = jnp.asarray(-2.0 / np.sqrt(np.pi), x.dtype) * (u_dot * jnp.exp(-jnp.square(u)))
    y_dot = (0.5 * x_dot) * erfc_u + half_x * erfc_dot
    return y, y_dot
