"""Hardware entries of the performance model: peaks, memory, links.

Every number is a *speed of light* (vendor datasheet, dense, no sparsity) or,
for the CPU, a measured peak of this machine (:func:`calibrate_cpu`). Nothing
here is fitted to a FourCastNet step.

Links follow an alpha-beta model per link type: a collective over a group that
stays inside one node uses ``intra`` (NVLink), one that spans nodes ``inter``
(InfiniBand, one NIC per GPU); ``beta`` is the per-direction bandwidth a device
can drive, ``alpha`` the fixed latency of one collective.
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
from dataclasses import dataclass
from pathlib import Path

TB = 1e12
GB = 1e9


@dataclass(frozen=True)
class Link:
    """alpha-beta link: time(bytes) = alpha + bytes / beta."""

    name: str
    alpha_s: float
    beta_bytes_per_s: float

    def time(self, nbytes: float, count: int = 1) -> float:
        return count * self.alpha_s + nbytes / self.beta_bytes_per_s if nbytes > 0 else 0.0


@dataclass(frozen=True)
class Hardware:
    """One accelerator (or this CPU) and its links.

    ``matmul_flops``: dense matmul peak per compute dtype ("float32" at the
    default precision -- TF32 on NVIDIA tensor cores -- and "float32_highest",
    true IEEE fp32, which the spectral block MLP asks for); ``vector_flops``:
    fp32 non-tensor-core peak (FFT butterflies, elementwise); ``mem_bw``: DRAM
    bandwidth in bytes/s; ``mem_bytes``: memory per device.
    """

    name: str
    matmul_flops: dict
    vector_flops: float
    mem_bw: float
    mem_bytes: float
    intra: Link
    inter: Link
    devices_per_node: int = 8
    #: fraction of ``mem_bytes`` usable by the program (runtime, CUDA context, fragmentation)
    usable_fraction: float = 0.95
    #: FFT rate in XLA's flop convention (``8*floor(log2 n)`` per element); None: ``vector_flops``
    fft_flops: float | None = None
    notes: str = ""

    def matmul_peak(self, dtype: str) -> float:
        return self.matmul_flops[dtype]

    def peak_for_mfu(self, dtype: str) -> float:
        """The peak MFU is quoted against: the compute dtype's matmul peak."""
        return self.matmul_flops[dtype]

    def fft_peak(self) -> float:
        return self.fft_flops or self.vector_flops

    def link_for_span(self, span: int) -> Link:
        """Link of a collective group whose devices lie within ``span`` consecutive devices."""
        return self.intra if span <= self.devices_per_node else self.inter

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


NVLINK3 = Link("NVLink3", 10e-6, 300 * GB)  # A100 SXM: 600 GB/s bidirectional, 300 per direction
NVLINK4 = Link("NVLink4", 10e-6, 450 * GB)  # H100/H200 SXM: 900 GB/s bidirectional
IB_HDR = Link("InfiniBand HDR", 20e-6, 25 * GB)  # 200 Gb/s per GPU
IB_NDR = Link("InfiniBand NDR", 20e-6, 50 * GB)  # 400 Gb/s per GPU

_A100 = dict(matmul_flops={"bfloat16": 312 * TB, "float32": 156 * TB, "float32_highest": 19.5 * TB},
             vector_flops=19.5 * TB, intra=NVLINK3, inter=IB_HDR)
_H100 = dict(matmul_flops={"bfloat16": 989 * TB, "float32": 494 * TB, "float32_highest": 66.9 * TB},
             vector_flops=66.9 * TB, intra=NVLINK4, inter=IB_NDR)

HARDWARE: dict[str, Hardware] = {
    "a100-40gb": Hardware("NVIDIA A100-SXM4-40GB", mem_bw=1.555 * TB, mem_bytes=40 * 2**30, **_A100),
    "a100-80gb": Hardware("NVIDIA A100-SXM4-80GB", mem_bw=2.039 * TB, mem_bytes=80 * 2**30, **_A100),
    "h100": Hardware("NVIDIA H100-SXM5-80GB", mem_bw=3.35 * TB, mem_bytes=80 * 2**30, **_H100),
    "h200": Hardware("NVIDIA H200-SXM-141GB", mem_bw=4.8 * TB, mem_bytes=141 * GB, **_H100),
}

#: This development CPU (2 cores, AVX-512 + AMX), measured once (jax-notes §14 and
#: ``python -m fcn_jax.perf --calibrate``): XLA:CPU fp32 matmul of the MLP's shape
#: 231 GFLOP/s, bf16 199 GFLOP/s. ``vector_flops`` and ``mem_bw`` are placeholders
#: replaced by :func:`calibrate_cpu` results when a calibration file exists.
CPU_MEASURED = Hardware(
    "this CPU (XLA:CPU, measured)",
    matmul_flops={"bfloat16": 199e9, "float32": 231e9, "float32_highest": 231e9},
    vector_flops=20e9,
    mem_bw=10 * GB,
    mem_bytes=24 * GB,
    # emulated devices are threads of one process: a collective is a memory copy
    intra=Link("memcpy", 20e-6, 5 * GB),
    inter=Link("memcpy", 20e-6, 5 * GB),
    devices_per_node=1 << 30,
    usable_fraction=1.0,
    notes="emulated CPU devices share 2 cores: per-device rates are the machine's rates / devices",
)


