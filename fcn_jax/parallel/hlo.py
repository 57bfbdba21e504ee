"""What a compiled program says: its HLO text (collectives, their bytes, an op census) and XLA's statistics.

The one reader of compiled programs, for the communication assertions of the
tests, the performance model's check (:mod:`fcn_jax.perfmodel.compiler`) and
the bench scripts. Everything takes what ``jax.jit(f).lower(...).compile()``
gives (``as_text()``, ``memory_analysis()``, ``cost_analysis()``); nothing here
compiles.
"""

from __future__ import annotations

import math
import re

COLLECTIVES = ("all-to-all", "all-gather", "reduce-scatter", "all-reduce", "collective-permute")

#: Bytes per element of the HLO element types.
DTYPE_BYTES = {
    "pred": 1, "s8": 1, "u8": 1, "s16": 2, "u16": 2, "f16": 2, "bf16": 2, "s32": 4, "u32": 4, "f32": 4,
    "s64": 8, "u64": 8, "f64": 8, "c64": 8, "c128": 16,
}  # fmt: skip

_ARRAY = re.compile(r"\b(" + "|".join(DTYPE_BYTES) + r")\[([\d,]*)\]")
# `%name = f32[2,8,16]{...} all-gather(...), replica_groups=...`, also the async `-start` forms used on GPU
_COLLECTIVE = re.compile(
    r"^\s*(?:ROOT\s+)?%?[\w.\-]+\s*=\s*(?P<shape>.*?)\s(?P<op>" + "|".join(COLLECTIVES)
    + r")(?P<start>-start)?\((?P<rest>.*)$", re.M,
)
# any instruction: `%name = SHAPE op(`
_INSTRUCTION = re.compile(r"\s*(?:ROOT )?%?[\w.\-]+ = (\(.*?\)|\S+) ([\w\-]+)\(")


def shape_bytes(text: str) -> int:
    """Bytes of every array shape written in ``text`` (``f32[2,3]{1,0}``, tuples of them, ...)."""
    total = 0
    for dt, dims in _ARRAY.findall(text):
        total += DTYPE_BYTES[dt] * math.prod(int(d) for d in dims.split(",") if d)
    return total


# --------------------------------------------------------------------------- #
# Collectives
# --------------------------------------------------------------------------- #


def collective_counts(hlo_text: str) -> dict[str, int]:
    """How many of each collective the compiled program contains."""
    counts = dict.fromkeys(COLLECTIVES, 0)
    for m in _COLLECTIVE.finditer(hlo_text):
        counts[m.group("op")] += 1
    return counts


def collective_shapes(hlo_text: str, op: str) -> list[str]:
    """Result shapes (text) of every instance of collective ``op``."""
    return [m.group("shape") for m in _COLLECTIVE.finditer(hlo_text) if m.group("op") == op]


def _group_size(rest: str, n_devices: int) -> int:
    # mesh form: replica_groups=mesh['axis_0'=2,...][, device_ids=(...)] {'axis_1','axis_2'}
    m = re.search(r"replica_groups=mesh\[([^\]]*)\][^{]*\{([^}]*)\}", rest)
    if m:
        sizes = {k: int(v) for k, v in re.findall(r"'([^']+)'=(\d+)", m.group(1))}
        names = re.findall(r"'([^']+)'", m.group(2))
        return math.prod(sizes[n] for n in names)
    m = re.search(r"replica_groups=\{(\{[\d,]*\})", rest)
    if m:
        inner = m.group(1).strip("{}")
        return len([x for x in inner.split(",") if x]) or n_devices
    m = re.search(r"replica_groups=\[([\d,]+)\]<=", rest)  # iota form [groups, size]<=[...]
    if m:
        return int(m.group(1).split(",")[-1])
    return n_devices  # replica_groups={} = all devices


def collective_bytes(hlo_text: str, n_devices: int) -> dict[str, float]:
    """Bytes moved per device by each collective kind (the convention of :mod:`fcn_jax.perfmodel.layouts`).

    all-to-all and all-gather: (P-1)/P of the result; reduce-scatter: P-1 times
    the result (= (P-1)/P of the input); all-reduce: 2(P-1)/P (ring);
    collective-permute: the result once. P is the size of the replica group.
    """
    out = dict.fromkeys(COLLECTIVES, 0.0)
    for m in _COLLECTIVE.finditer(hlo_text):
        op, shape, rest = m.group("op"), m.group("shape"), m.group("rest")
        nbytes = shape_bytes(shape)
        if m.group("start") and shape.lstrip().startswith("(") and op in ("all-gather", "all-reduce"):
            # async start ops return (operand(s), result(s)): count the result half only
            nbytes = nbytes / 2 if op == "all-reduce" else nbytes  # all-gather: approximate
        if op == "collective-permute":
            out[op] += nbytes
            continue
        p = _group_size(rest, n_devices)
        if p <= 1:
            continue
        factor = {"all-to-all": (p - 1) / p, "all-gather": (p - 1) / p, "reduce-scatter": p - 1,
                  "all-reduce": 2 * (p - 1) / p}[op]
        out[op] += nbytes * factor
    return out


