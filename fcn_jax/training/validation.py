"""Validation on held-out years during training.

For each validation batch the model is rolled out over the training rollout
length k; the record holds the validation loss (the training loss on held-out
data, used to pick the best checkpoint) and, per channel and lead, the
latitude-weighted RMSE in physical units and the ACC against the store's
time-mean climatology, FourCastNet's conventions (square root and correlation
per sample, then the mean over samples). The reductions run on the global
sharded arrays, so XLA reduces across ``height``/``width`` and ``data``.

Precipitation mode scores the one channel ``tp`` at the k leads it trains on
(6 h for the original's k = 1): PrecipNet on the frozen backbone's 1 .. k-step
predictions, un-logged to metres
(``eps * expm1(y)``), against the store's ``tp``; ACC against the time mean of
``tp`` (the original's ``precip/time_means.npy``). The validation loss stays
the training loss on the log-transformed target.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from fcn_jax import metrics
from fcn_jax.config import ExperimentConfig
from fcn_jax.normalize import denormalize, precip_to_metres
from fcn_jax.training.losses import rollout, step_losses
from fcn_jax.training.step import normalize_batch, precip_forward


class Validator:
    def __init__(self, cfg: ExperimentConfig, mesh, graphdef, feed, frozen=None):
        self.cfg = cfg
        self.feed = feed
        tcfg = cfg.train
        self.mode = tcfg.mode
        self.channels = list(cfg.data.channels) if tcfg.mode != "precip" else ["tp"]
        weights = metrics.lat_weights(feed.lat, n_lat=len(feed.lat), scheme=cfg.evaluation.lat_weights)
        eps = tcfg.precip_eps
        loss_weights = tcfg.loss_weights or None
        # Arrays enter the jitted function as arguments, never as closed-over constants:
        # the frozen backbone and a 0.25 deg climatology would be baked into the program.
        if self.mode == "precip":
            fgraph, self._frozen_params = nnx.split(frozen, nnx.Param)
        else:
            self._frozen_params = None
        self._norm, self._clim = feed.norm, feed.climatology  # clim: [lat, lon, channel] physical, or None

        def evaluate(params, batch, fparams, norm, clim):
            mean, std = norm
            batch = normalize_batch(batch, norm)
            model = nnx.merge(graphdef, params)
            fields = batch["fields"]
            if self.mode == "precip":
                loss, per_step, pred_log = precip_forward(model, nnx.merge(fgraph, fparams), batch, eps,
                                                          loss_weights)
                preds = precip_to_metres(pred_log, eps)  # metres: [batch, k, lat, lon, 1]
                truths = batch["tp"]
            else:
                # one rollout serves both the loss and the scores
                preds_n = rollout(model, fields[:, 0], fields.shape[1] - 1)  # [batch, k, lat, lon, channel]
                loss, per_step = step_losses(preds_n, fields[:, 1:], loss_weights)
                preds = denormalize(preds_n, mean, std)  # physical units
                truths = denormalize(fields[:, 1:], mean, std)
            rmse = jnp.mean(metrics.weighted_rmse(preds, truths, weights), axis=0)  # [k, channel]
            if clim is not None:
                acc = jnp.mean(metrics.weighted_acc(preds, truths, clim, weights), axis=0)
            else:
                acc = jnp.full_like(rmse, jnp.nan)
            return loss, per_step, rmse, acc

        self._evaluate = jax.jit(evaluate)

    def run(self, params, step: int) -> dict:
        totals = None
        n = 0
        for batch in self.feed.valid_batches(self.cfg.train.validate_batches):
            out = self._evaluate(params, batch, self._frozen_params, self._norm, self._clim)
            totals = out if totals is None else jax.tree.map(jnp.add, totals, out)
            n += 1
        if n == 0:
            raise RuntimeError("validation: the validation split yielded no batch (check data.valid_years)")
        loss, per_step, rmse, acc = (np.asarray(v) / n for v in totals)
        leads_h = [6 * self.cfg.data.dt * (i + 1) for i in range(rmse.shape[0])]
        return {
            "step": step,
            "kind": "validation",
            "val_loss": float(loss),
            "val_loss_per_step": [float(v) for v in per_step],
            "lead_hours": leads_h,
            "rmse": {c: [float(v) for v in rmse[:, i]] for i, c in enumerate(self.channels)},
            "acc": {c: [float(v) for v in acc[:, i]] for i, c in enumerate(self.channels)},
            "batches": n,
        }
