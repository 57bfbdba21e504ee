"""``shard_map`` building blocks: collectives that know the static mesh sizes.

Every function here runs *inside* a fully manual ``jax.shard_map`` over the four
mesh axes (five with the pipeline's ``stage``) and sees local shards. A collective over an axis of size 1 is elided
in Python (the sharding rules drop size-1 axes from parameter specs, see
:func:`spec_for_mesh`), so the compiled program contains exactly the
communication the layout needs and nothing for trivial axes.
"""

from __future__ import annotations

from typing import Sequence

import jax.numpy as jnp
from jax import lax
from jax.sharding import PartitionSpec as P

from fcn_jax.parallel.axes import CHANNEL, HEIGHT, WIDTH, logical_to_spec
from fcn_jax.parallel.mesh import MeshSizes


def spec_for_mesh(spec: P, sizes: MeshSizes) -> P:
    """Drop mesh axes of size 1 from a PartitionSpec (sharding over them is replication)."""
    out = []
    for entry in spec:
        if entry is None:
            out.append(None)
            continue
        axes = (entry,) if isinstance(entry, str) else tuple(entry)
        kept = tuple(a for a in axes if sizes[a] > 1)
        out.append(None if not kept else kept[0] if len(kept) == 1 else kept)
    return P(*out)


def logical_spec(names: Sequence[str | None], sizes: MeshSizes) -> P:
    """Logical dimension names -> PartitionSpec for this mesh and spectral layout (size-1 axes dropped)."""
    return spec_for_mesh(logical_to_spec(names, sizes.spectral_layout), sizes)


def vary(x, sizes: MeshSizes):
    """Mark ``x`` as varying over every live mesh axis, once.

    A parameter replicated over an axis is *invariant* there; each use in a
    computation on varying data would get its own implicit broadcast, whose
    transpose is a separate gradient all-reduce (e.g. four per spectral weight,
    one per slice w[0], w[1] and per use). One explicit cast at the entry makes
    autodiff reduce each parameter's gradient exactly once, at full size.
    """
    import jax

    aval = jax.typeof(x)
    vma = getattr(aval, "vma", None)  # jax >= 0.11 name
    if vma is None:  # jax 0.10: the manual-axis type holds the varying set
        mat = getattr(aval, "mat", None)
        vma = getattr(mat, "varying", frozenset())
    missing = tuple(a for a in sizes.axis_names if sizes[a] > 1 and a not in vma)
    return lax.pcast(x, missing, to="varying") if missing else x


def all_to_all(x, axis: str, split_axis: int, concat_axis: int, sizes: MeshSizes):
    """Tiled all-to-all: split ``split_axis`` over ``axis``, gather ``concat_axis``."""
    if sizes[axis] == 1:
        return x
    return lax.all_to_all(x, axis, split_axis, concat_axis, tiled=True)


def psum(x, axes: str | Sequence[str], sizes: MeshSizes):
    """Sum over the named axes whose size is > 1."""
    axes = (axes,) if isinstance(axes, str) else tuple(axes)
    live = tuple(a for a in axes if sizes[a] > 1)
    return lax.psum(x, live) if live else x


def gather_channels(x, sizes: MeshSizes, axis: int = -1):
    """All-gather the channel-sharded last axis (column-parallel input)."""
    if sizes[CHANNEL] == 1:
        return x
    return lax.all_gather(x, CHANNEL, axis=axis % x.ndim, tiled=True)


def reduce_scatter_channels(x, sizes: MeshSizes, axis: int = -1):
    """Sum partial results over ``channel`` and keep this device's channel slice."""
    if sizes[CHANNEL] == 1:
        return x
    return lax.psum_scatter(x, CHANNEL, scatter_dimension=axis % x.ndim, tiled=True)


def layer_norm(x, scale, bias, *, eps: float, num_features: int, sizes: MeshSizes):
    """LayerNorm over a (possibly channel-sharded) last axis, PyTorch semantics.

    Two-pass statistics in float32 -- mean first, then the mean squared
    deviation -- each reduced across ``channel``. Never E[x^2] - E[x]^2, which
    loses all precision when |mean| >> std (parallelism spec §4).

    x: [..., embed/Pc] local; scale, bias: [embed/Pc].
    """
    dtype = x.dtype
    x32 = x.astype(jnp.float32)
    mean = psum(jnp.sum(x32, axis=-1, keepdims=True), CHANNEL, sizes) / num_features
    centred = x32 - mean
    var = psum(jnp.sum(centred * centred, axis=-1, keepdims=True), CHANNEL, sizes) / num_features
    y = centred * lax.rsqrt(var + eps)
    y = y * scale.astype(jnp.float32) + bias.astype(jnp.float32)
    return y.astype(dtype)


def _shift_from(x, axis_name: str, n: int, step: int, periodic: bool):
    """Value of ``x`` held by the device ``step`` positions before this one on ``axis_name``.

    Non-periodic shifts deliver zeros to the devices at the ends.
    """
    if periodic:
        perm = [(i, (i + step) % n) for i in range(n)]
    else:
        perm = [(i, i + step) for i in range(n) if 0 <= i + step < n]
    return lax.ppermute(x, axis_name, perm)


def halo_pad_lat_lon(x, sizes: MeshSizes):
    """Pad a [batch, lat, lon, ch] tile by one pixel: periodic in lon, zeros at the poles.

    The global result equals padding the whole field circularly in longitude,
    then with one zero row at the north and south edge (PrecipNet's
    ``PeriodicPad2d(1)``). Neighbours' edge rows/columns come by ``ppermute``.
    """
    nw = sizes[WIDTH]
    if nw == 1:
        west, east = x[:, :, -1:], x[:, :, :1]
    else:  # west halo = last column of the western neighbour, and vice versa
        west = _shift_from(x[:, :, -1:], WIDTH, nw, +1, periodic=True)
        east = _shift_from(x[:, :, :1], WIDTH, nw, -1, periodic=True)
    x = jnp.concatenate([west, x, east], axis=2)
    nh = sizes[HEIGHT]
    zeros = jnp.zeros_like(x[:, :1])
    if nh == 1:
        north, south = zeros, zeros
    else:  # devices at the poles receive nothing from ppermute: zeros
        north = _shift_from(x[:, -1:], HEIGHT, nh, +1, periodic=False)
        south = _shift_from(x[:, :1], HEIGHT, nh, -1, periodic=False)
    return jnp.concatenate([north, x, south], axis=1)
