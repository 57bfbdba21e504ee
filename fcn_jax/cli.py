"""The one command-line layer: every ``python -m fcn_jax.<command>`` parses, starts and exits through here.

What each command shares, declared once:

* **the experiment**: the first positional argument where a command takes one
  (``--experiment NAME`` is the same thing), with ``--set SECTION.KEY=VALUE``
  overrides (repeatable) -- :func:`add_experiment`, :func:`load_experiment`;
* **the mesh**: ``--mesh D,C,H,W``, one size may be ``-1`` (the remaining
  devices), written ``--mesh -1,1,2,2`` or ``--mesh=-1,1,2,2`` --
  :func:`add_mesh`, :func:`parse_mesh`;
* **the store**: ``--store PATH`` or ``world``, the embedded world of the
  experiment's ``data.world_seed`` and ``data.world_days`` -- :func:`add_store`,
  :func:`resolve_store`;
* **start-up**: the platform, CPU tuning and ``jax.distributed``, in the order
  they must happen, before anything touches a JAX backend -- :func:`add_runtime`,
  :func:`start`;
* **exit codes**, mapped from the exception's type (:mod:`fcn_jax.errors`):
  :func:`run` prints ``error: MESSAGE`` and returns the code; anything else is
  a bug and keeps its traceback.

This module imports no JAX at import time, so ``--help`` is instant and the
platform can still be chosen after the flags are parsed.
"""

from __future__ import annotations

import argparse
import os
import re
import sys
from pathlib import Path
from typing import Callable, Sequence

from fcn_jax import errors

__all__ = ["parser", "add_experiment", "load_experiment", "add_mesh", "parse_mesh", "parse_init_times", "add_store",
           "resolve_store",
           "add_runtime", "start", "run", "is_primary"]


def parser(prog: str, doc: str | None, *, raw: bool = False) -> argparse.ArgumentParser:
    """An argparse parser for ``python -m fcn_jax.<prog>`` with the module docstring's first paragraph."""
    description = (doc or "").strip() if raw else (doc or "").strip().split("\n\n")[0]
    return argparse.ArgumentParser(
        prog=f"python -m fcn_jax.{prog}", description=description,
        formatter_class=argparse.RawDescriptionHelpFormatter if raw else argparse.HelpFormatter)


# --------------------------------------------------------------------------- #
# Experiment and overrides
# --------------------------------------------------------------------------- #


def add_experiment(ap: argparse.ArgumentParser, *, default: str | None = None, positional: bool = True,
                   help: str | None = None) -> None:
    """The experiment (positional ``EXPERIMENT``, or ``--experiment``) and ``--set`` overrides.

    ``positional=False`` for a command whose positional argument is something
    else (``convert``'s checkpoint, ``forecast``'s model): then only
    ``--experiment``. Without a ``default`` the experiment is required.
    """
    text = help or "experiment name under experiments/ or a YAML path"
    if default is not None:
        text += f" (default {default})"
    if positional:
        ap.add_argument("experiment", nargs="?", default=None, metavar="EXPERIMENT", help=text)
        ap.add_argument("--experiment", dest="experiment_option", default=None, metavar="NAME",
                        help="the same as EXPERIMENT")
    else:
        ap.add_argument("--experiment", dest="experiment_option", default=None, metavar="NAME", help=text)
    ap.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE",
                    help="override an experiment value (repeatable)")
    ap.set_defaults(_experiment_default=default, _experiment_positional=positional, _experiment_parser=ap)


def experiment_name(args: argparse.Namespace) -> str | None:
    """The experiment the command line names (positional or ``--experiment``), else the command's default."""
    given = [v for v in (getattr(args, "experiment", None), getattr(args, "experiment_option", None)) if v]
    if len(given) == 2 and given[0] != given[1]:
        args._experiment_parser.error(f"two experiments given: {given[0]!r} and --experiment {given[1]!r}")
    return given[0] if given else args._experiment_default


def load_experiment(args: argparse.Namespace, *, required: bool = True, mesh: bool = False, store: bool = False):
    """The :class:`~fcn_jax.config.ExperimentConfig` the command line names, with its ``--set`` overrides.

    ``mesh``/``store``: ``--mesh`` and ``--store`` given on the command line
    become overrides of the experiment's ``mesh.*`` sizes and ``data.store``
    (after the ``--set`` ones: the explicit flag wins).
    """
    from fcn_jax.config import load_experiment as load

    overrides = list(args.overrides)
    if mesh and getattr(args, "mesh", None):
        overrides += [f"mesh.{axis}={n}" for axis, n in zip(("data", "channel", "height", "width"), args.mesh)]
    if store and getattr(args, "store", None):
        overrides.append(f"data.store={args.store}")
    name = experiment_name(args)
    if name is None:
        if required:
            args._experiment_parser.error("an experiment is required (EXPERIMENT or --experiment NAME)")
        if args.overrides:
            args._experiment_parser.error("--set needs an experiment (EXPERIMENT or --experiment NAME)")
        return None
    return load(name, overrides)


