"""Store names -> store paths: the one module above both the world and the store.

``data.store`` in an experiment is either a path to a prepared store or
``"world"``, the embedded world (:mod:`fcn_jax.data.world`), generated and
prepared once and cached. :func:`resolve_store` turns either into a path;
:func:`world_store` does the generating, preparing and caching. Keeping this
here breaks the old ``store`` <-> ``world`` import cycle: ``world`` generates,
``store`` reads and ``prepare`` writes; only this module knows all three.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import time
from pathlib import Path

from fcn_jax.data.prepare import prepare
from fcn_jax.data.store import open_store
from fcn_jax.data.world import (
    DEFAULT_DAYS,
    WORLD_STORE_CHANNELS,
    WorldSpec,
    default_cache_dir,
    generate_world,
    world_splits,
)


def world_store(root: str | os.PathLike | None = None, *, seed: int = 0, days: int = DEFAULT_DAYS,
                spec: WorldSpec | None = None, prepare_store: bool = True, progress: bool = True) -> Path:
    """Generate (once) and prepare (once) the world; return the store path.

    Layout under ``root`` (default ``default_cache_dir() / spec.key()``)::

        root/netcdf/world_<year>_{single,pressure}_levels.nc   CDS-style files
        root/store.zarr                                         training store
        root/world.json                                         spec, splits, timings

    A second call with the same arguments finds ``world.json`` matching the spec
    and returns immediately. With ``prepare_store=False`` returns ``root/netcdf``.
    """
    spec = spec or WorldSpec(seed=seed, days=days)
    root = Path(root) if root is not None else default_cache_dir() / spec.key()
    meta_path = root / "world.json"
    nc_dir, store = root / "netcdf", root / "store.zarr"
    spec_d = json.loads(json.dumps(dataclasses.asdict(spec)))  # tuples -> lists, as stored
    meta = {}
    if meta_path.exists():
        meta = json.loads(meta_path.read_text())
        if meta.get("spec") != spec_d:
            # Same directory, different spec: regenerate rather than serve stale data.
            meta = {}
            shutil.rmtree(nc_dir, ignore_errors=True)
            shutil.rmtree(store, ignore_errors=True)
    root.mkdir(parents=True, exist_ok=True)
    if not (meta.get("netcdf_done") and nc_dir.exists()):
        t0 = time.perf_counter()
        generate_world(nc_dir, spec, progress=progress)
        meta = {"spec": spec_d, "netcdf_done": True, "generate_seconds": round(time.perf_counter() - t0, 1),
                "splits": world_splits(spec.days, spec.start)}
        meta_path.write_text(json.dumps(meta, indent=2))
    if not prepare_store:
        return nc_dir
    if not (meta.get("store_done") and store.exists()):
        t0 = time.perf_counter()
        files = sorted(str(p) for p in nc_dir.glob("*.nc"))
        prepare(files, store, channels=list(WORLD_STORE_CHANNELS), stats_years=meta["splits"]["train"], overwrite=True,
                progress=progress)
        meta.update(store_done=True, prepare_seconds=round(time.perf_counter() - t0, 1))
        meta_path.write_text(json.dumps(meta, indent=2))
    return store


def resolve_store(store: str | os.PathLike, *, world_seed: int = 0, world_days: int | None = None,
                  progress: bool = True, check: bool = True) -> Path:
    """A store path from an experiment's ``data.store`` value.

    ``"world"`` generates/prepares the embedded world once (cached, see
    :func:`world_store`) and returns its store; anything else is a path to a
    prepared store, checked to be one unless ``check=False`` (the caller then
    opens it itself, e.g. with :meth:`fcn_jax.data.store.StoreInfo.read`).
    """
    if str(store) == "world":
        return world_store(seed=world_seed, days=DEFAULT_DAYS if world_days is None else world_days,
                           progress=progress)
    if check:
        open_store(store)  # clear error if missing or not a store
    return Path(store)
