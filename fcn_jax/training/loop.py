"""The training loop: pre-training, multi-step fine-tuning and precipitation.

Everything a run produces lives in its work directory::

    WORKDIR/config.yaml        the resolved experiment
    WORKDIR/metrics.jsonl      one JSON object per logged step / validation
    WORKDIR/tb/                TensorBoard event files
    WORKDIR/checkpoints/       Orbax run checkpoints (state, data position, meta)
    WORKDIR/model_best/        weights of the best validation step (fcn_jax.checkpoints.package format)
    WORKDIR/model_final/       weights at the end of the run

A restarted run with the same work directory resumes exactly from the latest
intact checkpoint: parameters, optimiser state, step, random state and the data
iterator's position. Nothing in the loop forces a host sync except logging,
validation and checkpointing.

Faults (README "Reliability"): one live run per directory (``WORKDIR/.lock``,
:mod:`fcn_jax.training.runlock`); damaged checkpoints are moved aside and the
run resumes from the newest intact one; a full disk stops the run with
:class:`~fcn_jax.checkpoints.train_state.CheckpointSpaceError`; an undecodable
store chunk stops it with a ``DataError`` naming variable, time and chunk; a
NaN/Inf loss stops it with the step and the time stamps of that step's samples.
In every case the checkpoints written before the fault are left as they were.
"""

from __future__ import annotations

import json
import math
import signal
import time
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from tqdm import tqdm

from fcn_jax import distributed
from fcn_jax.checkpoints import integrity
from fcn_jax.checkpoints import package as model_ckpt
from fcn_jax.checkpoints.package import resolve_model_dir
from fcn_jax.checkpoints.train_state import RunCheckpoints, abstract_like
from fcn_jax.config import ExperimentConfig, dump_experiment
from fcn_jax.data.errors import DataError
from fcn_jax.errors import EXIT_NON_FINITE, FcnError
from fcn_jax.model.afnonet import build_model, shard_model
from fcn_jax.parallel.mesh import bubble_fraction, build_mesh, model_sizes, use_microbatches, use_spectral_layout
from fcn_jax.parallel.pipeline import stack_model, unstack_model
from fcn_jax.training import data_feed
from fcn_jax.training.optim import make_optimizer
from fcn_jax.training.runlock import RunLock
from fcn_jax.training.step import TrainState, init_train_state, make_train_step
from fcn_jax.training.validation import Validator


class NonFiniteLossError(FcnError, RuntimeError):
    """The loss became NaN/Inf; the last good checkpoint is left intact."""

    exit_code = EXIT_NON_FINITE


class _Preempted:
    """SIGTERM flag: finish the current step, save, exit cleanly."""

    def __init__(self):
        self.requested = False
        self._previous = None

    def __enter__(self):
        def handler(signum, frame):
            self.requested = True

        try:
            self._previous = signal.signal(signal.SIGTERM, handler)
        except ValueError:  # not the main thread
            self._previous = None
        return self

    def __exit__(self, *exc):
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)
        return False


class _Logger:
    """metrics.jsonl + TensorBoard, on the primary process only."""

    def __init__(self, workdir: Path, enabled: bool):
        self.enabled = enabled
        self.jsonl = None
        self.tb = None
        if enabled:
            self.jsonl = open(workdir / "metrics.jsonl", "a", buffering=1)
            try:
                from tensorboardX import SummaryWriter

                self.tb = SummaryWriter(str(workdir / "tb"))
            except Exception:  # pragma: no cover - tensorboardX is a dependency
                self.tb = None

    def write(self, record: dict) -> None:
        if not self.enabled:
            return
        self.jsonl.write(json.dumps(record) + "\n")
        if self.tb is not None:
            step = record["step"]
            for k, v in _flatten_scalars(record):
                if k != "step":
                    self.tb.add_scalar(k, v, step)

    def close(self):
        if self.jsonl:
            self.jsonl.close()
        if self.tb is not None:
            self.tb.close()


