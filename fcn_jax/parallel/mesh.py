"""Building and validating the ``(data, channel, height, width)`` device mesh.

With layer pipelining (``mesh.stage = S > 1``) the mesh gets a fifth, outermost
axis ``stage`` and uses ``S*D*C*H*W`` devices; with one stage it is exactly the
four-axis mesh.

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

from fcn_jax.errors import InputError
from fcn_jax.parallel.axes import (
    CHANNEL,
    CHANNEL_BLOCK,
    DATA,
    HEIGHT,
    MESH_AXES,
    PENCIL,
    PIPELINE_MESH_AXES,
    SPECTRAL_LAYOUTS,
    STAGE,
    WIDTH,
)

#: Accepted values of ``mesh.spectral_layout``: a layout, or ``auto``.
AUTO = "auto"
LAYOUT_CHOICES: tuple[str, ...] = (AUTO, *SPECTRAL_LAYOUTS)


class MeshError(InputError):
    """A mesh that cannot run the model; the message lists valid choices."""


@dataclass(frozen=True)
class MeshSizes:
    """Static sizes of the mesh axes and the spectral-filter layout in use.

    Hashable; passed into traced code. ``spectral_layout`` is always a concrete
    layout here (``channel_block`` or ``pencil``), resolved by :func:`validate_layout`.
    ``stage`` is the number of pipeline stages (1 = no pipelining, no ``stage``
    axis) and ``microbatches`` the pipeline's microbatches per data shard
    (resolved by :func:`validate_layout`; always 1 without pipelining).
    """

    data: int = 1
    channel: int = 1
    height: int = 1
    width: int = 1
    spectral_layout: str = CHANNEL_BLOCK
    stage: int = 1
    microbatches: int = 1

    @classmethod
    def of(cls, mesh: Mesh, spectral_layout: str = CHANNEL_BLOCK) -> "MeshSizes":
        stage = int(dict(mesh.shape).get(STAGE, 1))
        return cls(**{name: int(mesh.shape[name]) for name in MESH_AXES}, spectral_layout=spectral_layout,
                   stage=stage)

    def __getitem__(self, name: str) -> int:
        return getattr(self, name)

    @property
    def shape(self) -> tuple[int, int, int, int]:
        return (self.data, self.channel, self.height, self.width)

    @property
    def model_parallel(self) -> int:
        return self.channel * self.height * self.width

    @property
    def axis_names(self) -> tuple[str, ...]:
        """Names of the mesh's axes: with ``stage`` (outermost) only when pipelined."""
        return PIPELINE_MESH_AXES if self.stage > 1 else MESH_AXES

    @property
    def devices(self) -> int:
        return self.stage * self.data * self.model_parallel

    def describe(self) -> str:
        """``(data, channel, height, width) = (...)`` plus `` x stage S`` when pipelined."""
        text = f"(data, channel, height, width) = {self.shape}"
        return text + f" x stage {self.stage}" if self.stage > 1 else text


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def resolve_shape(shape: Sequence[int], n_devices: int, stage: int = 1) -> tuple[int, int, int, int]:
    """Replace a single -1 by the devices left over; check the product.

    ``stage`` pipeline stages take ``stage`` times the devices of the four axes.
    """
    stage = int(stage)
    if stage < 1:
        raise MeshError(f"mesh.stage must be a positive number of pipeline stages, got {stage}")
    if n_devices % stage:
        raise MeshError(
            f"mesh.stage={stage} does not divide the {n_devices} available devices; "
            f"valid stage counts: {_divisors(n_devices)}"
        )
    staged = f" per pipeline stage ({n_devices} devices / stage {stage})" if stage > 1 else ""
    n_devices //= stage
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
                f"which does not divide the {n_devices} available{staged}"
            )
        shape = tuple(n_devices // known if s == -1 else s for s in shape)
    total = math.prod(shape)
    if total != n_devices:
        raise MeshError(
            f"mesh {dict(zip(MESH_AXES, shape))} needs {total} devices but {n_devices} are available{staged}; "
            "the product of the sizes must equal the device count (use -1 for 'the rest')"
        )
    return shape  # type: ignore[return-value]


_REQUESTED_LAYOUT: contextvars.ContextVar[str] = contextvars.ContextVar("fcn_jax_spectral_layout", default=AUTO)


_REQUESTED_MICROBATCHES: contextvars.ContextVar[int] = contextvars.ContextVar("fcn_jax_microbatches", default=0)


@contextlib.contextmanager
def use_microbatches(count: int) -> Iterator[None]:
    """Request ``count`` pipeline microbatches per data shard (``train.microbatches``) in this context.

    0 = automatic: one sample per microbatch (the local batch ``batch/data``),
    the smallest bubble. Only pipelined meshes (``stage > 1``) use it.
    """
    count = int(count)
    if count < 0:
        raise MeshError(f"train.microbatches must be >= 0 (0 = one sample per microbatch), got {count}")
    token = _REQUESTED_MICROBATCHES.set(count)
    try:
        yield
    finally:
        _REQUESTED_MICROBATCHES.reset(token)


def requested_microbatches() -> int:
    """Microbatches requested in this context (0 = automatic)."""
    return _REQUESTED_MICROBATCHES.get()


def _pipeline_problems(sizes: MeshSizes, model_cfg, batch_size: int | None, microbatches: int) -> list[str]:
    """Why ``sizes.stage`` stages with ``microbatches`` microbatches cannot run (empty when they can)."""
    problems = []
    depth = model_cfg.depth
    if depth == 0 or depth % sizes.stage:
        problems.append(
            f"stage={sizes.stage} does not divide the model's depth {depth}: each pipeline stage holds "
            f"depth/stage consecutive AFNO blocks; valid stage counts: {_divisors(depth) if depth else [1]}"
        )
    if batch_size is not None and batch_size % sizes.data == 0 and microbatches:
        local = batch_size // sizes.data
        if local % microbatches:
            problems.append(
                f"train.microbatches={microbatches} does not divide the {local} samples per data shard "
                f"(global batch {batch_size} / data {sizes.data}); valid microbatch counts: {_divisors(local)}"
            )
    return problems


def bubble_fraction(stages: int, microbatches: int) -> float:
    """Idle fraction of a GPipe schedule: ``(S-1)/(M+S-1)`` (0 without pipelining)."""
    return (stages - 1) / (microbatches + stages - 1)


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
                    spectral_layout: str | None = None, microbatches: int | None = None) -> MeshSizes:
    """Refuse a mesh the model cannot run on, listing what would work; return it with its layout.

    Rules (parallelism spec §3, §8):
      * ``data`` divides the global batch;
      * ``height`` divides the latitude tokens and ``width`` the longitude tokens
        (tiles are whole patches, no halo);
      * ``channel`` divides the embedding width and the MLP hidden width;
      * the spectral layout can run (:func:`layout_problems`). ``auto`` (the
        default; see :func:`use_spectral_layout`) takes ``channel_block`` when
        ``channel*height*width`` divides the AFNO blocks -- it moves the fewest
        bytes -- and ``pencil`` otherwise;
      * pipelined (``stage > 1``): ``stage`` divides the depth and the
        microbatches divide the samples per data shard. ``microbatches``
        (default: :func:`use_microbatches`' request; 0 = automatic) is resolved
        to a count: automatic = the samples per data shard, or 1 without a batch.

    ``spectral_layout`` overrides the requested layout of the context.
    """
    requested = _check_layout_name(spectral_layout or requested_spectral_layout())
    problems = _spatial_problems(sizes, model_cfg, batch_size)
    mb = 1
    if sizes.stage > 1:
        mb = int(requested_microbatches() if microbatches is None else microbatches)
        if mb < 0:
            raise MeshError(f"train.microbatches must be >= 0 (0 = one sample per microbatch), got {mb}")
        problems += _pipeline_problems(sizes, model_cfg, batch_size, mb)
        if mb == 0:
            mb = batch_size // sizes.data if batch_size and batch_size % sizes.data == 0 else 1
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
            f"mesh {sizes.describe()} cannot run this model"
            f" (spectral layout {requested}):\n  - " + "\n  - ".join(problems)
        )
    return dataclasses.replace(sizes, spectral_layout=layout, microbatches=mb)