# --------------------------------------------------------------------------- #
# Mesh
# --------------------------------------------------------------------------- #


def parse_mesh(text: str) -> tuple[int, int, int, int]:
    """``--mesh D,C,H,W``: four integers, one of which may be -1 (the remaining devices).

    Whether the sizes fit the devices and the model is for
    :func:`fcn_jax.parallel.mesh.resolve_shape` and ``validate_layout`` to say.
    """
    try:
        sizes = tuple(int(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"--mesh {text!r}: expected four integers D,C,H,W (-1 = the rest)") from None
    if len(sizes) != 4:
        raise argparse.ArgumentTypeError(
            f"--mesh {text!r}: expected four sizes D,C,H,W (data, channel, height, width), got {len(sizes)}")
    if any(s == 0 or s < -1 for s in sizes) or sizes.count(-1) > 1:
        raise argparse.ArgumentTypeError(f"--mesh {text!r}: sizes are >= 1, with at most one -1 (the rest)")
    return sizes  # type: ignore[return-value]


def add_mesh(ap: argparse.ArgumentParser, *, repeatable: bool = False, required: bool = False,
             help: str | None = None) -> None:
    """``--mesh D,C,H,W`` (``repeatable``: each one is a separate run, e.g. ``check``)."""
    ap.add_argument("--mesh", type=parse_mesh, metavar="D,C,H,W", required=required,
                    action="append" if repeatable else "store",
                    help=help or "device mesh sizes (data, channel, height, width); one may be -1 = the rest "
                                 "(default: the experiment's mesh)")


def _join_negative_mesh(argv: Sequence[str]) -> list[str]:
    """``--mesh -1,1,2,2`` -> ``--mesh=-1,1,2,2``: argparse would take ``-1,...`` for an option."""
    out: list[str] = []
    i = 0
    argv = list(argv)
    while i < len(argv):
        if argv[i] == "--mesh" and i + 1 < len(argv) and argv[i + 1].startswith("-") and argv[i + 1][1:2].isdigit():
            out.append(f"--mesh={argv[i + 1]}")
            i += 2
        else:
            out.append(argv[i])
            i += 1
    return out


# --------------------------------------------------------------------------- #
# Initial times
# --------------------------------------------------------------------------- #


_STRIDE = re.compile(r"^\s*(\d+)\s*([hd])\s*$")


def parse_init_times(spec: str):
    """``datetime64[ns] [n]`` from ``"T1,T2,..."`` or ``"START/END/STRIDE"`` (stride ``6h``, ``3d``)."""
    import numpy as np

    from fcn_jax.inference.files import ForecastError

    spec = spec.strip()
    try:
        if "/" in spec:
            parts = spec.split("/")
            if len(parts) != 3:
                raise ValueError("a range is START/END/STRIDE")
            start, end = (np.datetime64(p.strip(), "ns") for p in parts[:2])
            m = _STRIDE.match(parts[2])
            if not m:
                raise ValueError(f"stride {parts[2]!r} must be a number of hours or days, e.g. 12h or 3d")
            stride = np.timedelta64(int(m.group(1)) * (24 if m.group(2) == "d" else 1), "h")
            if stride <= np.timedelta64(0, "h") or end < start:
                raise ValueError("the stride must be positive and END not before START")
            times = np.arange(start, end + np.timedelta64(1, "ns"), stride).astype("datetime64[ns]")
        else:
            times = np.asarray([np.datetime64(t.strip(), "ns") for t in spec.split(",") if t.strip()])
    except ValueError as e:
        raise ForecastError(f"--init {spec!r}: {e}; give ISO times 'T1,T2' or 'START/END/STRIDE'") from e
    if times.size == 0:
        raise ForecastError(f"--init {spec!r}: no initial time")
    return times


# --------------------------------------------------------------------------- #
# Store
# --------------------------------------------------------------------------- #


def add_store(ap: argparse.ArgumentParser, *, help: str) -> None:
    """``--store PATH|world``; ``world`` is the experiment's world (its ``data.world_seed``/``world_days``)."""
    ap.add_argument("--store", default=None, metavar="PATH|world", help=help)


def resolve_store(store: str | os.PathLike | None, cfg=None, *, check: bool = True,
                  progress: bool = True) -> Path | None:
    """A store path from ``--store`` (or ``data.store``): ``world`` is generated once and cached.

    The world is the one ``cfg`` (an experiment) trains on: ``data.world_seed``
    and ``data.world_days``; without an experiment, seed 0 and the default
    length -- the same world as the ``world`` experiment's.
    """
    if store is None:
        return None
    from fcn_jax.data.catalog import resolve_store as resolve

    seed, days = 0, None
    if cfg is not None:
        seed, days = cfg.data.world_seed, (cfg.data.world_days or None)
    return resolve(store, world_seed=seed, world_days=days, check=check, progress=progress)


# --------------------------------------------------------------------------- #
# Runtime and distributed start-up
# --------------------------------------------------------------------------- #


def add_runtime(ap: argparse.ArgumentParser, *, multihost: bool = True) -> None:
    """``--cpu-devices`` and (``multihost``) the ``jax.distributed`` flags; SLURM is detected without them."""
    g = ap.add_argument_group("runtime" + (" and multi-host (jax.distributed; SLURM is detected without flags)"
                                           if multihost else ""))
    g.add_argument("--cpu-devices", type=int, default=0,
                   help="emulate N CPU devices per process (testing a mesh without accelerators)")
    if multihost:
        g.add_argument("--coordinator", default=None, help="HOST:PORT of process 0")
        g.add_argument("--num-processes", type=int, default=None, help="processes in the run")
        g.add_argument("--process-id", type=int, default=None, help="this process's index, 0 .. num-processes - 1")
        g.add_argument("--peer-timeout", type=float, default=None, metavar="SECONDS",
                       help="a process silent this long counts as lost: the others exit with status 75, saying "
                            "which checkpoint is intact (default FCN_PEER_TIMEOUT, else 60; 0 = never)")


def start(args: argparse.Namespace | None = None) -> bool:
    """Start-up, in the order it must happen; returns whether this is a multi-process run.

    1. ``--cpu-devices N``: the CPU platform (``JAX_PLATFORMS=cpu`` unless the
       user chose one) with N devices; when the backend already runs with N
       devices (a command called from a test) that is accepted;
    2. :func:`fcn_jax.cpu_runtime.tune_cpu_process`, before the backend starts;
    3. ``jax.distributed`` when the flags, ``FCN_*`` variables or SLURM say
       this is a multi-process run (:func:`fcn_jax.distributed.initialize`).
    """
    from fcn_jax import distributed
    from fcn_jax.cpu_runtime import tune_cpu_process

    if (distributed.is_multiprocess_request(getattr(args, "coordinator", None))
            and not os.environ.get("FCN_SUPERVISED") and getattr(sys, "orig_argv", None)
            and sys.platform.startswith("linux") and getattr(args, "supervise", True)):
        # the command again, as a child this process watches: a lost coordinator becomes one line, exit 75
        raise SystemExit(distributed.supervise(list(sys.orig_argv)))
    cpu_devices = getattr(args, "cpu_devices", 0) or 0
    if cpu_devices:
        os.environ.setdefault("JAX_PLATFORMS", "cpu")
        if "jax" in sys.modules:
            sys.modules["jax"].config.update("jax_platforms", os.environ["JAX_PLATFORMS"])
    tune_cpu_process()
    import jax

    if cpu_devices:
        try:
            jax.config.update("jax_num_cpu_devices", cpu_devices)
        except RuntimeError as e:  # the backend already started (a command called from a test)
            if jax.device_count() != cpu_devices:
                raise errors.InputError(f"--cpu-devices {cpu_devices}: the backend already runs with "
                                        f"{jax.device_count()} devices ({e})") from None
    return distributed.initialize(getattr(args, "coordinator", None), getattr(args, "num_processes", None),
                                  getattr(args, "process_id", None), getattr(args, "peer_timeout", None))


def is_primary() -> bool:
    """Whether this is process 0 (the one that prints and writes)."""
    from fcn_jax.distributed import is_primary as primary

    return primary()


# --------------------------------------------------------------------------- #
# Running a command
# --------------------------------------------------------------------------- #


def parse(ap: argparse.ArgumentParser, argv: Sequence[str] | None) -> argparse.Namespace:
    """``ap.parse_args`` that also takes ``--mesh -1,...``."""
    argv = list(sys.argv[1:] if argv is None else argv)
    return ap.parse_args(_join_negative_mesh(argv))


def run(body: Callable[[], int | None], *, on_error: Callable[[BaseException], None] | None = None) -> int:
    """Run a command's body; an escaping fcn_jax error becomes ``error: MESSAGE`` on stderr and its exit code.

    ``on_error`` (e.g. to print a JSON error record too) sees the exception
    first. Exceptions outside :mod:`fcn_jax.errors`' map propagate with their
    traceback: they are bugs, not input to correct.
    """
    try:
        code = body()
    except BaseException as e:  # noqa: BLE001 - mapped below; anything unmapped is re-raised
        if isinstance(e, SystemExit):
            raise
        code = errors.exit_code(e)
        if code is None:
            from fcn_jax.distributed import wait_for_peer_verdict

            wait_for_peer_verdict(e)  # a collective failed because a peer died: the watch says so and exits
            raise
        if on_error is not None:
            on_error(e)
        print("interrupted" if isinstance(e, KeyboardInterrupt) else f"error: {e}", file=sys.stderr, flush=True)
        return code
    return errors.EXIT_OK if code is None else int(code)