def _flatten_scalars(d: dict, prefix: str = ""):
    for k, v in d.items():
        if isinstance(v, dict):
            yield from _flatten_scalars(v, f"{prefix}{k}/")
        elif isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v):
            yield f"{prefix}{k}", v


def train(cfg: ExperimentConfig, workdir: str | Path, *, progress: bool = True, max_steps: int | None = None) -> dict:
    """Run (or resume) the experiment in ``workdir``; returns a summary dict.

    ``max_steps`` stops early after that many optimiser steps in this call
    (tests and the demo); the schedule still follows ``train.steps``.
    """
    workdir = Path(workdir).resolve()
    primary = jax.process_index() == 0
    # one live run per directory: refused here, before anything in it is touched
    with RunLock(workdir, enabled=primary):
        return _train(cfg, workdir, primary, progress=progress, max_steps=max_steps)


def _train(cfg: ExperimentConfig, workdir: Path, primary: bool, *, progress: bool, max_steps: int | None) -> dict:
    if primary:
        _write_config(cfg, workdir)
    tcfg, mcfg = cfg.train, cfg.model

    mesh = build_mesh(cfg.mesh, mcfg, tcfg.batch_size, microbatches=tcfg.microbatches)
    with jax.set_mesh(mesh), use_spectral_layout(cfg.mesh.spectral_layout), use_microbatches(tcfg.microbatches):
        feed = data_feed.open_feed(cfg, mesh)
        model = _initial_model(cfg)
        if cfg.mesh.stage > 1:  # pipelined: blocks stacked, each stage stores its own (checkpoints convert)
            stack_model(model)
        model = shard_model(model, mesh)
        tx, schedule = make_optimizer(tcfg)
        graphdef, state = init_train_state(model, tx)
        frozen = _frozen_backbone(cfg, mesh) if tcfg.mode == "precip" else None

        ckpts = RunCheckpoints(workdir / "checkpoints", keep_latest=tcfg.keep_latest, keep_best=tcfg.keep_best)
        # what survivors of a lost peer say (multi-process)
        distributed.set_resume_note(ckpts.resume_note, ckpts.directory, integrity.MANIFEST)
        meta: dict[str, Any] = {"best_val_loss": None, "best_step": None}
        start = 0
        try:
            restored = ckpts.restore_latest(abstract_like(state))  # verified; damaged steps moved aside
        except BaseException:
            ckpts.close()
            feed.close()
            raise
        if restored is not None:
            latest, state, data_state, meta = restored
            feed.set_state(data_state)
            start = int(latest)
            if primary:
                print(f"resumed {workdir} at step {start}")

        step_fn = make_train_step(graphdef, tx, loss_weights=tcfg.loss_weights or None, mode=tcfg.mode,
                                  precip_eps=tcfg.precip_eps, frozen=frozen, norm=feed.norm)
        validator = Validator(cfg, mesh, graphdef, feed, frozen=frozen)
        logger = _Logger(workdir, primary)

        end = tcfg.steps if max_steps is None else min(tcfg.steps, start + max_steps)
        finite = jnp.array(True)
        sizes = model_sizes(mesh, mcfg, tcfg.batch_size)
        summary: dict[str, Any] = {"start_step": start, "spectral_layout": sizes.spectral_layout}
        if sizes.stage > 1:
            summary.update(stage=sizes.stage, microbatches=sizes.microbatches,
                           bubble_fraction=bubble_fraction(sizes.stage, sizes.microbatches))
            if primary:
                print(f"pipeline: {sizes.stage} stages x {sizes.microbatches} microbatches per data shard, "
                      f"GPipe bubble {summary['bubble_fraction']:.3f}")
        bar = tqdm(total=end, initial=start, unit="step", dynamic_ncols=True, disable=not (progress and primary))
        t_last, n_last, wait_s = time.perf_counter(), start, 0.0
        last_saved = start
        losses: list = []  # (step, loss, grad norm) on device since the last finiteness check
        ok = False
        try:
            with _Preempted() as preempt:
                step = start
                while step < end:
                    t0 = time.perf_counter()
                    try:
                        batch = feed.next_train()
                    except DataError as e:
                        raise DataError(f"{e} (reading the batch of step {step + 1}; no checkpoint is written "
                                        f"after this, the ones in {workdir / 'checkpoints'} are untouched)") from e
                    wait_s += time.perf_counter() - t0
                    state, metrics = step_fn(state, batch)
                    # the gradients too: a finite loss with NaN gradients would save NaN parameters
                    finite = finite & jnp.isfinite(metrics["loss"]) & jnp.isfinite(metrics["grad_norm"])
                    step += 1
                    losses.append((step, metrics["loss"], metrics["grad_norm"]))
                    record = None
                    if step % tcfg.log_every == 0 or step == end:
                        _check_finite(finite, losses, ckpts, workdir, feed, cfg)
                        now = time.perf_counter()
                        record = {
                            "step": step,
                            "loss": float(metrics["loss"]),
                            "loss_per_step": [float(v) for v in np.asarray(metrics["loss_per_step"])],
                            "grad_norm": float(metrics["grad_norm"]),
                            "lr": float(schedule(step - 1)),
                            "samples_per_s": (step - n_last) * tcfg.batch_size / max(now - t_last, 1e-9),
                            "data_wait_s": wait_s,
                        }
                        logger.write(record)
                        bar.update(step - bar.n)
                        bar.set_postfix(loss=f"{record['loss']:.4f}", samples_s=f"{record['samples_per_s']:.1f}")
                        t_last, n_last, wait_s = now, step, 0.0
                    val_loss = None
                    if step % tcfg.validate_every == 0 or step == end:
                        vrec = validator.run(state.params, step)
                        val_loss = vrec["val_loss"]
                        logger.write(vrec)
                        if meta.get("best_val_loss") is None or val_loss < meta["best_val_loss"]:
                            meta["best_val_loss"], meta["best_step"] = val_loss, step
                    if step % tcfg.checkpoint_every == 0 or step == end or preempt.requested:
                        _check_finite(finite, losses, ckpts, workdir, feed, cfg)
                        ckpts.save(step, state, feed.get_state(), _meta(meta, cfg, step), val_loss, force=True)
                        last_saved = step
                    if preempt.requested:
                        summary["preempted"] = True
                        break
            ckpts.wait()
            ok = True
        finally:
            bar.close()
            logger.close()
            if not ok:  # a fault: let a save in flight (of good state) commit, then let go of everything
                try:
                    ckpts.close()
                except Exception:  # noqa: BLE001 - the original error is the one to report
                    pass
                feed.close()
        summary.update(final_step=int(step), last_saved=last_saved, best_step=meta.get("best_step"),
                       best_val_loss=meta.get("best_val_loss"))
        if step >= tcfg.steps or (max_steps is not None and step == end and not summary.get("preempted")):
            _export_models(ckpts, state, graphdef, workdir, mcfg, primary, feed)
        ckpts.close()
        feed.close()
    return summary


