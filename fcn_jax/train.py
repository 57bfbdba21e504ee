"""``python -m fcn_jax.train EXPERIMENT [--workdir DIR] [--set section.key=value ...]``.

Runs (or resumes) an experiment: pre-training, multi-step fine-tuning or
precipitation training, as the experiment's ``train.mode`` says. EXPERIMENT is
a name under ``experiments/`` or a path to a YAML file. Multi-host: launch one
process per host (or per GPU) under SLURM and it is detected, or pass
``--coordinator HOST:PORT --num-processes N --process-id I``. Exit codes:
:mod:`fcn_jax.errors` (0 done, 2 bad input, 3 non-finite loss, 4 disk full,
5 damaged checkpoint; ``--verify-checkpoints``: 1 damaged).
"""

from __future__ import annotations

import os
import sys

from fcn_jax import cli


def build_parser():
    ap = cli.parser("train", __doc__.split("\n\n")[1])
    cli.add_experiment(ap)
    cli.add_mesh(ap)
    cli.add_store(ap, help="the training store: a path or 'world' (the experiment's world); default: data.store")
    ap.add_argument("--workdir", default=None, help="run directory (default: runs/<experiment name>)")
    ap.add_argument("--max-steps", type=int, default=None,
                    help="stop after this many steps in this invocation (the schedule follows train.steps)")
    ap.add_argument("--no-progress", action="store_true", help="no progress bar")
    ap.add_argument("--verify-checkpoints", action="store_true",
                    help="only verify the run directory's checkpoints and exported models, then exit (1: damaged)")
    cli.add_runtime(ap)
    return ap


def main(argv=None) -> int:
    args = cli.parse(build_parser(), argv)

    def body() -> int:
        cfg = cli.load_experiment(args, mesh=True, store=True)
        workdir = args.workdir or os.path.join("runs", cfg.name)
        if args.verify_checkpoints:
            from fcn_jax.checkpoints.package import verify_path, verify_summary

            verdict, lines = verify_path(workdir)
            code, summary = verify_summary([verdict])
            print("\n".join(lines + [summary]))
            return code
        cli.start(args)  # platform, CPU tuning, jax.distributed: before anything runs on JAX
        from fcn_jax.training.loop import train

        summary = train(cfg, workdir, progress=not args.no_progress, max_steps=args.max_steps)
        if cli.is_primary():
            print(f"run {workdir}: {summary}")
        return 0

    return cli.run(body)


if __name__ == "__main__":
    sys.exit(main())
