"""``python -m fcn_jax.train EXPERIMENT [--workdir DIR] [--set section.key=value ...]``.

Runs (or resumes) an experiment: pre-training, multi-step fine-tuning or
precipitation training, as the experiment's ``train.mode`` says. EXPERIMENT is
a name under ``experiments/`` or a path to a YAML file. Multi-host: launch one
process per host (or per GPU) under SLURM and it is detected, or pass
``--coordinator HOST:PORT --num-processes N --process-id I``.
"""

from __future__ import annotations

import argparse
import os
import sys

from fcn_jax import distributed


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python -m fcn_jax.train", description=__doc__.split("\n\n")[1])
    ap.add_argument("experiment", help="experiment name under experiments/ or a YAML path")
    ap.add_argument("--workdir", default=None, help="run directory (default: runs/<experiment name>)")
    ap.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE",
                    help="override any experiment value (repeatable)")
    ap.add_argument("--max-steps", type=int, default=None,
                    help="stop after this many steps in this invocation (the schedule follows train.steps)")
    ap.add_argument("--no-progress", action="store_true", help="no progress bar")
    ap.add_argument("--verify-checkpoints", action="store_true",
                    help="only verify the run directory's checkpoints and exported models, then exit (1: damaged)")
    distributed.add_arguments(ap)
    return ap


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    distributed.start_from_args(args)  # platform, CPU tuning, jax.distributed: before anything runs on JAX

    from fcn_jax.config import ConfigError, load_experiment
    from fcn_jax.data.errors import DataError
    from fcn_jax.parallel.mesh import MeshError
    from fcn_jax.training.loop import NonFiniteLossError, train

    try:
        cfg = load_experiment(args.experiment, args.overrides)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    workdir = args.workdir or os.path.join("runs", cfg.name)
    if args.verify_checkpoints:
        from fcn_jax.checkpoint import verify_path

        ok, lines = verify_path(workdir)
        print("\n".join(lines))
        return 0 if ok else 1
    from fcn_jax.integrity import IntegrityError
    from fcn_jax.training.checkpointing import CheckpointDamagedError, CheckpointSpaceError
    from fcn_jax.training.runlock import RunLockedError

    try:
        summary = train(cfg, workdir, progress=not args.no_progress, max_steps=args.max_steps)
    except (MeshError, DataError, FileNotFoundError, ValueError, RunLockedError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except NonFiniteLossError as e:
        print(f"error: {e}", file=sys.stderr)
        return 3
    except CheckpointSpaceError as e:
        print(f"error: {e}", file=sys.stderr)
        return 4
    except (CheckpointDamagedError, IntegrityError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 5
    import jax

    if jax.process_index() == 0:
        print(f"run {workdir}: {summary}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
