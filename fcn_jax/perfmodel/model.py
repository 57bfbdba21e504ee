"""Analytic performance model of the AFNO train step and forward pass.

Speed of light, no overlap. Each op class is modelled on its own terms:

* **GEMMs** (patch embedding, MLP, spectral block MLP, head): ``2·M·N·K`` flops,
  roofline time ``max(flops / matmul peak, bytes / bandwidth)``;
* **FFTs**: flops counted as XLA's ``HloCostAnalysis`` counts them (``8 ·
  floor(log2 n)`` per element of the operand -- so a length-180 rfft of a real
  row counts 56·180, its inverse 56·91); time from a tailored model: an FFT of
  length n on a GPU is one read and one write of the array per pass, with
  ``ceil(log_radix n)`` passes (radix 16 on GPU, i.e. one pass for n <= 256),
  against ``5 n log2 n`` real flops at the vector peak;
* **elementwise** (LayerNorm, GELU, softshrink, Adam, loss): per-element flop
  constants of the compiled program (:data:`ELEMENTWISE`) and memory traffic
  in passes over the tensors, bandwidth bound;
* **collectives**: bytes per device from the layout (:mod:`fcn_jax.perfmodel.layouts`),
  alpha-beta per link type.

Shapes are per device after partitioning; ``global`` numbers are the sum over
devices (what ``compiled.cost_analysis()`` per device times the device count
gives).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field

from fcn_jax.config import ModelConfig
from fcn_jax.parallel.mesh import MeshSizes
from fcn_jax.perfmodel.hardware import Hardware
from fcn_jax.perfmodel.layouts import LAYOUTS

#: Flops per element that XLA's HloCostAnalysis counts for the elementwise parts of
#: the compiled step (jax 0.10.2, XLA:CPU; measured once on the isolated pieces with
#: ``compiled.cost_analysis()`` and kept here so the model stays analytic):
#: exact-erf GELU is a rational polynomial (64 forward, 68 for its derivative);
#: a LayerNorm is 8 forward, 25 forward+backward; Adam 13 per parameter; the
#: relative L2 loss 6 per output element with its gradient. "filter_*" is the rest
#: of the spectral filter (ReLU, softshrink, biases, complex assembly, the skip),
#: per element of its real input; "block_*" the remaining adds/casts of a block.
ELEMENTWISE = {
    "gelu_fwd": 64.0, "gelu_bwd": 68.0,
    "ln_fwd": 8.0, "ln_fwd_bwd": 25.15,
    "adam": 13.0, "loss_fwd_bwd": 6.0, "loss_fwd": 3.0,
    "filter_fwd": 12.0, "filter_fwd_bwd": 24.75,
    "block_fwd": 4.0, "block_fwd_bwd": 8.0,
}
#: Memory passes (reads + writes of the tensor) of the elementwise parts, forward /
#: forward+backward, in units of the tensor's bytes. Counted from the code: e.g.
#: LayerNorm reads x twice (mean, variance) and writes y; its backward reads x, dy and
#: writes dx; GELU reads h, writes g (backward: reads h, dg, writes dh); Adam reads
#: p, g, m, v and writes p, m, v.
PASSES = {"ln_fwd": 3, "ln_fwd_bwd": 7, "gelu_fwd": 2, "gelu_bwd": 3, "filter_fwd": 6, "filter_fwd_bwd": 14,
          "block_fwd": 3, "block_fwd_bwd": 6, "adam": 7, "loss": 3}

DTYPE_BYTES = {"float32": 4, "bfloat16": 2}


def _lg(n: int) -> int:
    return max(int(math.floor(math.log2(n))), 0) if n > 1 else 0


@dataclass
class OpCost:
    """Work of one op class on one device: flops, bytes moved to/from memory, the peak it runs at."""

    flops: float = 0.0
    bytes: float = 0.0
    peak: str = "vector"  # "matmul:<dtype>", "vector" or "fft"

    def __iadd__(self, other: "OpCost"):
        self.flops += other.flops
        self.bytes += other.bytes
        return self


@dataclass
class Workload:
    """Per-device work of one program (train step or forward), by op class."""

    ops: dict = field(default_factory=dict)
    collectives: list = field(default_factory=list)
    devices: int = 1

    def add(self, name: str, flops: float, nbytes: float, peak: str = "vector"):
        cur = self.ops.setdefault(name, OpCost(peak=peak))
        cur += OpCost(flops, nbytes, peak)

    @property
    def flops(self) -> float:
        return sum(o.flops for o in self.ops.values())

    @property
    def bytes(self) -> float:
        return sum(o.bytes for o in self.ops.values())

    def collective_bytes(self) -> dict:
        out = {}
        for c in self.collectives:
            out[c.kind] = out.get(c.kind, 0.0) + c.bytes * c.count
        return out


@dataclass(frozen=True)
class Setting:
    """What a prediction is for: model, mesh, global batch, hardware, layout."""

    model: ModelConfig
    mesh: MeshSizes
    batch: int
    hardware: Hardware
    layout: str = "channel_block"
    rollout: int = 1  # autoregressive steps in the loss
    optimizer_counts: int = 1  # int32 step counters in the optimiser state (adam: 1; + schedule: 2)

    @property
    def devices(self) -> int:
        return math.prod(self.mesh.shape)

    @property
    def local_batch(self) -> int:
        return self.batch // self.mesh.data


# --------------------------------------------------------------------------- #
# Parameters and optimiser state (exact)
# --------------------------------------------------------------------------- #


def param_table(cfg: ModelConfig, mesh: MeshSizes, layout: str = "channel_block"):
    """[(name, global elements, devices it is split over)] for every parameter.

    Mirrors the logical axes of :mod:`fcn_jax.model.afnonet` and the rules of
    :mod:`fcn_jax.parallel.axes`; the spectral weights' split is the layout's.
    """
    c, pc, ph, pw = cfg.embed_dim, mesh.channel, mesh.height, mesh.width
    lat, lon = cfg.token_grid
    p0, p1 = cfg.patch_size
    hd, nb, d = cfg.mlp_hidden, cfg.num_blocks, cfg.block_size
    spec_split = LAYOUTS[layout].spectral_weight_split(mesh)
    rows = [("patch_embed.kernel", p0 * p1 * cfg.in_channels * c, pc), ("patch_embed.bias", c, pc),
            ("pos_embed", lat * lon * c, pc * ph * pw)]
    for i in range(cfg.depth):
        rows += [(f"blocks.{i}.norm1", 2 * c, pc), (f"blocks.{i}.filter.w", 2 * 2 * nb * d * d, spec_split),
                 (f"blocks.{i}.filter.b", 2 * 2 * nb * d, spec_split), (f"blocks.{i}.norm2", 2 * c, pc),
                 (f"blocks.{i}.fc1", c * hd + hd, pc), (f"blocks.{i}.fc2", hd * c + c, pc)]
    rows += [("norm", 2 * c, pc), ("head.kernel", c * p0 * p1 * cfg.out_channels, pc)]
    return rows


def param_count(cfg: ModelConfig) -> int:
    return sum(n for _, n, _ in param_table(cfg, MeshSizes()))


def param_bytes_per_device(cfg: ModelConfig, mesh: MeshSizes, layout: str = "channel_block") -> int:
    """float32 parameter bytes held by one device (exact)."""
    return sum(4 * n // split for _, n, split in param_table(cfg, mesh, layout))


def optimizer_bytes_per_device(cfg, mesh, layout="channel_block", counts: int = 1) -> int:
    """Adam: mu and nu laid out like the parameters, plus ``counts`` int32 step counters."""
    return 2 * param_bytes_per_device(cfg, mesh, layout) + 4 * counts


def replicated_param_bytes(cfg, mesh, layout="channel_block"):
    """[(local bytes, devices holding the same shard, devices it is split over)] per used parameter.

    The gradient all-reduce groups. The final ``norm`` is left out: the model never
    calls it (kept for checkpoint round-trips), its gradient is structurally zero and
    the compiler drops its reduction.
    """
    n = math.prod(mesh.shape)
    return [(4 * g // split, n // split, split) for name, g, split in param_table(cfg, mesh, layout)
            if name != "norm"]


# --------------------------------------------------------------------------- #
# Work per device
# --------------------------------------------------------------------------- #


def _local_dims(s: Setting):
    """(cfg, mesh, local batch, local tokens, embed, hidden, local embed, local hidden, compute bytes, gemm peak)."""
    cfg, m = s.model, s.mesh
    lat, lon = cfg.token_grid
    c, hd = cfg.embed_dim, cfg.mlp_hidden
    return (cfg, m, s.local_batch, (lat // m.height) * (lon // m.width), c, hd, c // m.channel, hd // m.channel,
            DTYPE_BYTES[cfg.compute_dtype], f"matmul:{cfg.compute_dtype}")


def _forward_work(w: Workload, s: Setting, recompute: bool = False):
    """Forward pass of the backbone on one device (recompute=True: only the per-block part)."""
    cfg, m, b, tl, c, hd, cl, hdl, eb, mm = _local_dims(s)
    p0, p1 = cfg.patch_size
    tag = "recompute " if recompute else ""
    if not recompute:
        k = p0 * p1 * cfg.in_channels
        w.add("gemm patch_embed", 2 * b * tl * k * cl, eb * (b * tl * k + k * cl + b * tl * cl), mm)
    layout = LAYOUTS[s.layout]
    for _ in range(cfg.depth):
        # MLP: gathered [b, tl, C] x [C, Hd/Pc], then [b, tl, Hd/Pc] x [Hd/Pc, C]
        w.add(tag + "gemm mlp", 4 * b * tl * c * hdl, eb * 2 * (b * tl * c + c * hdl + b * tl * hdl), mm)
        sp = layout.spectral_local(cfg, m, b)
        w.add(tag + "gemm spectral", 16 * sp["modes"] * cfg.block_size * sp["channels"],
              4 * 8 * (sp["modes"] * sp["channels"]) * 2, "matmul:float32_highest")
        for name, (flops, nbytes) in sp["ffts"].items():
            w.add(tag + "fft " + name, flops, nbytes, "fft")
        e = b * tl * cl
        w.add(tag + "elementwise layernorm", 2 * ELEMENTWISE["ln_fwd"] * e, 2 * PASSES["ln_fwd"] * e * 4)
        w.add(tag + "elementwise gelu", ELEMENTWISE["gelu_fwd"] * b * tl * hdl, PASSES["gelu_fwd"] * b * tl * hdl * eb)
        w.add(tag + "elementwise filter", ELEMENTWISE["filter_fwd"] * e, PASSES["filter_fwd"] * e * 4)
        w.add(tag + "elementwise block", ELEMENTWISE["block_fwd"] * e, PASSES["block_fwd"] * e * eb)
    if not recompute:
        nout = p0 * p1 * cfg.out_channels
        w.add("gemm head", 2 * b * tl * cl * nout, eb * (b * tl * cl + cl * nout) + 4 * b * tl * nout, mm)


def _backward_work(w: Workload, s: Setting):
    """Backward pass: twice the forward GEMMs (input and weight gradients), transposed FFTs."""
    cfg, m, b, tl, c, hd, cl, hdl, eb, mm = _local_dims(s)
    p0, p1 = cfg.patch_size
    k = p0 * p1 * cfg.in_channels
    # patch embedding: weight gradient only (the input is data)
    w.add("gemm patch_embed", 2 * b * tl * k * cl, eb * (b * tl * k + k * cl + b * tl * cl), mm)
    layout = LAYOUTS[s.layout]
    for _ in range(cfg.depth):
        w.add("gemm mlp", 8 * b * tl * c * hdl, eb * 4 * (b * tl * c + c * hdl + b * tl * hdl), mm)
        sp = layout.spectral_local(cfg, m, b)
        w.add("gemm spectral", 32 * sp["modes"] * cfg.block_size * sp["channels"],
              2 * 4 * 8 * (sp["modes"] * sp["channels"]) * 2, "matmul:float32_highest")
        for name, (flops, nbytes) in sp["ffts_bwd"].items():
            w.add("fft " + name, flops, nbytes, "fft")
        e = b * tl * cl
        w.add("elementwise layernorm", 2 * (ELEMENTWISE["ln_fwd_bwd"] - ELEMENTWISE["ln_fwd"]) * e,
              2 * (PASSES["ln_fwd_bwd"] - PASSES["ln_fwd"]) * e * 4)
        w.add("elementwise gelu", ELEMENTWISE["gelu_bwd"] * b * tl * hdl, PASSES["gelu_bwd"] * b * tl * hdl * eb)
        w.add("elementwise filter", (ELEMENTWISE["filter_fwd_bwd"] - ELEMENTWISE["filter_fwd"]) * e,
              (PASSES["filter_fwd_bwd"] - PASSES["filter_fwd"]) * e * 4)
        w.add("elementwise block", (ELEMENTWISE["block_fwd_bwd"] - ELEMENTWISE["block_fwd"]) * e,
              (PASSES["block_fwd_bwd"] - PASSES["block_fwd"]) * e * eb)
    nout = p0 * p1 * cfg.out_channels
    w.add("gemm head", 4 * b * tl * cl * nout, 2 * (eb * (b * tl * cl + cl * nout) + 4 * b * tl * nout), mm)


def train_step_work(s: Setting) -> Workload:
    """Per-device work of one train step: relative L2 loss over ``rollout`` steps, backward, Adam."""
    w = Workload(devices=s.devices)
    cfg, m = s.model, s.mesh
    for _ in range(s.rollout):
        _forward_work(w, s)
        if cfg.remat:
            _forward_work(w, s, recompute=True)
        _backward_work(w, s)
    lat, lon = cfg.img_size
    out = s.local_batch * (lat // m.height) * (lon // m.width) * cfg.out_channels * s.rollout
    w.add("elementwise loss", ELEMENTWISE["loss_fwd_bwd"] * out, PASSES["loss"] * out * 4)
    pb = param_bytes_per_device(cfg, m, s.layout)
    w.add("elementwise adam", ELEMENTWISE["adam"] * pb / 4, PASSES["adam"] * pb)
    w.collectives = LAYOUTS[s.layout].train_collectives(s, replicated_param_bytes(cfg, m, s.layout))
    return w


def forward_work(s: Setting) -> Workload:
    """Per-device work of one forward pass (inference) at the setting's batch."""
    w = Workload(devices=s.devices)
    _forward_work(w, s)
    w.collectives = LAYOUTS[s.layout].forward_collectives(s)
    return w