def model_sizes(mesh, model_cfg, batch_size: int | None = None) -> MeshSizes:
    """The validated :class:`MeshSizes` (layout and microbatches resolved) of ``model_cfg`` on ``mesh``."""
    return validate_layout(MeshSizes.of(mesh), model_cfg, batch_size)


def make_mesh(shape: Sequence[int], devices: Sequence[jax.Device] | None = None, stage: int = 1) -> Mesh:
    """A mesh with axes ``(data, channel, height, width)``; ``height``/``width`` innermost.

    With ``stage > 1`` pipeline stages the mesh is ``(stage, data, channel,
    height, width)``: each stage is a contiguous block of devices.
    Axes are of type ``Auto``: sharding outside the hand-written ``shard_map``
    regions (losses, optimiser) is left to the compiler's propagation.
    """
    if devices is None:
        devices = jax.devices()
        if -1 not in tuple(shape):  # a smaller mesh uses the first devices
            devices = devices[: math.prod(shape) * max(int(stage), 1)]
    devices = list(devices)
    shape = resolve_shape(shape, len(devices), stage)
    if stage > 1:
        dev_array = np.asarray(devices).reshape((stage, *shape))
        return Mesh(dev_array, PIPELINE_MESH_AXES, axis_types=(AxisType.Auto,) * 5)
    dev_array = np.asarray(devices).reshape(shape)
    return Mesh(dev_array, MESH_AXES, axis_types=(AxisType.Auto,) * 4)


