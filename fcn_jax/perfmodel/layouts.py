"""Spectral-filter layouts as pluggable terms of the performance model.

A layout says, for a mesh, (1) which meshes it accepts, (2) how the spectral
weights are split, (3) the local FFT and block-MLP work of one device and (4)
the collectives of a train step and of a forward pass. Everything else of the
model (MLP, norms, embedding, head, optimiser) is layout independent.

Both layouts of the model code are here: channel-block (parallelism spec §3.1)
and pencil (§3.2). **Extension point:** another layout (or a pipeline ``stage``
axis) is a new :class:`Layout` subclass registered in :data:`LAYOUTS`;
:mod:`fcn_jax.perfmodel.model` and the CLI pick it up by name (``--layout``).

Byte convention (per device, per step, shapes per device) -- the one
:func:`fcn_jax.parallel.hlo.collective_bytes` reads from compiled HLO:
all-to-all and all-gather ``(P-1)/P`` of the result, reduce-scatter
``(P-1)/P`` of the input, all-reduce ``2(P-1)/P`` (ring), collective-permute 1x.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from fcn_jax.config import ModelConfig
from fcn_jax.model.spectral import kept_ranges
from fcn_jax.parallel.mesh import MeshSizes, validate_layout


@dataclass(frozen=True)
class Collective:
    """``count`` instances of one collective, ``bytes`` per instance per device.

    ``span``: how many consecutive devices (mesh order ``data, channel, height,
    width``, width innermost) the group covers -- decides NVLink vs InfiniBand.
    """

    kind: str  # all-to-all | all-gather | reduce-scatter | all-reduce | collective-permute
    what: str
    bytes: float
    count: int
    span: int


def _lg(n: int) -> int:
    return int(math.floor(math.log2(n))) if n > 1 else 0


def axis_span(mesh: MeshSizes, axis: str) -> int:
    """Consecutive devices covered by a group over ``axis`` (inner axes multiply the stride)."""
    order = ("data", "channel", "height", "width")
    inner = math.prod(mesh[a] for a in order[order.index(axis) + 1:])
    return inner * mesh[axis]


class Layout:
    """Interface of a spectral layout (see the module docstring)."""

    name = "abstract"

    def validate(self, cfg: ModelConfig, mesh: MeshSizes, batch: int | None = None) -> None:
        """Raise :class:`fcn_jax.parallel.mesh.MeshError` unless this layout runs on ``mesh``."""
        validate_layout(mesh, cfg, batch_size=batch, spectral_layout=self.name)

    def spectral_weight_split(self, mesh: MeshSizes) -> int:
        raise NotImplementedError

    def spectral_local(self, cfg: ModelConfig, mesh: MeshSizes, b: int) -> dict:
        raise NotImplementedError

    def spectral_collectives(self, cfg: ModelConfig, mesh: MeshSizes, b: int, transforms: int) -> list:
        raise NotImplementedError

    # -- layout-independent parts, shared by every layout ------------------------

    def mlp_norm_head_collectives(self, cfg, mesh, b, forward_only: bool) -> list:
        pc = mesh.channel
        if pc == 1:
            return []
        lat, lon = cfg.token_grid
        hl, wl = lat // mesh.height, lon // mesh.width
        cb = 2 if cfg.compute_dtype == "bfloat16" else 4
        span = axis_span(mesh, "channel")
        full = b * cfg.embed_dim * hl * wl * (pc - 1) / pc
        ar = 2 * (pc - 1) / pc
        nout = cfg.patch_size[0] * cfg.patch_size[1] * cfg.out_channels
        d = cfg.depth
        if forward_only:
            return [
                Collective("all-gather", "mlp input", full * cb, d, span),
                Collective("reduce-scatter", "mlp output (f32 partial sums)", full * 4, d, span),
                Collective("all-reduce", "layernorm statistics", 4 * b * hl * wl * ar, d * 2 * 2, span),
                Collective("all-reduce", "head partial sums", 4 * b * hl * wl * nout * ar, 1, span),
            ]
        remat = cfg.remat
        # forward gather (compute dtype) + the gather of the f32 cotangent in the
        # transpose of fc2's reduce-scatter; remat recomputes the forward gather. The
        # reduce-scatter's output is not needed by the backward, so it is not recomputed.
        ag = [Collective("all-gather", "mlp input (fwd)", full * cb, d, span),
              Collective("all-gather", "mlp output cotangent (bwd, f32)", full * 4, d, span)]
        if remat:
            ag.append(Collective("all-gather", "mlp input (remat)", full * cb, d, span))
        rs = [Collective("reduce-scatter", "mlp output (fwd, f32)", full * 4, d, span),
              Collective("reduce-scatter", "mlp input cotangent (bwd)", full * cb, d, span)]
        per_ln = 6 if remat else 4  # 2 psums forward, 2 backward (+2 recomputed)
        norms = [Collective("all-reduce", "layernorm statistics", 4 * b * hl * wl * ar, d * 2 * per_ln, span),
                 Collective("all-reduce", "head partial sums", 4 * b * hl * wl * nout * ar, 1, span)]
        return ag + rs + norms

    def train_collectives(self, s, replicated) -> list:
        cfg, mesh, b = s.model, s.mesh, s.local_batch
        out = []
        for _ in range(s.rollout):
            out += self.spectral_collectives(cfg, mesh, b, 6 if cfg.remat else 4)
            out += self.mlp_norm_head_collectives(cfg, mesh, b, forward_only=False)
        n = math.prod(mesh.shape)
        for nbytes, g, _ in replicated:
            if g > 1:
                span = n if mesh.data > 1 else mesh.model_parallel
                out.append(Collective("all-reduce", "gradient", nbytes * 2 * (g - 1) / g, 1, span))
        out += self.scalar_reductions(s, replicated)
        return out

    def scalar_reductions(self, s, replicated) -> list:
        """Latency-bound scalars (< 0.1 % of the bytes): the loss's per-sample sums over the
        spatial axes (one stage per axis, as XLA decomposes them), its batch mean over
        ``data`` and the gradient-norm metric's partial sums of every split parameter."""
        mesh, b = s.mesh, s.local_batch
        out = []
        for axis in ("height", "width"):
            g = mesh[axis]
            if g > 1:
                out.append(Collective("all-reduce", "loss sums", 8 * b * 2 * (g - 1) / g, s.rollout,
                                      axis_span(mesh, axis)))
        if mesh.data > 1:
            g = mesh.data
            out.append(Collective("all-reduce", "loss mean", 4 * 2 * (g - 1) / g, 1, math.prod(mesh.shape)))
        for _, _, split in replicated:
            if split > 1:
                out.append(Collective("all-reduce", "gradient norm", 4 * 2 * (split - 1) / split, 1,
                                      mesh.model_parallel))
        return out

    def forward_collectives(self, s) -> list:
        cfg, mesh, b = s.model, s.mesh, s.local_batch
        return (self.spectral_collectives(cfg, mesh, b, 2)
                + self.mlp_norm_head_collectives(cfg, mesh, b, forward_only=True))


