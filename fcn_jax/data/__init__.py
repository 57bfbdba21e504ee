"""Data: channel catalogue, readers, training store, embedded world, grain pipeline.

Public API (imported lazily, so ``import fcn_jax.data`` stays cheap)::

    from fcn_jax.data import (
        resolve_channels, CHANNEL_SETS, FCN_20, WORLD,          # channels
        open_source,                                             # readers
        prepare, PreparePlan,                                    # writing a store (prepare.py, plan.py)
        open_store, store_stats, climatology_at, StoreInfo,      # reading a store (store.py)
        resolve_store, world_store,                              # store names -> paths (catalog.py)
        world_splits, WorldSpec, generate_world,                 # the embedded world (world.py)
        WindowSource, make_train_iterator, Normalizer,           # pipeline
        DataError,
    )

Modules, each one job: ``channels`` (catalogue), ``readers/`` (units, grid,
time axis, pieces, canonical source, hourly accumulation, one module per
format), ``climatology`` (choice, accumulation, import), ``plan`` (sizes and
disk check), ``prepare`` (writing, resumable), ``store`` (reading),
``catalog`` (store names; the only module above both ``world`` and the store),
``world`` (generation), ``pipeline`` (training windows).

Command line: ``python -m fcn_jax.data {prepare,world,info} --help``.
"""

from __future__ import annotations

import importlib

from fcn_jax.data.channels import CHANNEL_SETS, FCN_20, FCN_26, WORLD, Channel, get_channel, resolve_channels
from fcn_jax.data.errors import DataError

_LAZY = {
    "open_source": "fcn_jax.data.readers",
    "CanonicalSource": "fcn_jax.data.readers",
    "prepare": "fcn_jax.data.prepare",
    "StoreInfo": "fcn_jax.data.store",
    "open_store": "fcn_jax.data.store",
    "store_stats": "fcn_jax.data.store",
    "climatology_at": "fcn_jax.data.store",
    "parse_years": "fcn_jax.data.store",
    "PreparePlan": "fcn_jax.data.plan",
    "resolve_store": "fcn_jax.data.catalog",
    "world_store": "fcn_jax.data.catalog",
    "world_splits": "fcn_jax.data.world",
    "generate_world": "fcn_jax.data.world",
    "WorldSpec": "fcn_jax.data.world",
    "persistence_skill": "fcn_jax.data.world",
    "WindowSource": "fcn_jax.data.pipeline",
    "make_train_iterator": "fcn_jax.data.pipeline",
    "TrainIterator": "fcn_jax.data.pipeline",
    "Normalizer": "fcn_jax.data.pipeline",
    "read_plan": "fcn_jax.data.pipeline",
}

__all__ = ["CHANNEL_SETS", "FCN_20", "FCN_26", "WORLD", "Channel", "DataError", "get_channel",
           "resolve_channels", *_LAZY]


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'fcn_jax.data' has no attribute {name!r}")
