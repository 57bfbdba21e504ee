"""Building and validating the ``(data, channel, height, width)`` device mesh.

A mesh is checked against the device count and the model *before* anything is
compiled, so an impossible layout is refused with a message listing the sizes
that would work instead of a shape error deep inside XLA.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import jax
import numpy as np
from jax.sharding import AxisType, Mesh

from fcn_jax.parallel.axes import CHANNEL, DATA, HEIGHT, MESH_AXES, WIDTH


class MeshError(ValueError):
    """A mesh that cannot run the model; the message lists valid choices."""


@dataclass(frozen=True)
class MeshSizes:
    """Static sizes of the four mesh axes (hashable; used inside traced code)."""

    data: int = 1
    channel: int = 1
    height: int = 1
    width: int = 1

    @classmethod
    def of(cls, mesh: Mesh) -> "MeshSizes":
        return cls(**{name: int(mesh.shape[name]) for name in MESH_AXES})

    def __getitem__(self, name: str) -> int:
        return getattr(self, name)

    @property
    def shape(self) -> tuple[int, int, int, int]:
        return (self.data, self.channel, self.height, self.width)

    @property
    def model_parallel(self) -> int:
        return self.channel * self.height * self.width


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def resolve_shape(shape: Sequence[int], n_devices: int) -> tuple[int, int, int, int]:
    """Replace a single -1 by the devices left over; check the product."""
    shape = tuple(int(s) for s in shape)
    if len(shape) != 4:
        raise MeshError(f"a mesh has 4 axes {MESH_AXES}, got {len(shape)} sizes {shape}")
    for name, s in zip(MESH_AXES, shape):
        if s == 0 or s < -1:
            raise MeshError(f"mesh axis {name!r}: size must be positive or -1, got {s}")
    if shape.count(-1) > 1:
        raise MeshError(f"at most one mesh axis may be -1, got {dict(zip(MESH_AXES, shape))}")
    known = math.prod(s for s in shape if s != -1)
    if -1 in shape:
        if n_devices % known:
            raise MeshError(
                f"mesh {dict(zip(MESH_AXES, shape))}: the fixed axes use {known} devices, "
                f"which does not divide the {n_devices} available"
            )
        shape = tuple(n_devices // known if s == -1 else s for s in shape)
    total = math.prod(shape)
    if total != n_devices:
        raise MeshError(
            f"mesh {dict(zip(MESH_AXES, shape))} needs {total} devices but {n_devices} are available; "
            "the product of the sizes must equal the device count (use -1 for 'the rest')"
        )
    return shape  # type: ignore[return-value]


def validate_layout(sizes: MeshSizes, model_cfg, batch_size: int | None = None) -> None:
    """Refuse a mesh the model cannot run on, listing what would work.

    Rules (channel-block spectral layout, parallelism spec §3.1):
      * ``data`` divides the global batch;
      * ``height`` divides the latitude tokens and ``width`` the longitude tokens
        (tiles are whole patches, no halo);
      * ``channel`` divides the embedding width and the MLP hidden width;
      * ``channel*height*width`` divides the number of AFNO blocks, so every
        device holds whole blocks of the block-diagonal spectral MLP after the
        all-to-alls (the pencil layout, which would lift this, is not implemented).
    """
    lat, lon = model_cfg.token_grid
    problems = []
    if batch_size is not None and batch_size % sizes.data:
        valid = [d for d in _divisors(batch_size)]
        problems.append(f"data={sizes.data} does not divide the global batch {batch_size}; valid data sizes: {valid}")
    if lat % sizes.height:
        problems.append(
            f"height={sizes.height} does not split the {lat}x{lon} token grid's {lat} latitude rows; "
            f"valid height sizes: {_divisors(lat)}"
        )
    if lon % sizes.width:
        problems.append(
            f"width={sizes.width} does not split the {lon} longitude columns of the {lat}x{lon} token grid; "
            f"valid width sizes: {_divisors(lon)}"
        )
    common = math.gcd(model_cfg.embed_dim, model_cfg.mlp_hidden)
    if common % sizes.channel:
        problems.append(
            f"channel={sizes.channel} does not divide embed_dim {model_cfg.embed_dim} and MLP hidden "
            f"{model_cfg.mlp_hidden}; valid channel sizes: {_divisors(common)}"
        )
    mp = sizes.model_parallel
    if model_cfg.num_blocks % mp:
        nb = model_cfg.num_blocks
        problems.append(
            f"channel*height*width = {sizes.channel}*{sizes.height}*{sizes.width} = {mp} does not divide the "
            f"{nb} AFNO blocks: the channel-block spectral layout gives each device whole blocks "
            f"(the pencil layout is not implemented); valid products: {_divisors(nb)}"
        )
    if problems:
        raise MeshError(
            f"mesh (data, channel, height, width) = {sizes.shape} cannot run this model:\n  - "
            + "\n  - ".join(problems)
        )


def make_mesh(shape: Sequence[int], devices: Sequence[jax.Device] | None = None) -> Mesh:
    """A mesh with axes ``(data, channel, height, width)``; ``height``/``width`` innermost.

    Axes are of type ``Auto``: sharding outside the hand-written ``shard_map``
    regions (losses, optimiser) is left to the compiler's propagation.
    """
    if devices is None:
        devices = jax.devices()
        if -1 not in tuple(shape):  # a smaller mesh uses the first devices
            devices = devices[: math.prod(shape)]
    devices = list(devices)
    shape = resolve_shape(shape, len(devices))
    dev_array = np.asarray(devices).reshape(shape)
    return Mesh(dev_array, MESH_AXES, axis_types=(AxisType.Auto,) * 4)


def build_mesh(mesh_cfg, model_cfg, batch_size: int | None = None, devices=None) -> Mesh:
    """Mesh from an experiment's ``mesh`` section, validated against the model."""
    devices = list(jax.devices() if devices is None else devices)
    shape = resolve_shape(mesh_cfg.shape, len(devices))
    validate_layout(MeshSizes(*shape), model_cfg, batch_size)
    return make_mesh(shape, devices)


def single_device_mesh(device: jax.Device | None = None) -> Mesh:
    """The trivial mesh (1, 1, 1, 1): the same code path on one device."""
    device = device if device is not None else jax.devices()[0]
    return make_mesh((1, 1, 1, 1), [device])


def current_mesh() -> Mesh | None:
    """The mesh set with ``jax.set_mesh`` if it has our axes, else None."""
    abstract = jax.sharding.get_abstract_mesh()
    if abstract.empty:
        return None
    if tuple(abstract.axis_names) != MESH_AXES:
        raise MeshError(f"the mesh in context has axes {abstract.axis_names}; fcn_jax needs {MESH_AXES}")
    return abstract


__all__ = [
    "MeshError",
    "MeshSizes",
    "build_mesh",
    "current_mesh",
    "make_mesh",
    "resolve_shape",
    "single_device_mesh",
    "validate_layout",
    "DATA",
    "CHANNEL",
    "HEIGHT",
    "WIDTH",
]
