"""Process settings that make XLA:CPU train and forecast faster; nothing changes on GPUs.

**Fresh pages every step** cost the CPU train step most of its gap to PyTorch
(bench/bench_model.py; README "Speed on a CPU against the original"), and it is not
in the model's code. XLA:CPU allocates an executable's temporary buffer (3.3 GB for
the 360x720 train step) with ``posix_memalign`` on one of its worker threads. glibc
serves a request that large from ``mmap`` -- always in a thread's own arena, whatever
``M_MMAP_THRESHOLD`` says -- and ``munmap``s it on free, so the kernel zero-fills
3.3 GB of pages on every step: 850 k page faults and ~5 s of system time per step on
a 2-core VM. :func:`keep_host_memory` routes every thread to the main arena, forbids
``mmap`` for allocations and stops ``free`` from trimming the heap, so the buffer of
the previous step is reused (a handful of faults, 0.1 s). The price: the process
keeps its peak heap until it exits -- which a training or forecast process reaches
again at every step anyway.

The dot library is left as XLA chooses. Turning XLA's YNNPACK fusions off (Eigen
dots, ``--xla_cpu_experimental_ynn_fusion_type=``) was tried and dropped: with the
heap kept it gained nothing on the 360x720 step (10.95 s against 10.50-10.80 s, same
run) and cost 1.5-2x on the world-sized models (0.6-0.76 s against 1.3-1.5 s per
batch-16 step) and 2x in the world generator.

:func:`tune_cpu_process` applies the setting when the process will run on the CPU
backend, before JAX creates its backend; the command lines call it first. Set
``FCN_JAX_CPU_TUNING=0`` to leave the process as it was.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import importlib.util
import os
import platform
import sys

# glibc mallopt parameters (malloc.h)
_M_TRIM_THRESHOLD = -1
_M_MMAP_MAX = -4
_M_ARENA_MAX = -8

_GPU_PLUGINS = ("jax_cuda12_plugin", "jax_cuda13_plugin", "jax_rocm60_plugin", "jax_rocm7_plugin")


def will_run_on_cpu() -> bool:
    """True when JAX's default backend will be the CPU, judged without starting a backend.

    ``JAX_PLATFORMS`` decides when set (its first entry); otherwise the CPU is
    the backend unless a GPU plugin is installed.
    """
    platforms = os.environ.get("JAX_PLATFORMS", "").strip()
    if platforms:
        return platforms.split(",")[0].strip().lower() == "cpu"
    return not any(importlib.util.find_spec(p) is not None for p in _GPU_PLUGINS)


def _backend_started() -> bool:
    xb = sys.modules.get("jax._src.xla_bridge")
    return bool(getattr(xb, "_backends", None))


def keep_host_memory() -> str:
    """glibc only: one malloc arena, no mmap'ed allocations, no heap trimming; returns what was done."""
    if sys.platform != "linux" or platform.libc_ver()[0] != "glibc":
        return "not glibc: allocator unchanged"
    libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    mallopt = libc.mallopt
    mallopt.argtypes = (ctypes.c_int, ctypes.c_int)
    mallopt.restype = ctypes.c_int
    # Threads that already have an arena keep it, so this must run before JAX starts its
    # thread pools. -1 for the trim threshold is SIZE_MAX inside glibc (its setter takes a
    # size_t): never trim -- an int threshold (<= 2 GiB) would still release the 3.3 GB buffer.
    ok = all(mallopt(p, v) == 1 for p, v in ((_M_ARENA_MAX, 1), (_M_MMAP_MAX, 0), (_M_TRIM_THRESHOLD, -1)))
    if not ok:
        return "mallopt refused: allocator unchanged"
    if _backend_started():
        # e.g. forecast.main called in-process after JAX ran: XLA's threads keep their own arenas
        return "heap kept between steps, except for threads JAX started earlier (they keep their arenas)"
    return "heap kept between steps (one arena, no mmap, no trim)"


def tune_cpu_process() -> dict[str, str]:
    """Apply :func:`keep_host_memory` when the process runs on the CPU.

    Call first thing in a command line, before anything starts the JAX backend.
    Returns {setting: what was done}; empty when not applied (GPU backend, or
    ``FCN_JAX_CPU_TUNING=0``).
    """
    if os.environ.get("FCN_JAX_CPU_TUNING", "1").strip() in ("0", "false", "no", "off"):
        return {}
    if not will_run_on_cpu():
        return {}
    return {"allocator": keep_host_memory()}