def _meta(meta: dict, cfg: ExperimentConfig, step: int) -> dict:
    return {**meta, "step": step, "experiment": cfg.name, "seed": cfg.train.seed}


def _check_finite(finite, losses: list, ckpts: RunCheckpoints, workdir: Path, feed, cfg: ExperimentConfig) -> None:
    """Raise NonFiniteLossError naming the first step with a non-finite loss or gradient and its samples'
    time stamps; else forget ``losses``."""
    if bool(finite):
        losses.clear()
        return
    values = np.asarray(jnp.stack([jnp.stack([l, g]) for _, l, g in losses]))  # [n, (loss, grad norm)]
    bad = int(np.argmax(~np.isfinite(values).all(axis=1)))
    step = losses[bad][0]
    ckpts.wait()
    last = ckpts.last_intact_step()
    good = (f"The last good checkpoint is step {last} (verified) in {workdir / 'checkpoints'}"
            if last is not None else f"There is no intact checkpoint in {workdir / 'checkpoints'}")
    raise NonFiniteLossError(
        f"the training loss became NaN or Inf by step {step}: the first non-finite step (loss {values[bad, 0]}, "
        f"gradient norm {values[bad, 1]}); stopping without saving. "
        f"The samples of step {step} are the windows starting at {_batch_times(feed, cfg, step)}. {good}. "
        "Lower train.lr, enable train.grad_clip, or check the data for bad values at those times."
    )