# --------------------------------------------------------------------------- #
# Memory per device
# --------------------------------------------------------------------------- #


def activation_bytes_per_block(cfg: ModelConfig, mesh: MeshSizes, b: int, layout: str = "channel_block") -> float:
    """Bytes one block keeps for its backward pass on one device (no remat).

    Counted from the block's code: LayerNorm inputs/outputs and statistics (f32
    for the norm, compute dtype for its output), the filter's spectra at each
    stage (complex64: after the lon rfft, after the lat fft, both MLP layers'
    real and imaginary pre-activations, before the inverse), the skip sums,
    the gathered MLP input and fc1's pre- and post-GELU activations.
    """
    lat, lon = cfg.token_grid
    tl = (lat // mesh.height) * (lon // mesh.width)
    cl, hdl = cfg.embed_dim // mesh.channel, cfg.mlp_hidden // mesh.channel
    eb = DTYPE_BYTES[cfg.compute_dtype]
    e = b * tl * cl
    sp = LAYOUTS[layout].spectral_local(cfg, mesh, b)
    dense = e * (4 + eb + 4 + eb) + e * eb  # norm1 in/out, skip sum, norm2 out, block input
    dense += b * tl * cfg.embed_dim * eb  # gathered MLP input
    dense += 2 * b * tl * hdl * eb  # fc1 pre-GELU and GELU output
    spectral = sp["half_spectrum"] * 8 * 2 + sp["modes"] * sp["channels"] * 8 * 4
    return dense + spectral


def memory_per_device(s: Setting) -> dict:
    """Parameters, optimiser state, gradients, activations kept for the backward (with and without remat), peak."""
    cfg, m = s.model, s.mesh
    b = s.local_batch
    params = param_bytes_per_device(cfg, m, s.layout)
    opt = optimizer_bytes_per_device(cfg, m, s.layout, s.optimizer_counts)
    lat, lon = cfg.token_grid
    tl = (lat // m.height) * (lon // m.width)
    eb = DTYPE_BYTES[cfg.compute_dtype]
    per_block = activation_bytes_per_block(cfg, m, b, s.layout)
    block_in = b * tl * (cfg.embed_dim // m.channel) * eb
    pix = b * (cfg.img_size[0] // m.height) * (cfg.img_size[1] // m.width)
    io = pix * cfg.in_channels * 4 * (s.rollout + 1) + pix * cfg.out_channels * 4 * s.rollout
    full = s.rollout * cfg.depth * per_block
    remat = s.rollout * cfg.depth * block_in + per_block  # block inputs + one block recomputed
    acts = remat if cfg.remat else full
    grads = params
    total = params + opt + grads + acts + io
    return {
        "params": params, "optimizer": opt, "gradients": grads, "activations": acts,
        "activations_no_remat": full, "activations_remat": remat, "inputs": io, "total": total,
        "fits": total <= s.hardware.mem_bytes * s.hardware.usable_fraction,
    }


def forward_memory_per_device(s: Setting) -> float:
    """Inference working set: parameters, input/output, about two blocks' activations."""
    cfg, m = s.model, s.mesh
    per_block = activation_bytes_per_block(cfg, m, s.local_batch, s.layout)
    pix = s.local_batch * (cfg.img_size[0] // m.height) * (cfg.img_size[1] // m.width)
    return param_bytes_per_device(cfg, m, s.layout) + 2 * per_block + pix * (cfg.in_channels + cfg.out_channels) * 4


# --------------------------------------------------------------------------- #
# Time
# --------------------------------------------------------------------------- #


def _op_time(op: OpCost, hw: Hardware, devices_sharing: int) -> tuple[float, float]:
    """(compute time, memory time) of an op class; the larger one counts (roofline)."""
    share = devices_sharing  # emulated CPU devices share one machine
    if op.peak.startswith("matmul:"):
        peak = hw.matmul_peak(op.peak.split(":", 1)[1])
    elif op.peak == "fft":
        peak = hw.fft_peak()
    else:
        peak = hw.vector_flops
    tc = op.flops * share / peak
    tm = op.bytes * share / hw.mem_bw
    return (tc, 0.0) if tc >= tm else (0.0, tm)


def collective_time(colls, hw: Hardware, share: int = 1) -> float:
    t = 0.0
    for c in colls:
        t += hw.link_for_span(c.span).time(c.bytes * c.count * share, c.count)
    return t


def predict_time(w: Workload, hw: Hardware, emulated: bool = False) -> dict:
    """compute / memory / communication / total seconds, no overlap."""
    share = w.devices if emulated else 1
    tc = tm = 0.0
    by_op = {}
    for name, op in w.ops.items():
        c, mem = _op_time(op, hw, share)
        tc += c
        tm += mem
        by_op[name] = c + mem
    tcomm = collective_time(w.collectives, hw, share if emulated else 1)
    return {"compute": tc, "memory": tm, "communication": tcomm, "total": tc + tm + tcomm, "by_op": by_op}


def useful_flops(s: Setting, forward_only: bool = False) -> float:
    """Model flops of the step as one device would run it: the MFU numerator.

    No redundant work of a mesh and no rematerialisation: the step's flops without remat.
    """
    one = dataclasses.replace(s, model=dataclasses.replace(s.model, remat=False), mesh=MeshSizes())
    w = forward_work(one) if forward_only else train_step_work(one)
    return w.flops


def flops_by_class(w: Workload) -> dict:
    out = {}
    for name, op in w.ops.items():
        cls = name.replace("recompute ", "").split()[0]
        out[cls] = out.get(cls, 0.0) + op.flops
    return out
