"""Mesh axis names and the logical-to-mesh sharding rules: the one place they live.

The device mesh has four named axes, outermost first::

    stage    consecutive AFNO blocks (layer pipelining; only when mesh.stage > 1)
    data     samples of the global batch (data parallelism)
    channel  the embedding / MLP features (channel or "tensor" parallelism)
    height   latitude rows of the token grid (domain decomposition)
    width    longitude columns of the token grid (domain decomposition)

Model code never names a mesh axis directly. Every array dimension carries a
*logical* name (``batch``, ``lat``, ``lon``, ``embed``, ``mlp``, ``blocks`` ...)
and :data:`LOGICAL_RULES` maps those to mesh axes. Change the layout here and
only here.
"""

from __future__ import annotations

from typing import Sequence

from jax.sharding import PartitionSpec as P

STAGE = "stage"
DATA = "data"
CHANNEL = "channel"
HEIGHT = "height"
WIDTH = "width"

#: Mesh axis names, outermost to innermost. ``height``/``width`` are innermost so
#: that the spectral filter's all-to-alls stay between neighbouring devices.
MESH_AXES: tuple[str, ...] = (DATA, CHANNEL, HEIGHT, WIDTH)

#: Mesh axes of a pipelined mesh (``mesh.stage > 1``): ``stage`` outermost. Only
#: activations of one microbatch cross it (a point-to-point ``ppermute`` per
#: pipeline tick), so it is the axis that tolerates the slowest links.
#: With one stage the mesh is exactly :data:`MESH_AXES` (no ``stage`` axis at all).
PIPELINE_MESH_AXES: tuple[str, ...] = (STAGE, *MESH_AXES)

#: Axes that split the spatial domain.
SPATIAL_AXES: tuple[str, ...] = (HEIGHT, WIDTH)

#: Axes that split one sample (everything but ``data``): the model-parallel group.
MODEL_AXES: tuple[str, ...] = (CHANNEL, HEIGHT, WIDTH)

#: Order in which the AFNO channel-block layout subdivides the channel slice: the
#: first all-to-all runs over ``width``, the second over ``height``, so the block
#: index of a spectral weight is split major-to-minor as (channel, width, height).
SPECTRAL_BLOCK_AXES: tuple[str, ...] = (CHANNEL, WIDTH, HEIGHT)

#: Spectral-filter layouts (parallelism spec §3):
#:   ``channel_block``: modes stay whole, each device filters whole AFNO blocks of
#:       its own; the block index is split over (channel, width, height).
#:   ``pencil``: channels stay whole within a ``channel`` slice, Fourier modes are
#:       split over (height, width); blocks are split over ``channel`` only and the
#:       spectral weights are replicated over the spatial axes.
CHANNEL_BLOCK = "channel_block"
PENCIL = "pencil"
SPECTRAL_LAYOUTS: tuple[str, ...] = (CHANNEL_BLOCK, PENCIL)

#: Mesh axes of the AFNO block index under each spectral layout (major first).
BLOCK_AXES_BY_LAYOUT: dict[str, tuple[str, ...]] = {
    CHANNEL_BLOCK: SPECTRAL_BLOCK_AXES,
    PENCIL: (CHANNEL,),
}

#: Logical dimension name -> mesh axis (or tuple of axes, major first, or None).
LOGICAL_RULES: dict[str, str | tuple[str, ...] | None] = {
    "batch": DATA,
    "lat": HEIGHT,  # latitude rows (pixels or tokens)
    "lon": WIDTH,  # longitude columns (pixels or tokens)
    "embed": CHANNEL,  # embedding features (768 in the published model)
    "embed_full": None,  # embedding gathered over `channel` (input of fc1, output of fc2)
    "mlp": CHANNEL,  # MLP hidden features (3072)
    "blocks": SPECTRAL_BLOCK_AXES,  # AFNO block-diagonal blocks (8); per layout: BLOCK_AXES_BY_LAYOUT
    "reim": None,  # real / imaginary index of the spectral weights
    "block_in": None,
    "block_out": None,
    "patch_row": None,
    "patch_col": None,
    "in_channel": None,  # physical input channels (20): never split
    "head_out": None,  # head features (patch*patch*out_channels)
    "out_channel": None,
    "conv_row": None,
    "conv_col": None,
    "one": None,  # broadcast dimension of size 1
    "layers": STAGE,  # leading axis of the stacked AFNO blocks (pipelining): depth/stage per stage
}


def logical_to_spec(names: Sequence[str | None], spectral_layout: str = CHANNEL_BLOCK) -> P:
    """Map a tuple of logical dimension names to a mesh ``PartitionSpec``.

    ``spectral_layout`` decides where the AFNO ``blocks`` dimension lives
    (:data:`BLOCK_AXES_BY_LAYOUT`); every other rule is layout-independent.
    """
    if spectral_layout not in BLOCK_AXES_BY_LAYOUT:
        raise KeyError(f"unknown spectral layout {spectral_layout!r}; known: {list(SPECTRAL_LAYOUTS)}")
    axes = []
    for name in names:
        if name is None:
            axes.append(None)
            continue
        if name not in LOGICAL_RULES:
            raise KeyError(
                f"unknown logical axis {name!r}; known: {sorted(LOGICAL_RULES)}"
            )
        axes.append(BLOCK_AXES_BY_LAYOUT[spectral_layout] if name == "blocks" else LOGICAL_RULES[name])
    return P(*axes)


#: Layout of images (model inputs/outputs) between host and model:
#: x: [batch@data, lat@height, lon@width, channel (replicated)]
IMAGE_SPEC = P(DATA, HEIGHT, WIDTH, None)

#: Layout of a batch of training windows (the data pipeline's output, the train step's input):
#: x: [batch@data, time (k+1), lat@height, lon@width, channel (replicated)]
WINDOW_SPEC = P(DATA, None, HEIGHT, WIDTH, None)
