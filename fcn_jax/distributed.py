"""Multi-host start-up: ``jax.distributed`` from explicit arguments or the environment.

Order of precedence:

1. explicit ``coordinator`` / ``num_processes`` / ``process_id`` (command-line flags);
2. the ``FCN_COORDINATOR`` / ``FCN_NUM_PROCESSES`` / ``FCN_PROCESS_ID`` variables;
3. a SLURM job step with more than one task (``SLURM_NTASKS > 1``): JAX detects the
   coordinator, process count and id from SLURM's variables by itself;
4. otherwise a single process, nothing to initialise.

Call before any other JAX operation. Each process then reads only its share of
the data (see :mod:`fcn_jax.data.pipeline`); only process 0 writes logs.
"""

from __future__ import annotations

import os
import sys


def add_arguments(ap) -> None:
    """The multi-host flags every entry point shares (``train``, ``forecast``), as an argparse group."""
    g = ap.add_argument_group("multi-host (jax.distributed; SLURM is detected without flags)")
    g.add_argument("--coordinator", default=None, help="HOST:PORT of process 0")
    g.add_argument("--num-processes", type=int, default=None, help="processes in the run")
    g.add_argument("--process-id", type=int, default=None, help="this process's index, 0 .. num-processes - 1")
    g.add_argument("--cpu-devices", type=int, default=0,
                   help="emulate N CPU devices per process (testing a mesh without accelerators)")


def start_from_args(args) -> bool:
    """A command line's start-up from the flags of :func:`add_arguments`, in the order it needs.

    1. ``--cpu-devices``: the CPU platform (``JAX_PLATFORMS=cpu`` unless the user set one; also the
       jax option, since jax reads the variable when it is imported);
    2. :func:`fcn_jax.cpu_runtime.tune_cpu_process` -- before the backend starts, CPU only;
    3. :func:`initialize` (``jax.distributed`` when this is a multi-process run; returns whether it is).
    """
    if args.cpu_devices:
        os.environ.setdefault("JAX_PLATFORMS", "cpu")
        if "jax" in sys.modules:
            sys.modules["jax"].config.update("jax_platforms", os.environ["JAX_PLATFORMS"])
    from fcn_jax.cpu_runtime import tune_cpu_process

    tune_cpu_process()
    return initialize(args.coordinator, args.num_processes, args.process_id, cpu_devices=args.cpu_devices)


def initialize(coordinator: str | None = None, num_processes: int | None = None, process_id: int | None = None,
               cpu_devices: int = 0) -> bool:
    """Start ``jax.distributed`` when this is a multi-process run; returns whether it did."""
    import jax

    if cpu_devices:
        jax.config.update("jax_num_cpu_devices", cpu_devices)
    coordinator = coordinator or os.environ.get("FCN_COORDINATOR")
    if num_processes is None and os.environ.get("FCN_NUM_PROCESSES"):
        num_processes = int(os.environ["FCN_NUM_PROCESSES"])
    if process_id is None and os.environ.get("FCN_PROCESS_ID"):
        process_id = int(os.environ["FCN_PROCESS_ID"])
    if coordinator:
        if num_processes is None or process_id is None:
            raise ValueError(
                "a coordinator address needs --num-processes and --process-id "
                "(or FCN_NUM_PROCESSES / FCN_PROCESS_ID)"
            )
        jax.distributed.initialize(coordinator_address=coordinator, num_processes=num_processes,
                                   process_id=process_id)
        return True
    if int(os.environ.get("SLURM_NTASKS", "1")) > 1 and "SLURM_JOB_ID" in os.environ:
        jax.distributed.initialize()  # SLURM cluster detection
        return True
    return False


def is_primary() -> bool:
    import jax

    return jax.process_index() == 0
