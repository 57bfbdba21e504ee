"""Connects an experiment's ``data`` section to the input pipeline for training.

``open_feed(cfg, mesh)`` gives the loop what it needs and nothing more:
``next_train()`` (a global batch dict), ``get_state``/``set_state`` (exact
resume), ``valid_batches(n)`` (held-out windows, same first ``n`` every time so
validation losses are comparable), ``norm`` (per-channel mean/std on device),
``climatology`` and ``lat``.

Batches: ``{"fields": [batch@data, k+1, lat@height, lon@width, channel]}`` in
physical units -- the train step normalises on the device -- plus, for the
precipitation model, ``"tp": [batch@data, lat@height, lon@width, 1]`` in metres,
the accumulation over the 6 h ending at the target time.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from fcn_jax.config import ExperimentConfig
from fcn_jax.data.errors import DataError
from fcn_jax.data.pipeline import WindowSource, make_train_iterator


def resolve_store(cfg: ExperimentConfig) -> str:
    """The store path; ``"world"`` means the embedded world (generated and cached on first use)."""
    from fcn_jax.data.store import resolve_store as resolve

    return str(resolve(cfg.data.store, world_seed=cfg.data.world_seed, world_days=cfg.data.world_days or None))


def _years(pair) -> str:
    return f"{pair[0]}-{pair[1]}"


class Feed:
    def __init__(self, cfg: ExperimentConfig, mesh):
        self.cfg = cfg
        self.mesh = mesh
        tcfg, dcfg = cfg.train, cfg.data
        self.store = resolve_store(cfg)
        self.precip = tcfg.mode == "precip"
        k = 1 if self.precip else tcfg.rollout_steps
        channels = list(dcfg.channels)
        common = dict(mesh=mesh, batch_size=tcfg.batch_size, channels=channels, rollout_steps=k, stride=dcfg.dt,
                      normalize=False, num_workers=dcfg.num_workers, prefetch=dcfg.prefetch,
                      num_threads=dcfg.num_threads)
        self.train_it = make_train_iterator(self.store, seed=tcfg.seed, years=_years(dcfg.train_years), **common)
        self._valid_source = WindowSource(self.store, channels, k, _years(dcfg.valid_years), stride=dcfg.dt)
        self._valid_common = dict(common, num_workers=0)
        mean, std = self.train_it.mean, self.train_it.std
        replicated = NamedSharding(mesh, P())
        self.norm = (jax.device_put(jnp.asarray(mean), replicated), jax.device_put(jnp.asarray(std), replicated))
        self.lat = np.asarray(self.train_it.source.lat)
        from fcn_jax.data.store import open_store

        ds = open_store(self.store)
        if "time_mean" in ds:
            clim = ds["time_mean"].sel(channel=channels).transpose("lat", "lon", "channel").values
            self.climatology = jax.device_put(jnp.asarray(clim, jnp.float32), replicated)
        else:
            self.climatology = None
        if self.precip:
            raise DataError(
                f"{self.store}: precipitation training needs a `tp` target aligned with the fields; "
                "this store has none"
            )

    def next_train(self) -> dict:
        return {"fields": next(self.train_it)}

    def get_state(self) -> dict:
        return self.train_it.get_state()

    def set_state(self, state: dict) -> None:
        if state:
            self.train_it.set_state(state)

    def valid_batches(self, n: int):
        """The first ``n`` batches of held-out windows, spread evenly over the validation period."""
        src = self._valid_source
        bs = self.cfg.train.batch_size
        total = len(src) // bs
        if total == 0:
            raise DataError(f"{src}: fewer validation windows than one batch of {bs}")
        it = make_train_iterator(self.store, source=src, shuffle=True, seed=12345, num_epochs=1,
                                 **self._valid_common)
        for i, x in enumerate(it):
            if i >= min(n, total):
                break
            yield {"fields": x}

    def close(self) -> None:
        close = getattr(self.train_it, "close", None)
        if close is not None:
            close()


def open_feed(cfg: ExperimentConfig, mesh) -> Feed:
    return Feed(cfg, mesh)