# --------------------------------------------------------------------------- #
# Every top-level op
# --------------------------------------------------------------------------- #

_SKIP_OPS = {"parameter", "constant", "bitcast", "tuple", "get-tuple-element", "after-all", "partition-id"}
_ELEMENTWISE = r" (add|subtract|multiply|divide|select|maximum|exponential|erf|rsqrt|compare|negate)\("


def op_census(hlo_text: str) -> dict:
    """Top-level ops of an optimised HLO module by class: {class: {"count", "out_bytes"}}.

    Classes, by what a (fused) instruction computes, in this priority: ``dot``, ``fft``,
    ``collective``, ``reduce``, ``layout`` (a transpose or copy: data moved, nothing computed),
    ``elementwise``, ``other``. ``out_bytes`` sums the bytes each writes -- a memory-traffic proxy
    that shows, e.g., transposed copies feeding the dots of a backward pass. Sorted by bytes.
    """
    bodies = {}
    for m in re.finditer(r"^%?([\w.\-]+) [^\n]*\{\n(.*?)^\}", hlo_text, re.S | re.M):
        bodies[m.group(1)] = m.group(2)
    entry = hlo_text[hlo_text.index("ENTRY"):]
    entry = entry[: entry.index("\n}")]
    collective = re.compile(r" (" + "|".join(COLLECTIVES) + r")[\w\-]*\(")
    out: dict = {}
    for line in entry.splitlines()[1:]:
        m = _INSTRUCTION.match(line)
        if not m or m.group(2) in _SKIP_OPS:
            continue
        shape, op = m.groups()
        body = line
        if op == "fusion":
            called = re.search(r"calls=%?([\w.\-]+)", line)
            body = bodies.get(called.group(1), "") if called else ""
        if re.search(r" (dot|convolution)\(", body) or op in ("dot", "convolution"):
            cls = "dot"
        elif op == "fft" or " fft(" in body:
            cls = "fft"
        elif collective.search(line):
            cls = "collective"
        elif op in ("reduce", "reduce-window") or re.search(r" reduce(-window)?\(", body):
            cls = "reduce"
        elif op in ("copy", "transpose") or (op == "fusion" and re.search(r" (copy|transpose)\(", body)
                                             and not re.search(_ELEMENTWISE, body)):
            cls = "layout"
        elif op == "fusion" or op in ("add", "multiply", "subtract", "divide", "select", "maximum", "negate"):
            cls = "elementwise"
        else:
            cls = "other"
        c = out.setdefault(cls, {"count": 0, "out_bytes": 0})
        c["count"] += 1
        c["out_bytes"] += shape_bytes(shape)
    return dict(sorted(out.items(), key=lambda kv: -kv[1]["out_bytes"]))


# --------------------------------------------------------------------------- #
# XLA's statistics and the bytes of sharded arguments
# --------------------------------------------------------------------------- #


#: What :func:`stablehlo_op_counts` counts in a lowered (not yet partitioned) module.
STABLEHLO_OPS = ("all_to_all", "all_gather", "all_reduce", "reduce_scatter", "collective_permute", "fft",
                 "custom_call")


def stablehlo_op_counts(mlir_text: str) -> dict[str, int]:
    """Collectives, FFTs and custom calls in a lowered StableHLO module (``jax.export``'s ``mlir_module()``).

    Before SPMD partitioning only ``shard_map``'s explicit collectives are there: comparing the counts of
    one program lowered for two platforms shows whether both lower it alike (``tests/test_gpu_lowering.py``).
    """
    return {op: len(re.findall(r"stablehlo\." + op + r"\b", mlir_text)) for op in STABLEHLO_OPS}


def memory_stats(compiled) -> dict[str, int]:
    """``compiled.memory_analysis()`` per device, in bytes, with ``total = argument + output - alias + temp``.

    On XLA:CPU ``peak_memory`` leaves the temporaries out, so ``total`` is the footprint to read.
    """
    m = compiled.memory_analysis()
    out = {k: int(getattr(m, k + "_size_in_bytes")) for k in ("argument", "output", "alias", "temp", "generated_code")}
    out["peak_memory"] = int(getattr(m, "peak_memory_in_bytes", -1))
    out["total"] = out["argument"] + out["output"] - out["alias"] + out["temp"]
    return out


def cost_flops(compiled_or_lowered) -> float:
    """FLOPs of ``cost_analysis()``: per device for a compiled program, global for a lowered one (NaN if absent)."""
    ca = compiled_or_lowered.cost_analysis()
    if isinstance(ca, (list, tuple)):  # older JAX returned a list of dicts
        ca = ca[0] if ca else {}
    return float((ca or {}).get("flops", float("nan")))


def local_bytes(tree) -> int:
    """Bytes one device holds of a tree of sharded ``ShapeDtypeStruct``s / arrays (a program's arguments)."""
    import jax

    total = 0
    for x in jax.tree.leaves(tree):
        shape = x.sharding.shard_shape(x.shape) if getattr(x, "sharding", None) is not None else x.shape
        total += math.prod(shape) * x.dtype.itemsize
    return total