class ChannelBlockLayout(Layout):
    """Parallelism spec §3.1: 2 all-to-alls per transform, whole AFNO blocks per device."""

    name = "channel_block"

    def spectral_weight_split(self, mesh):
        return mesh.model_parallel  # block dim over (channel, width, height)

    def spectral_local(self, cfg, mesh, b):
        lat, lon = cfg.token_grid
        (r0, r1), bins = kept_ranges(lat, lon, cfg.hard_thresholding_fraction)
        c1 = cfg.embed_dim // (mesh.channel * mesh.width)  # after the width all-to-all
        c2 = c1 // mesh.height  # after the height all-to-all: whole blocks
        hl = lat // mesh.height
        half = lon // 2 + 1
        real = b * hl * lon * c1  # [b, lat/Ph, lon, C/(Pc Pw)]
        cols = b * lat * bins * c2  # [b, lat, bins, C/mp]
        halfsp = b * hl * half * c1
        ffts, ffts_bwd = _ffts(real, cols, halfsp, lon, lat)
        return {"modes": b * (r1 - r0) * bins, "channels": c2, "ffts": ffts, "ffts_bwd": ffts_bwd,
                "half_spectrum": b * hl * bins * c1, "bins": bins}

    def spectral_collectives(self, cfg, mesh, b, transforms):
        lat, lon = cfg.token_grid
        _, bins = kept_ranges(lat, lon, cfg.hard_thresholding_fraction)
        pc, ph, pw = mesh.channel, mesh.height, mesh.width
        a = 4.0 * b * cfg.embed_dim * lat * lon / (pc * ph * pw)  # local f32 activation
        out = []
        if pw > 1:
            out.append(Collective("all-to-all", "spectral (width)", a * (pw - 1) / pw,
                                  cfg.depth * transforms, axis_span(mesh, "width")))
        if ph > 1:
            out.append(Collective("all-to-all", "spectral (height)", a * (ph - 1) / ph * 2 * bins / lon,
                                  cfg.depth * transforms, axis_span(mesh, "height")))
        return out


