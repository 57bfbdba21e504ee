"""Connects an experiment's ``data`` section to the input pipeline for training.

``open_feed(cfg, mesh)`` gives the loop what it needs and nothing more:
``next_train()`` (a global batch dict), ``get_state``/``set_state`` (exact
resume), ``valid_batches(n)`` (held-out windows, same first ``n`` every time so
validation losses are comparable), ``norm`` (per-channel mean/std on device),
``climatology`` and ``lat``.

Batches: ``{"fields": [batch@data, k+1, lat@height, lon@width, channel]}`` in
physical units -- the train step normalises on the device -- plus, for the
precipitation model, ``"tp": [batch@data, k, lat@height, lon@width, 1]`` in metres,
the accumulations over the 6 h ending at each target time.

Precipitation data: ``tp`` is one more channel of the same store (ERA5's
convention, fourcastnet-model.md §11.1: ``tp[k]`` is the accumulation over the
6 h ending at time ``k``). In ``precip`` mode the feed reads windows of
k = ``train.rollout_steps`` (1 in the original's recipe) with channels
``data.channels + ["tp"]`` and splits each on the device: the states at
t .. t+k (``fields``, the C input channels) and ``tp`` at t+1 .. t+k -- the
state at t+j pairs with the precipitation of the interval (t+j-1, t+j]. Only the C
input channels are z-scored (``norm``); ``tp`` stays in metres.
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
from fcn_jax.parallel.axes import WINDOW_SPEC


def resolve_store(cfg: ExperimentConfig, check: bool = True) -> str:
    """The store path; ``"world"`` means the embedded world (generated and cached on first use)."""
    from fcn_jax.data.catalog import resolve_store as resolve

    return str(resolve(cfg.data.store, world_seed=cfg.data.world_seed, world_days=cfg.data.world_days or None,
                       check=check))


def _years(pair) -> str:
    return f"{pair[0]}-{pair[1]}"


#: The precipitation target's channel name in the store.
PRECIP_CHANNEL = "tp"


def _require_tp(store: str, channels: list[str], names: list[str]) -> None:
    """Raise a DataError that says how to add ``tp`` when the store (channels ``names``) lacks it."""
    if PRECIP_CHANNEL in names:
        return
    raise DataError(
        f"{store}: precipitation training (train.mode: precip) needs the target channel 'tp' (total "
        f"precipitation, the 6 h accumulation ending at each time stamp, metres) in the store; it has {names}. "
        f"Prepare the store again with it: python -m fcn_jax.prepare SOURCES --out STORE "
        f"--channels {','.join(channels)},tp (sources holding ERA5 total_precipitation as 6-hourly "
        "accumulations), or use data.store: world, whose store carries a tp proxy"
    )


class Feed:
    """The loop's data: training batches, validation batches, statistics.

    Attributes:
      norm: ``(mean, std)`` ``[C]`` of the C input channels (``data.channels``),
        replicated on the mesh.
      climatology: time mean ``[lat, lon, channel]`` (physical units) of the
        channels validation scores -- ``data.channels``, or ``["tp"]`` in
        precip mode -- or None when the store has no ``time_mean``.
      lat: latitudes of the rows, north -> south.
    """

    def __init__(self, cfg: ExperimentConfig, mesh):
        self.cfg = cfg
        self.mesh = mesh
        tcfg, dcfg = cfg.train, cfg.data
        from fcn_jax.data.store import StoreInfo

        self.store = resolve_store(cfg, check=False)
        self.info = info = StoreInfo.read(self.store)  # the one read of the store's description
        self.precip = tcfg.mode == "precip"
        k = tcfg.rollout_steps  # precip: PrecipNet is trained on the backbone's 1 .. k-step states
        channels = list(dcfg.channels)
        self.n_channels = len(channels)
        read = channels
        if self.precip:
            _require_tp(self.store, channels, list(info.channels))
            read = channels + [PRECIP_CHANNEL]  # tp last: windows [.., C + 1], split below
        common = dict(mesh=mesh, batch_size=tcfg.batch_size, channels=read, rollout_steps=k, stride=dcfg.dt,
                      normalize=False, num_workers=dcfg.num_workers, prefetch=dcfg.prefetch,
                      num_threads=dcfg.num_threads)
        self.train_it = make_train_iterator(self.store, seed=tcfg.seed, years=_years(dcfg.train_years), info=info,
                                            **common)
        self._valid_source = WindowSource(self.store, read, k, _years(dcfg.valid_years), stride=dcfg.dt, info=info)
        self._valid_common = dict(common, num_workers=0)
        # statistics of the C input channels only: tp is never z-scored (its target is log1p(tp / eps))
        mean, std = self.train_it.mean[: self.n_channels], self.train_it.std[: self.n_channels]
        replicated = NamedSharding(mesh, P())
        self.norm = (jax.device_put(jnp.asarray(mean), replicated), jax.device_put(jnp.asarray(std), replicated))
        self.lat = np.asarray(self.train_it.source.lat)
        scored = [PRECIP_CHANNEL] if self.precip else channels
        clim = info.time_mean(scored)  # [channel, lat, lon] or None
        if clim is not None:
            clim = np.transpose(clim, (1, 2, 0))  # -> [lat, lon, channel]
            self.climatology = jax.device_put(jnp.asarray(clim, jnp.float32), replicated)
        else:
            self.climatology = None
        self._split = None
        if self.precip:
            c = self.n_channels

            def split(x):
                # x: [batch, k+1, lat, lon, C+1] -> fields [batch, k+1, lat, lon, C],
                # tp [batch, k, lat, lon, 1]: the accumulations ending at t+1 .. t+k
                return {"fields": x[..., :c], "tp": x[:, 1:, :, :, c:]}

            shardings = {"fields": NamedSharding(mesh, WINDOW_SPEC), "tp": NamedSharding(mesh, WINDOW_SPEC)}
            self._split = jax.jit(split, out_shardings=shardings)

    def _batch(self, x) -> dict:
        return self._split(x) if self._split is not None else {"fields": x}

    def next_train(self) -> dict:
        return self._batch(next(self.train_it))

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
            yield self._batch(x)

    def close(self) -> None:
        close = getattr(self.train_it, "close", None)
        if close is not None:
            close()


def open_feed(cfg: ExperimentConfig, mesh) -> Feed:
    return Feed(cfg, mesh)
