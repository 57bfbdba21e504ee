"""Building and validating the ``(data, channel, height, width)`` device mesh.

A mesh is checked against the device count and the model *before* anything is
compiled, so an impossible layout is refused with a message listing the sizes
that would work instead of a shape error deep inside XLA.
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import math
from dataclasses import dataclass
from typing import Iterator, Sequence

import jax
import numpy as np
from jax.sharding import AxisType, Mesh

from fcn_jax.parallel.axes import CHANNEL, CHANNEL_BLOCK, DATA, HEIGHT, MESH_AXES, PENCIL, SPECTRAL_LAYOUTS, WIDTH

#: Accepted values of ``mesh.spectral_layout``: a layout, or ``auto``.
AUTO = "auto"
LAYOUT_CHOICES: tuple[str, ...] = (AUTO, *SPECTRAL_LAYOUTS)


class MeshError(ValueError):
    """A mesh that cannot run the model; the message lists valid choices."""


@dataclass(frozen=True)
class MeshSizes:
    """Static sizes of the four mesh axes and the spectral-filter layout in use.

    Hashable; passed into traced code. ``spectral_layout`` is always a concrete
    layout here (``channel_block`` or ``pencil``), resolved by :func:`validate_layout`.
    """

    data: int = 1
    channel: int = 1
    height: int = 1
    width: int = 1
    spectral_layout: str = CHANNEL_BLOCK

    @classmethod
    def of(cls, mesh: Mesh, spectral_layout: str = CHANNEL_BLOCK) -> "MeshSizes":
        return cls(**{name: int(mesh.shape[name]) for name in MESH_AXES}, spectral_layout=spectral_layout)

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


_REQUESTED_LAYOUT: contextvars.ContextVar[str] = contextvars.ContextVar("fcn_jax_spectral_layout", default=AUTO)


def _check_layout_name(name: str) -> str:
    if name not in LAYOUT_CHOICES:
        raise MeshError(f"mesh.spectral_layout={name!r} is not a layout; valid: {list(LAYOUT_CHOICES)}")
    return name


@contextlib.contextmanager
def use_spectral_layout(name: str) -> Iterator[None]:
    """Request a spectral-filter layout (``auto``, ``channel_block`` or ``pencil``) in this context.

    The experiment's ``mesh.spectral_layout``; the model and :func:`model_sizes`
    read it when they resolve the layout (at trace time: a function already
    jitted keeps the layout it was traced with, which computes the same numbers).
    """
    token = _REQUESTED_LAYOUT.set(_check_layout_name(name))
    try:
        yield
    finally:
        _REQUESTED_LAYOUT.reset(token)


def requested_spectral_layout() -> str:
    """The layout requested in this context (``auto`` unless :func:`use_spectral_layout` set one)."""
    return _REQUESTED_LAYOUT.get()


def _spatial_problems(sizes: MeshSizes, model_cfg, batch_size: int | None) -> list[str]:
    lat, lon = model_cfg.token_grid
    problems = []
    if batch_size is not None and batch_size % sizes.data:
        problems.append(
            f"data={sizes.data} does not divide the global batch {batch_size}; valid data sizes: {_divisors(batch_size)}"
        )
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
    return problems


def layout_problems(sizes: MeshSizes, model_cfg, layout: str) -> list[str]:
    """Why the spectral ``layout`` cannot run on ``sizes`` (empty when it can).

    * ``channel_block``: ``channel*height*width`` divides the AFNO blocks, so each
      device holds whole blocks after the two all-to-alls (spec §3.1).
    * ``pencil``: ``channel`` divides the blocks, and the per-device channel slice
      ``embed/channel`` splits over ``height`` and over ``width`` (the all-to-alls
      that trade channels for spatial rows/columns). Mode counts impose nothing:
      the longitude bins and latitude rows are zero-padded to the split (spec §3.2).
    """
    nb, c, h, w = model_cfg.num_blocks, sizes.channel, sizes.height, sizes.width
    if layout == CHANNEL_BLOCK:
        mp = sizes.model_parallel
        if nb % mp:
            return [
                f"channel*height*width = {c}*{h}*{w} = {mp} does not divide the {nb} AFNO blocks: the "
                f"channel-block spectral layout gives each device whole blocks; valid products: {_divisors(nb)}"
            ]
        return []
    if layout != PENCIL:
        raise MeshError(f"unknown spectral layout {layout!r}; valid: {list(SPECTRAL_LAYOUTS)}")
    problems = []
    if nb % c:
        problems.append(
            f"channel={c} does not divide the {nb} AFNO blocks (pencil layout: blocks split over channel); "
            f"valid channel sizes: {_divisors(math.gcd(nb, math.gcd(model_cfg.embed_dim, model_cfg.mlp_hidden)))}"
        )
    elif model_cfg.embed_dim % c == 0:
        local = model_cfg.embed_dim // c
        lat, lon = model_cfg.token_grid
        if local % h:
            problems.append(
                f"height={h} does not divide the {local} channels per channel slice (embed_dim "
                f"{model_cfg.embed_dim} / channel {c}) that the pencil layout spreads over height; "
                f"valid height sizes: {[d for d in _divisors(lat) if local % d == 0]}"
            )
        if local % w:
            problems.append(
                f"width={w} does not divide the {local} channels per channel slice (embed_dim "
                f"{model_cfg.embed_dim} / channel {c}) that the pencil layout spreads over width; "
                f"valid width sizes: {[d for d in _divisors(lon) if local % d == 0]}"
            )
    return problems


def validate_layout(sizes: MeshSizes, model_cfg, batch_size: int | None = None,
                    spectral_layout: str | None = None) -> MeshSizes:
    """Refuse a mesh the model cannot run on, listing what would work; return it with its layout.

    Rules (parallelism spec §3, §8):
      * ``data`` divides the global batch;
      * ``height`` divides the latitude tokens and ``width`` the longitude tokens
        (tiles are whole patches, no halo);
      * ``channel`` divides the embedding width and the MLP hidden width;
      * the spectral layout can run (:func:`layout_problems`). ``auto`` (the
        default; see :func:`use_spectral_layout`) takes ``channel_block`` when
        ``channel*height*width`` divides the AFNO blocks -- it moves the fewest
        bytes -- and ``pencil`` otherwise.

    ``spectral_layout`` overrides the requested layout of the context.
    """
    requested = _check_layout_name(spectral_layout or requested_spectral_layout())
    problems = _spatial_problems(sizes, model_cfg, batch_size)
    if requested == AUTO:
        block_problems = layout_problems(sizes, model_cfg, CHANNEL_BLOCK)
        pencil_problems = layout_problems(sizes, model_cfg, PENCIL)
        layout = CHANNEL_BLOCK if not block_problems else PENCIL
        if block_problems and pencil_problems:
            problems += [f"{p} (channel_block layout)" for p in block_problems]
            problems += [f"{p}" for p in pencil_problems]
    else:
        layout = requested
        problems += layout_problems(sizes, model_cfg, layout)
    if problems:
        raise MeshError(
            f"mesh (data, channel, height, width) = {sizes.shape} cannot run this model"
            f" (spectral layout {requested}):\n  - " + "\n  - ".join(problems)
        )
    return dataclasses.replace(sizes, spectral_layout=layout)


def model_sizes(mesh, model_cfg, batch_size: int | None = None) -> MeshSizes:
    """The validated :class:`MeshSizes` (layout resolved) of ``model_cfg`` on ``mesh``."""
    sizes = MeshSizes(**{name: int(mesh.shape[name]) for name in MESH_AXES})
    return validate_layout(sizes, model_cfg, batch_size)


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
    """Mesh from an experiment's ``mesh`` section, validated against the model.

    The section's ``spectral_layout`` is checked here too; run the model under
    ``use_spectral_layout(mesh_cfg.spectral_layout)`` to apply it.
    """
    devices = list(jax.devices() if devices is None else devices)
    shape = resolve_shape(mesh_cfg.shape, len(devices))
    validate_layout(MeshSizes(*shape), model_cfg, batch_size,
                    spectral_layout=getattr(mesh_cfg, "spectral_layout", None))
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
    "AUTO",
    "LAYOUT_CHOICES",
    "MeshError",
    "MeshSizes",
    "layout_problems",
    "model_sizes",
    "requested_spectral_layout",
    "use_spectral_layout",
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
