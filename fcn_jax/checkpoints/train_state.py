"""Run checkpoints (Orbax): train state, data-iterator position and run metadata.

One Orbax ``CheckpointManager`` under ``WORKDIR/checkpoints`` with three items
per step: ``state`` (parameters, optimiser state and step as global arrays),
``data`` (the input pipeline's iterator state, JSON) and ``meta`` (epoch, best
validation loss, random state, the resolved config name; JSON). Saves are
asynchronous; Orbax writes each step under a temporary name and commits it
atomically, so an interrupted save is never listed as a checkpoint.

Integrity: every step carries ``fcn_integrity.json`` (:mod:`fcn_jax.checkpoints.integrity`),
the CRC32C and size of each of its files, written by Orbax's
post-finalisation callback -- after all files of the step are complete, before
the step directory is renamed to its final name -- so every committed step has
one. A step is verified before it is restored; a damaged step is moved aside to
``WORKDIR/checkpoints_damaged/STEP`` (never deleted) with a note of what is
wrong, and :meth:`RunCheckpoints.restore_latest` falls back to the newest
intact step, saying so.

Full disks: before a save the free space is compared with the size of the
state (cheap: ``statvfs``); a save that still runs out of space (another
writer filled the disk) raises :class:`CheckpointSpaceError` with the bytes
needed and free. Either way the earlier steps are untouched; a partial step
keeps Orbax's temporary name (never listed, removed at the next start), and
the next start resumes from the newest complete one.

Retention: the latest ``keep_latest`` steps plus the ``keep_best`` steps with
the lowest validation loss (Orbax's ``max_to_keep`` + ``best_fn`` alone would
keep only the best N, see jax-notes §8).

Restoring always passes a target whose leaves carry the *current* mesh's
shardings, so a run trained on one layout resumes or forecasts on another.
"""

from __future__ import annotations

import errno
import json
import shutil
from pathlib import Path
from typing import Any, Callable

import jax
import numpy as np
import orbax.checkpoint as ocp
from orbax.checkpoint import checkpoint_managers as ocm

from fcn_jax.checkpoints import integrity
from fcn_jax.distributed import committed_step_note
from fcn_jax.errors import EXIT_DAMAGED, EXIT_NO_SPACE, FcnError

#: Orbax's temporary step-directory suffix (a step is saved as ``STEP`` + this, then renamed).
TMP_SUFFIX = ".orbax-checkpoint-tmp"
#: Top-level files Orbax changes when it commits a step (after our manifest is written).
ORBAX_COMMIT_FILES = ("_CHECKPOINT_METADATA", "commit_success.txt")
#: Bytes a step needs beyond its arrays (Orbax/OCDBT metadata, JSON items), for the free-space check.
_OVERHEAD = 1 << 20


class CheckpointDamagedError(FcnError, RuntimeError):
    """A checkpoint failed verification and no intact one could take its place."""

    exit_code = EXIT_DAMAGED


class CheckpointSpaceError(FcnError, RuntimeError):
    """A checkpoint could not be saved for lack of disk space; earlier checkpoints are untouched.

    Attributes: ``step``, ``needed`` and ``free`` (bytes), ``directory``.
    """

    exit_code = EXIT_NO_SPACE

    def __init__(self, message: str, *, step: int, needed: int, free: int, directory: Path):
        super().__init__(message)
        self.step, self.needed, self.free, self.directory = step, needed, free, directory


def _val_loss(metrics) -> float:
    return float(metrics["val_loss"])


def _barrier(name: str) -> None:
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(name)


def _from_primary(value: int) -> int:
    """Process 0's ``value`` on every process (one small collective; only when multi-process)."""
    if jax.process_count() == 1:
        return int(value)
    from jax.experimental import multihost_utils

    # int32 pieces: without jax_enable_x64 an int64 would be truncated (free bytes exceed 2**31)
    v = abs(int(value))
    parts = np.asarray([1 if value >= 0 else -1, v >> 31, v & 0x7FFFFFFF], np.int32)
    sign, hi, lo = (int(x) for x in np.asarray(multihost_utils.broadcast_one_to_all(parts)))
    return sign * ((hi << 31) | lo)