def _cache_path() -> Path:
    root = os.environ.get("FCN_JAX_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "fcn_jax")
    return Path(root) / "perf_cpu_calibration.json"


def timed_runs(fn, runs: int, warmup: int = 1) -> list[float]:
    """Wall seconds of ``runs`` calls of ``fn`` (its result blocked on), after ``warmup`` untimed calls."""
    import jax

    for _ in range(warmup):
        jax.block_until_ready(fn())
    out = []
    for _ in range(runs):
        t0 = time.perf_counter()
        jax.block_until_ready(fn())
        out.append(time.perf_counter() - t0)
    return out


def _best_time(fn, repeats: int) -> float:
    return min(timed_runs(fn, repeats))


def calibrate_cpu(repeats: int = 5, save: bool = True) -> dict:
    """Measure this CPU's peaks with XLA:CPU (a few seconds) and cache them.

    * matmul: ``[4096, 768] @ [768, 3072]`` (the MLP's fc1 at 4096 tokens), fp32 and bf16;
    * vector: a chain of 16 fused fused-multiply-adds on a cache-resident array (flops/s);
    * memory: ``y = x + 1`` on 256 MB arrays (bytes read + written per second);
    * fft: batched complex FFT of length 180 (XLA's flop convention, see ``flops.py``).
    """
    import jax
    import jax.numpy as jnp

    out = {}
    for dt, name in ((jnp.float32, "float32"), (jnp.bfloat16, "bfloat16")):
        a = jnp.ones((4096, 768), dt)
        b = jnp.ones((768, 3072), dt)
        f = jax.jit(lambda a, b: jnp.dot(a, b, preferred_element_type=jnp.float32))
        t = _best_time(lambda: f(a, b), repeats)
        out[f"matmul_{name}"] = 2 * 4096 * 768 * 3072 / t
    x = jnp.ones((64 * 1024,), jnp.float32)

    def chain(v):
        for _ in range(16):
            v = v * 1.0001 + 0.5
        return v

    f = jax.jit(chain)
    t = _best_time(lambda: f(x), repeats * 4)
    out["vector"] = 32 * x.size / t
    big = jnp.ones((64 * 1024 * 1024,), jnp.float32)
    f = jax.jit(lambda v: v + 1.0)
    t = _best_time(lambda: f(big), repeats)
    out["mem_bw"] = 2 * big.nbytes / t
    z = jnp.ones((4096, 180), jnp.complex64)
    f = jax.jit(lambda v: jnp.fft.fft(v, axis=-1))
    t = _best_time(lambda: f(z), repeats)
    out["fft"] = 8 * 7 * z.size / t  # XLA's count: 8 * floor(log2 180) per element
    out["jax"] = jax.__version__
    out["measured_at"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    if save:
        path = _cache_path()
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(out, indent=2))
        tmp.replace(path)
    return out


def cpu_hardware(calibration: dict | None = None) -> Hardware:
    """The CPU entry with measured peaks (a calibration dict, the cached file, or the notes' figures)."""
    if calibration is None:
        path = _cache_path()
        if path.exists():
            try:
                calibration = json.loads(path.read_text())
            except (OSError, ValueError):
                calibration = None
    if not calibration:
        return CPU_MEASURED
    mm = {"float32": calibration["matmul_float32"], "bfloat16": calibration["matmul_bfloat16"],
          "float32_highest": calibration["matmul_float32"]}
    copy = Link("memcpy", 20e-6, calibration["mem_bw"] / 2)
    return dataclasses.replace(
        CPU_MEASURED, matmul_flops=mm, vector_flops=calibration["vector"], mem_bw=calibration["mem_bw"],
        fft_flops=calibration.get("fft"), intra=copy, inter=copy,
        notes=CPU_MEASURED.notes + f"; calibrated {calibration.get('measured_at', '?')}",
    )


def detect_hardware(device) -> str | None:
    """Key of :data:`HARDWARE` for a ``jax.Device`` (``cpu`` for a CPU device, None when unknown)."""
    if device.platform == "cpu":
        return "cpu"
    kind = (getattr(device, "device_kind", "") or "").lower()
    if "h200" in kind or "gh200" in kind:
        return "h200"
    if "h100" in kind or "h800" in kind:
        return "h100"
    if "a100" in kind or "a800" in kind:
        if "80" in kind:
            return "a100-80gb"
        if "40" in kind:
            return "a100-40gb"
        try:
            limit = device.memory_stats().get("bytes_limit", 0)
        except Exception:  # noqa: BLE001 - memory_stats is optional on some backends
            limit = 0
        return "a100-80gb" if limit > 48 * 2**30 else "a100-40gb"
    return None


def get_hardware(name: str) -> Hardware:
    """Hardware entry by name: one of :data:`HARDWARE` or ``cpu``."""
    key = name.lower()
    if key == "cpu":
        return cpu_hardware()
    if key not in HARDWARE:
        raise ValueError(f"unknown hardware {name!r}; valid: {sorted(HARDWARE) + ['cpu']}")
    return HARDWARE[key]


__all__ = ["HARDWARE", "Hardware", "Link", "calibrate_cpu", "cpu_hardware", "detect_hardware", "get_hardware",
           "timed_runs"]