def _batch_times(feed, cfg: ExperimentConfig, step: int) -> str:
    """Time stamps (first step of each window) of the global batch that step ``step`` (1-based) trained on.

    Every step consumes one global batch of the seeded, shuffled stream of
    windows (resume restores the position), so step ``s`` read batch ``s - 1``;
    its window indices come from the same grain index pipeline as
    ``make_train_iterator`` builds (shuffle with the seed, repeat, batch).
    """
    import grain

    try:
        src = feed.train_it.source
        ds = grain.MapDataset.range(len(src)).seed(cfg.train.seed).shuffle().repeat(None)
        idx = ds.batch(cfg.train.batch_size, drop_remainder=True)[step - 1]
        times = sorted({str(np.datetime_as_string(src.window_times(int(i))[0], unit="h")) for i in idx})
        return "[" + ", ".join(times) + "]"
    except Exception as e:  # noqa: BLE001 - never let the report hide the NaN
        return f"(unknown: {e})"


def _write_config(cfg: ExperimentConfig, workdir: Path) -> None:
    path = workdir / "config.yaml"
    text = dump_experiment(cfg)
    if path.exists() and path.read_text() != text:
        # a restart with different settings: keep the history, record the new resolved config
        path.rename(workdir / f"config.{int(time.time())}.yaml")
    tmp = path.with_suffix(".yaml.tmp")
    tmp.write_text(text)
    tmp.replace(path)


def _initial_model(cfg: ExperimentConfig):
    tcfg = cfg.train
    if tcfg.init_from:
        src = resolve_model_dir(tcfg.init_from)
        # weights only (the original's fine-tuning: fresh optimiser, step 0)
        model = model_ckpt.load_model(src, model_cfg=cfg.model)
        print(f"initialised weights from {src}")
        return model
    return build_model(cfg.model, seed=tcfg.seed)


def _frozen_backbone(cfg: ExperimentConfig, mesh):
    if not cfg.train.backbone_checkpoint:
        raise ValueError("train.backbone_checkpoint: precipitation training needs the frozen wind model")
    src = resolve_model_dir(cfg.train.backbone_checkpoint)
    backbone = model_ckpt.load_model(src, mesh=mesh)
    if backbone.config.kind != "backbone" or backbone.config.in_channels != cfg.model.in_channels:
        raise ValueError(f"{src}: not a {cfg.model.in_channels}-channel backbone")
    return backbone


def _export_models(ckpts: RunCheckpoints, state: TrainState, graphdef, workdir: Path, mcfg, primary: bool,
                   feed) -> None:
    """Write model_final (current weights) and model_best (best validation step) as model packages.

    Each carries the training store's statistics, grid and climatology
    (:func:`fcn_jax.checkpoints.package.package_from_store`): a forecast needs no store.
    """
    cfg = feed.cfg
    package, clim = model_ckpt.package_from_store(feed.store, cfg.data.channels, kind=mcfg.kind,
                                                  precip_eps=cfg.train.precip_eps, experiment=cfg.name,
                                                  info=feed.info)
    package["provenance"]["run"] = str(Path(workdir).resolve())
    model = unstack_model(nnx.merge(graphdef, state.params))  # exported models hold per-block weights
    model_ckpt.save_model(workdir / "model_final", model, overwrite=True, extra={"step": int(state.step)},
                          package=package, climatology=clim)
    best = ckpts.best_step()
    if best is not None and best != int(state.step):
        # only a step that verifies is exported; a damaged best is moved aside and the next best taken
        found = ckpts.best_intact(abstract_like(state))
        best = found[0] if found else None
        if found and best != int(state.step):
            model = unstack_model(nnx.merge(graphdef, found[1].params))
    model_ckpt.save_model(workdir / "model_best", model, overwrite=True,
                          extra={"step": int(best if best is not None else state.step)},
                          package=package, climatology=clim)