def verify_step_dir(path: str | Path) -> list[str]:
    """Problems of one checkpoint step directory (empty: intact)."""
    path = Path(path)
    problems = integrity.verify(path)
    meta = path / "_CHECKPOINT_METADATA"  # left out of the manifest (Orbax rewrites it on commit): must parse
    if not problems and meta.is_file():
        try:
            json.loads(meta.read_text())
        except (ValueError, UnicodeDecodeError) as e:
            problems.append(f"_CHECKPOINT_METADATA: unreadable ({e})")
    return problems


def _human(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    return f"{n:.1f} TiB"  # pragma: no cover


def _is_enospc(e: BaseException) -> bool:
    """Whether ``e`` (or anything in its cause chain) is a 'no space left on device' failure."""
    seen = set()
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        if isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        text = str(e)
        if "No space left on device" in text or "ENOSPC" in text or "Disk quota exceeded" in text:
            return True
        e = e.__cause__ or e.__context__
    return False


class RunCheckpoints:
    """Save/restore of a training run's state, verified (see the module docstring).

    Args:
      directory: ``WORKDIR/checkpoints``; damaged steps go to ``WORKDIR/checkpoints_damaged``.
      keep_latest, keep_best: retention.
      async_save: False makes :meth:`save` return only when the step is committed.
      check_free_space: compare free space with the state's size before each save.
      log: where messages about damaged steps go (process 0 only).
    """

    def __init__(self, directory: str | Path, keep_latest: int = 2, keep_best: int = 1, async_save: bool = True,
                 check_free_space: bool = True, log: Callable[[str], None] = print):
        self.directory = Path(directory).resolve()
        self.damaged_dir = self.directory.parent / (self.directory.name + "_damaged")
        self.async_save = async_save
        self.check_free_space = check_free_space
        self.primary = jax.process_index() == 0
        self._log = log
        self._pending: int | None = None  # step of the save in flight
        self._pending_bytes = 0
        policies = [ocm.LatestN(n=keep_latest)]
        if keep_best > 0:
            policies.append(ocm.BestN(get_metric_fn=_val_loss, reverse=True, n=keep_best,  # reverse: lower is better
                                      keep_checkpoints_without_metrics=False))
        options = ocp.CheckpointManagerOptions(
            preservation_policy=ocm.AnyPreservationPolicy(policies),
            # always the async checkpointer: its post-finalisation callback writes the manifest
            # inside the step before the commit rename (a synchronous save waits right after)
            enable_async_checkpointing=True,
            async_options=ocp.AsyncOptions(post_finalization_callback=self._seal),
            create=True,
            cleanup_tmp_directories=True,  # remove uncommitted (half-written) steps on start-up
        )
        self.manager = ocp.CheckpointManager(self.directory, options=options)

    # ------------------------------------------------------------ queries
    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def all_steps(self) -> list[int]:
        return sorted(self.manager.all_steps())

    def step_dir(self, step: int) -> Path:
        return self.directory / str(step)

    def verify(self, step: int) -> list[str]:
        """Problems of ``step`` (empty: intact). Reads the whole step once."""
        return verify_step_dir(self.step_dir(step))

    def last_intact_step(self) -> int | None:
        """The newest step that verifies (nothing is moved); None if there is none."""
        for step in reversed(self.all_steps()):
            if not self.verify(step):
                return step
        return None

    def resume_note(self) -> str:
        """Which step a rerun resumes from, judged from the directory alone (cheap: no step is read).

        The newest step that is committed (its final name) and sealed (its
        manifest written): what :meth:`restore_latest` will verify and take.
        """
        return committed_step_note(self.directory, integrity.MANIFEST)

    def best_step(self) -> int | None:
        """The step with the lowest recorded validation loss among those kept."""
        ranked = self._ranked_by_val_loss()
        return ranked[0] if ranked else None

    def _ranked_by_val_loss(self) -> list[int]:
        infos = [(info.metrics["val_loss"], info.step) for info in self.manager._checkpoints  # noqa: SLF001
                 if info.metrics and "val_loss" in info.metrics]  # Orbax keeps the save() metrics here
        return [step for _, step in sorted(infos)]

    # ------------------------------------------------------------- saving
    def save(self, step: int, state: Any, data_state: dict | None, meta: dict, val_loss: float | None = None,
             force: bool = False) -> bool:
        """Start an asynchronous save of ``step``; returns whether one was started.

        Raises :class:`CheckpointSpaceError` if the disk cannot hold it (checked
        before writing) or if this or the previous save ran out of space.
        """
        self.wait()  # the previous save is committed (and sealed) before this one starts
        data_state = data_state or {}
        needed = _OVERHEAD + sum(int(getattr(x, "nbytes", 0)) for x in jax.tree.leaves(state)) \
            + len(json.dumps(data_state)) + len(json.dumps(meta))
        if self.check_free_space:
            free = _from_primary(shutil.disk_usage(self.directory).free if self.primary else 0)
            if free < needed:
                raise CheckpointSpaceError(self._space_message(step, needed, free, before=True),
                                           step=step, needed=needed, free=free, directory=self.directory)
        args = ocp.args.Composite(
            state=ocp.args.StandardSave(state),
            data=ocp.args.JsonSave(data_state),
            meta=ocp.args.JsonSave(meta),
        )
        metrics = {"val_loss": float(val_loss)} if val_loss is not None else None
        self._pending, self._pending_bytes = step, needed
        try:
            started = self.manager.save(step, args=args, metrics=metrics, force=force)
        except Exception as e:
            self._raise_if_out_of_space(e)
            raise
        if not self.async_save:
            self.wait()
        return started

    def wait(self) -> None:
        """Block until the save in flight is committed; translates a full disk into CheckpointSpaceError."""
        try:
            self.manager.wait_until_finished()
        except Exception as e:
            self._raise_if_out_of_space(e)
            raise
        self._pending = None

    def _seal(self) -> None:
        """Orbax post-finalisation callback (process 0): write the manifest into the uncommitted step."""
        step = self._pending
        tmp = self.directory / f"{step}{TMP_SUFFIX}"
        integrity.write_manifest(tmp if tmp.is_dir() else self.step_dir(step), unchecked=ORBAX_COMMIT_FILES)

    def _raise_if_out_of_space(self, e: BaseException) -> None:
        if not _is_enospc(e):
            return
        step, needed = self._pending, self._pending_bytes
        self._pending = None
        # The partial step keeps its temporary name: never listed, never restored, and removed by Orbax at
        # the next start (removing it here would race with the step's other writes still in flight).
        try:
            self.manager.reload()
        except Exception:  # pragma: no cover - the listing is refreshed at the next start anyway
            pass
        free = shutil.disk_usage(self.directory).free
        raise CheckpointSpaceError(self._space_message(step, needed, free, before=False), step=step,
                                   needed=needed, free=free, directory=self.directory) from e

    def _space_message(self, step, needed, free, before: bool) -> str:
        kept = self.all_steps()
        what = ("not started: the disk is too full" if before
                else f"failed: no space left on device (the partial {step}{TMP_SUFFIX} is never used and is "
                     "removed at the next start)")
        resume = (f"it resumes from step {kept[-1]}" if kept else "it starts from step 0 (no checkpoint yet)")
        return (f"saving checkpoint step {step} to {self.directory} {what}. It needs about {_human(needed)}, "
                f"{_human(free)} is free there. Earlier checkpoints are intact (steps {kept}). Free some space "
                f"(or move the run directory to a larger disk) and run the same command again: {resume}.")

    # ---------------------------------------------------------- restoring
    def restore(self, step: int, abstract_state: Any, verify: bool = True) -> tuple[Any, dict, dict]:
        """(state, data_state, meta) of ``step`` after verifying it; ``abstract_state`` leaves carry target shardings.

        A run saved with its AFNO blocks stacked (pipelined, ``mesh.stage > 1``)
        restores into per-block parameters and vice versa
        (:func:`fcn_jax.parallel.pipeline.restore_plan`).

        Raises :class:`CheckpointDamagedError` if the step fails verification
        (done by process 0, which tells the others). ``verify=False`` only for
        a step that was just verified.
        """
        if verify:
            problems = self.verify(step) if self.primary else []
            if _from_primary(int(bool(problems))):
                raise CheckpointDamagedError(str(integrity.IntegrityError(
                    self.step_dir(step), problems or ["reported by process 0"], f"checkpoint step {step}")))
        from fcn_jax.parallel.pipeline import restore_plan

        saved = self._state_metadata(step)
        saved_leaves = jax.tree_util.tree_flatten_with_path(saved)[0]
        plan = restore_plan([_norm(p) for p, _ in saved_leaves], abstract_state)
        target = abstract_state
        if plan is not None:  # stacked <-> per-block: read the saved layout, then rebuild the target's
            read, build = plan
            target = jax.tree_util.tree_map_with_path(
                lambda p, m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=read[_norm(p)]), saved)
        restored = self.manager.restore(
            step,
            args=ocp.args.Composite(
                state=ocp.args.StandardRestore(target),
                data=ocp.args.JsonRestore(),
                meta=ocp.args.JsonRestore(),
            ),
        )
        state = restored["state"]
        if plan is not None:
            state = build({_norm(p): a for p, a in jax.tree_util.tree_flatten_with_path(state)[0]})
        return state, dict(restored["data"] or {}), dict(restored["meta"] or {})

    def _state_metadata(self, step: int):
        """Tree metadata (paths, shapes) of the saved ``state`` item of ``step``."""
        saved = self.manager.item_metadata(step)["state"]
        if saved is None:  # a manager that has not saved yet knows no handler for the item
            saved = ocp.StandardCheckpointHandler().metadata(self.directory / str(step) / "state")
        return saved

    def restore_latest(self, abstract_state: Any) -> tuple[int, Any, dict, dict] | None:
        """(step, state, data_state, meta) of the newest intact step, or None if there are no checkpoints.

        Damaged steps newer than it are moved to ``checkpoints_damaged/`` and
        reported. If every step is damaged nothing is moved and
        :class:`CheckpointDamagedError` says what to do.
        """
        steps = self.all_steps()
        if not steps:
            return None
        chosen, damaged = -1, []
        if self.primary:
            for step in reversed(steps):
                problems = self.verify(step)
                if not problems:
                    chosen = step
                    break
                damaged.append((step, problems))
            if chosen >= 0:
                for step, problems in damaged:
                    dest = self.quarantine(step, problems)
                    self._log(f"checkpoint step {step} ({self.step_dir(step)}) is damaged: {'; '.join(problems[:3])}"
                              f". Moved it to {dest}; falling back to step {chosen}.")
        chosen = _from_primary(chosen)
        if chosen < 0:
            report = "; ".join(f"step {s}: {'; '.join(p[:2])}" for s, p in damaged) or "see process 0"
            raise CheckpointDamagedError(
                f"no intact checkpoint in {self.directory}: every step fails verification ({report}). Nothing "
                "was moved or deleted. Restore the directory from a copy, or move it away to start the run "
                "afresh; `python -m fcn_jax.checkpoint verify RUN_DIR` lists what is wrong.")
        _barrier(f"run_checkpoints:restore_latest:{self.directory}")
        if damaged or jax.process_count() > 1:
            self.manager.reload()
        state, data_state, meta = self.restore(chosen, abstract_state, verify=False)
        return chosen, state, data_state, meta

    def quarantine(self, step: int, problems: list[str]) -> Path:
        """Move a damaged step to ``checkpoints_damaged/STEP[-n]`` with a note; never deletes it (process 0)."""
        self.damaged_dir.mkdir(parents=True, exist_ok=True)
        dest, n = self.damaged_dir / str(step), 1
        while dest.exists():
            n += 1
            dest = self.damaged_dir / f"{step}-{n}"
        self.step_dir(step).rename(dest)
        (dest.parent / f"{dest.name}.DAMAGED.txt").write_text(
            f"checkpoint step {step}, moved here from {self.step_dir(step)} because it failed verification:\n"
            + "\n".join(problems) + "\n")
        self.manager.reload()
        return dest

    def best_intact(self, abstract_state: Any) -> tuple[int, Any] | None:
        """(step, state) of the best-validation step that verifies; damaged candidates are moved aside."""
        for step in self._ranked_by_val_loss():
            problems = self.verify(step) if self.primary else []
            if _from_primary(int(bool(problems))):
                if self.primary:
                    dest = self.quarantine(step, problems)
                    self._log(f"best checkpoint step {step} is damaged: {'; '.join(problems[:3])}. "
                              f"Moved it to {dest}; not exporting it.")
                _barrier(f"run_checkpoints:best:{self.directory}:{step}")
                self.manager.reload()
                continue
            return step, self.restore(step, abstract_state, verify=False)[0]
        return None

    def close(self) -> None:
        try:
            self.wait()
        finally:
            self.manager.close()


def _norm(path) -> tuple[str, ...]:
    from fcn_jax.parallel.pipeline import _norm_path

    return _norm_path(path)


def abstract_like(tree: Any) -> Any:
    """ShapeDtypeStructs (with shardings) of a tree of arrays: an Orbax restore target."""
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=getattr(x, "sharding", None)), tree)
