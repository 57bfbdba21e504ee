"""Multi-host start-up: ``jax.distributed`` from explicit arguments or the environment.

Order of precedence:

1. explicit ``coordinator`` / ``num_processes`` / ``process_id`` (command-line flags);
2. the ``FCN_COORDINATOR`` / ``FCN_NUM_PROCESSES`` / ``FCN_PROCESS_ID`` variables;
3. a SLURM job step with more than one task (``SLURM_NTASKS > 1``): JAX detects the
   coordinator, process count and id from SLURM's variables by itself;
4. otherwise a single process, nothing to initialise.

Command lines reach it through :func:`fcn_jax.cli.start`, which sets the
platform and CPU tuning first. Call before any other JAX operation. Each process then reads only its share of
the data (see :mod:`fcn_jax.data.pipeline`); only process 0 writes logs.
"""

from __future__ import annotations

import os

from fcn_jax.errors import InputError


def initialize(coordinator: str | None = None, num_processes: int | None = None,
               process_id: int | None = None) -> bool:
    """Start ``jax.distributed`` when this is a multi-process run; returns whether it did."""
    import jax

    coordinator = coordinator or os.environ.get("FCN_COORDINATOR")
    if num_processes is None and os.environ.get("FCN_NUM_PROCESSES"):
        num_processes = int(os.environ["FCN_NUM_PROCESSES"])
    if process_id is None and os.environ.get("FCN_PROCESS_ID"):
        process_id = int(os.environ["FCN_PROCESS_ID"])
    if coordinator:
        if num_processes is None or process_id is None:
            raise InputError(
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
