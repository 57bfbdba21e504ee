"""Validation on held-out years during training.

For each validation batch the model is rolled out over the training rollout
length k; the record holds the validation loss (the training loss on held-out
data, used to pick the best checkpoint) and, per channel and lead, the
latitude-weighted RMSE in physical units and the ACC against the store's
time-mean climatology, FourCastNet's conventions (square root and correlation
per sample, then the mean over samples). The reductions run on the global
sharded arrays, so XLA reduces across ``height``/``width`` and ``data``.

Precipitation mode scores the one channel ``tp`` at the 6 h lead: PrecipNet on
the frozen backbone's prediction, un-logged to metres
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
from fcn_jax.training.step import make_loss_fn, normalize_batch


class Validator:
    def __init__(self, cfg: ExperimentConfig, mesh, graphdef, feed, frozen=None):
        self.cfg = cfg
        self.feed = feed
        tcfg = cfg.train
        self.mode = tcfg.mode
        self.channels = list(cfg.data.channels) if tcfg.mode != "precip" else ["tp"]
        mean, std = feed.norm
        weights = metrics.lat_weights(feed.lat, n_lat=len(feed.lat), scheme=cfg.evaluation.lat_weights)
        clim = feed.climatology  # [lat, lon, channel] physical, of self.channels, or None
        loss_fn = make_loss_fn(graphdef, tcfg.loss_weights or None, mode=tcfg.mode, precip_eps=tcfg.precip_eps,
                               frozen=frozen)
        eps = tcfg.precip_eps
        # frozen weights: an argument of the jitted function, not a closed-over constant (see make_loss_fn)
        if self.mode == "precip":
            fgraph, self._frozen_params = nnx.split(frozen, nnx.Param)
        else:
            self._frozen_params = None

        def evaluate(params, batch, fparams):
            batch = normalize_batch(batch, feed.norm)
            model = nnx.merge(graphdef, params)
            fields = batch["fields"]
            if self.mode == "precip":
                loss, per_step = loss_fn(params, batch, fparams)
                wind = nnx.merge(fgraph, fparams)
                pred = eps * jnp.expm1(model(wind(fields[:, 0])))  # metres, [batch, lat, lon, 1]
                truth = batch["tp"]  # metres, [batch, lat, lon, 1]
                preds, truths = pred[:, None], truth[:, None]  # one lead: [batch, 1, lat, lon, 1]
                clim_n = clim  # time mean of tp, [lat, lon, 1], or None
            else:
                loss, per_step = loss_fn(params, batch)
                k = fields.shape[1] - 1
                state, outs = fields[:, 0], []
                for _ in range(k):
                    state = model(state)
                    outs.append(state)
                # physical units: x = x_norm * std + mean
                preds = jnp.stack(outs, axis=1) * std + mean  # [batch, k, lat, lon, channel]
                truths = fields[:, 1:] * std + mean
                clim_n = clim
            rmse = jnp.mean(metrics.weighted_rmse(preds, truths, weights), axis=0)  # [k, channel]
            if clim_n is not None:
                acc = jnp.mean(metrics.weighted_acc(preds, truths, clim_n, weights), axis=0)
            else:
                acc = jnp.full_like(rmse, jnp.nan)
            return loss, per_step, rmse, acc

        self._evaluate = jax.jit(evaluate)

    def run(self, params, step: int) -> dict:
        totals = None
        n = 0
        for batch in self.feed.valid_batches(self.cfg.train.validate_batches):
            out = self._evaluate(params, batch, self._frozen_params)
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