def build_mesh(mesh_cfg, model_cfg, batch_size: int | None = None, devices=None,
               microbatches: int | None = None) -> Mesh:
    """Mesh from an experiment's ``mesh`` section, validated against the model.

    The section's ``spectral_layout`` and ``stage`` are checked here too (with
    ``microbatches``, the experiment's ``train.microbatches``, when given); run
    the model under ``use_spectral_layout(mesh_cfg.spectral_layout)`` and
    ``use_microbatches(...)`` to apply them.
    """
    devices = list(jax.devices() if devices is None else devices)
    stage = int(getattr(mesh_cfg, "stage", 1))
    shape = resolve_shape(mesh_cfg.shape, len(devices), stage)
    validate_layout(MeshSizes(*shape, stage=stage), model_cfg, batch_size,
                    spectral_layout=getattr(mesh_cfg, "spectral_layout", None), microbatches=microbatches)
    return make_mesh(shape, devices, stage)


def single_device_mesh(device: jax.Device | None = None) -> Mesh:
    """The trivial mesh (1, 1, 1, 1): the same code path on one device."""
    device = device if device is not None else jax.devices()[0]
    return make_mesh((1, 1, 1, 1), [device])


def current_mesh() -> Mesh | None:
    """The mesh set with ``jax.set_mesh`` if it has our axes, else None."""
    abstract = jax.sharding.get_abstract_mesh()
    if abstract.empty:
        return None
    if tuple(abstract.axis_names) not in (MESH_AXES, PIPELINE_MESH_AXES):
        raise MeshError(
            f"the mesh in context has axes {abstract.axis_names}; fcn_jax needs {MESH_AXES} "
            f"(or {PIPELINE_MESH_AXES} when pipelined)"
        )
    return abstract


__all__ = [
    "AUTO",
    "LAYOUT_CHOICES",
    "bubble_fraction",
    "use_microbatches",
    "requested_microbatches",
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
