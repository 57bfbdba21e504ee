"""Run checkpoints (Orbax): train state, data-iterator position and run metadata.

One Orbax ``CheckpointManager`` under ``WORKDIR/checkpoints`` with three items
per step: ``state`` (parameters, optimiser state and step as global arrays),
``data`` (the input pipeline's iterator state, JSON) and ``meta`` (epoch, best
validation loss, random state, the resolved config name; JSON). Saves are
asynchronous; Orbax writes each step under a temporary name and commits it
atomically, so an interrupted save is never listed as a checkpoint.

Retention: the latest ``keep_latest`` steps plus the ``keep_best`` steps with
the lowest validation loss (Orbax's ``max_to_keep`` + ``best_fn`` alone would
keep only the best N, see jax-notes §8).

Restoring always passes a target whose leaves carry the *current* mesh's
shardings, so a run trained on one layout resumes or forecasts on another.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import jax
import orbax.checkpoint as ocp
from orbax.checkpoint import checkpoint_managers as ocm


def _val_loss(metrics) -> float:
    return float(metrics["val_loss"])


class RunCheckpoints:
    """Save/restore of a training run's state."""

    def __init__(self, directory: str | Path, keep_latest: int = 2, keep_best: int = 1, async_save: bool = True):
        self.directory = Path(directory).resolve()
        policies = [ocm.LatestN(n=keep_latest)]
        if keep_best > 0:
            policies.append(ocm.BestN(get_metric_fn=_val_loss, reverse=True, n=keep_best,  # reverse: lower is better
                                      keep_checkpoints_without_metrics=False))
        options = ocp.CheckpointManagerOptions(
            preservation_policy=ocm.AnyPreservationPolicy(policies),
            enable_async_checkpointing=async_save,
            create=True,
            cleanup_tmp_directories=True,  # remove uncommitted (half-written) steps on start-up
        )
        self.manager = ocp.CheckpointManager(self.directory, options=options)

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def all_steps(self) -> list[int]:
        return list(self.manager.all_steps())

    def save(self, step: int, state: Any, data_state: dict | None, meta: dict, val_loss: float | None = None,
             force: bool = False) -> bool:
        """Start an asynchronous save of ``step``; returns whether one was started."""
        args = ocp.args.Composite(
            state=ocp.args.StandardSave(state),
            data=ocp.args.JsonSave(data_state or {}),
            meta=ocp.args.JsonSave(meta),
        )
        metrics = {"val_loss": float(val_loss)} if val_loss is not None else None
        return self.manager.save(step, args=args, metrics=metrics, force=force)

    def restore(self, step: int, abstract_state: Any) -> tuple[Any, dict, dict]:
        """(state, data_state, meta) of ``step``; ``abstract_state`` leaves carry target shardings.

        A run saved with its AFNO blocks stacked (pipelined, ``mesh.stage > 1``)
        restores into per-block parameters and vice versa
        (:func:`fcn_jax.parallel.pipeline.restore_plan`).
        """
        from fcn_jax.parallel.pipeline import restore_plan

        saved = self._state_metadata(step)
        saved_leaves = jax.tree_util.tree_flatten_with_path(saved)[0]
        plan = restore_plan([_norm(p) for p, _ in saved_leaves], abstract_state)
        if plan is not None:
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
            arrays = {_norm(p): a for p, a in jax.tree_util.tree_flatten_with_path(restored["state"])[0]}
            return build(arrays), dict(restored["data"] or {}), dict(restored["meta"] or {})
        restored = self.manager.restore(
            step,
            args=ocp.args.Composite(
                state=ocp.args.StandardRestore(abstract_state),
                data=ocp.args.JsonRestore(),
                meta=ocp.args.JsonRestore(),
            ),
        )
        return restored["state"], dict(restored["data"] or {}), dict(restored["meta"] or {})

    def _state_metadata(self, step: int):
        """Tree metadata (paths, shapes) of the saved ``state`` item of ``step``."""
        saved = self.manager.item_metadata(step)["state"]
        if saved is None:  # a manager that has not saved yet knows no handler for the item
            saved = ocp.StandardCheckpointHandler().metadata(self.directory / str(step) / "state")
        return saved

    def best_step(self) -> int | None:
        """The step with the lowest recorded validation loss among those kept."""
        best, best_loss = None, float("inf")
        for info in self.manager._checkpoints:  # noqa: SLF001 - Orbax keeps metrics here
            if info.metrics and "val_loss" in info.metrics and info.metrics["val_loss"] < best_loss:
                best, best_loss = info.step, info.metrics["val_loss"]
        return best

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()


def _norm(path) -> tuple[str, ...]:
    from fcn_jax.parallel.pipeline import _norm_path

    return _norm_path(path)


def abstract_like(tree: Any) -> Any:
    """ShapeDtypeStructs (with shardings) of a tree of arrays: an Orbax restore target."""
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=getattr(x, "sharding", None)), tree)