def _ffts(real: int, cols: int, halfsp: int, lon: int, lat: int) -> tuple[dict, dict]:
    """Forward and backward FFT (flops, bytes) of one transform pair on one device.

    ``real``: elements of the real array the lon rfft reads; ``cols``: complex
    elements the lat fft (and ifft) transforms; ``halfsp``: complex elements of
    the full half-spectrum the irfft reads. Flops by XLA's convention
    (``8*floor(log2 n)`` per operand element); bytes one read + one write.
    Transposes: rfft^T is a full-length complex fft, irfft^T an rfft of the real cotangent.
    """
    lw, lh = _lg(lon), _lg(lat)
    fwd = {
        "rfft lon": (8 * lw * real, 4 * real + 8 * halfsp),
        "fft lat": (8 * lh * cols, 16 * cols),
        "ifft lat": (8 * lh * cols, 16 * cols),
        "irfft lon": (8 * lw * halfsp, 8 * halfsp + 4 * real),
    }
    bwd = {
        "rfft lon": (8 * lw * real, 16 * real),
        "fft lat": (8 * lh * cols, 16 * cols),
        "ifft lat": (8 * lh * cols, 16 * cols),
        "irfft lon": (8 * lw * real, 4 * real + 8 * halfsp),
    }
    return fwd, bwd


def pencil_padding(cfg: ModelConfig, mesh: MeshSizes) -> tuple[int, int, int, int]:
    """(kept rows, kept bins, rows padded to a multiple of height, bins padded to a multiple of width)."""
    lat, lon = cfg.token_grid
    (r0, r1), bins = kept_ranges(lat, lon, cfg.hard_thresholding_fraction)
    rows = r1 - r0
    return rows, bins, -(-rows // mesh.height) * mesh.height, -(-bins // mesh.width) * mesh.width


class PencilLayout(Layout):
    """Parallelism spec §3.2: 4 all-to-alls per transform and spatial axis, spectrum split into pencils.

    Each device keeps its whole ``channel`` slice of blocks; the kept modes
    (rows padded to ``height``, bins to ``width``) are split over height x width.
    The spectral weights are split over ``channel`` only (replicated spatially).
    """

    name = "pencil"

    def spectral_weight_split(self, mesh):
        return mesh.channel

    def spectral_local(self, cfg, mesh, b):
        lat, lon = cfg.token_grid
        _, bins, rows_p, bins_p = pencil_padding(cfg, mesh)
        c1 = cfg.embed_dim // (mesh.channel * mesh.width)  # after the first width all-to-all
        hl = lat // mesh.height
        half = lon // 2 + 1
        real = b * hl * lon * c1  # [b, lat/Ph, lon, C/(Pc Pw)]
        cols = b * lat * (bins_p // mesh.width) * (cfg.embed_dim // (mesh.channel * mesh.height))
        halfsp = b * hl * half * c1
        ffts, ffts_bwd = _ffts(real, cols, halfsp, lon, lat)
        modes = b * (rows_p // mesh.height) * (bins_p // mesh.width)  # [b, rows_p/Ph, bins_p/Pw, C/Pc]
        return {"modes": modes, "channels": cfg.embed_dim // mesh.channel, "ffts": ffts, "ffts_bwd": ffts_bwd,
                "half_spectrum": b * hl * bins * c1, "bins": bins}

    def spectral_collectives(self, cfg, mesh, b, transforms):
        lat, lon = cfg.token_grid
        _, _, rows_p, bins_p = pencil_padding(cfg, mesh)
        pc, ph, pw = mesh.channel, mesh.height, mesh.width
        a = 4.0 * b * cfg.embed_dim * lat * lon / (pc * ph * pw)  # local f32 activation
        spec = a * 2 * bins_p / lon  # complex64 kept bins of the local channels and rows
        n = cfg.depth * transforms
        out = []
        if pw > 1:
            sw, fw = axis_span(mesh, "width"), (pw - 1) / pw
            out += [Collective("all-to-all", "spectral (width, real)", a * fw, n, sw),
                    Collective("all-to-all", "spectral (width, bins)", spec * fw, n, sw)]
        if ph > 1:
            sh, fh = axis_span(mesh, "height"), (ph - 1) / ph
            out += [Collective("all-to-all", "spectral (height, columns)", spec * fh, n, sh),
                    Collective("all-to-all", "spectral (height, rows)", spec * rows_p / lat * fh, n, sh)]
        return out


def spectral_bytes_per_transform(cfg: ModelConfig, mesh: MeshSizes, local_batch: int, layout: str) -> float:
    """All-to-all bytes one device sends per forward transform (the inverse moves the same)."""
    return sum(c.bytes for c in LAYOUTS[layout].spectral_collectives(cfg, mesh, local_batch, 1))


#: Registered layouts by name.
LAYOUTS: dict[str, Layout] = {"channel_block": ChannelBlockLayout(), "pencil": PencilLayout()}
