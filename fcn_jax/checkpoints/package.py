"""Model packages: one self-describing directory holding everything a forecast needs.

This module is the one home of model packages (written by training's
``model_best``/``model_final`` exports and by ``python -m fcn_jax.convert``,
read by forecast, evaluate and fine-tuning). Run checkpoints -- the training
state of each step -- are a different thing and live in
:mod:`fcn_jax.checkpoints.train_state`; both use :mod:`fcn_jax.checkpoints.integrity`.

Layout of ``DIR``::

    DIR/model.json          format fcn_jax.model/2: kind, model config, and the package
                            (channels in order, normalisation mean/std, grid lat/lon,
                            time step, precipitation eps and tp statistics, provenance)
    DIR/climatology.nc      optional: time_mean (channel, lat, lon) [and clim_doy_hour
                            (dayofyear, hour, channel, lat, lon)] in physical units, for ACC
    DIR/params/             Orbax PyTree checkpoint of the parameters (global arrays)
    DIR/fcn_integrity.json  CRC32C and size of every file above (fcn_jax.checkpoints.integrity)

:func:`read_package` returns a :class:`ModelPackage`: forecast and evaluate take
channels, statistics, grid and climatology from it, never from a store.
Packages written before format 2 carry no statistics (``has_stats`` is false);
their channels still resolve from the run's ``config.yaml`` or the experiment.

Parameters are stored as global arrays, so a checkpoint restores onto any mesh:
:func:`load_model` builds an abstract model whose leaves carry the target
shardings and lets Orbax reshard on read. The directory is written under a
temporary name and renamed only when complete, so a half-written checkpoint is
never mistaken for a good one; its integrity manifest is written last, and
:func:`load_model` / :func:`read_package` verify it before reading anything, so
a damaged model is refused with the file and what is wrong.

Command line::

    python -m fcn_jax.checkpoint verify DIR [DIR ...]   # a run directory, its checkpoints/, or a model
    python -m fcn_jax.checkpoint seal DIR [DIR ...]     # add integrity data to trusted pre-integrity checkpoints
    python -m fcn_jax.checkpoint show DIR               # what a model package carries

``verify`` checks without changing anything and exits 1 if anything is
damaged; ``seal`` only adds manifests where there are none.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path

import jax
from flax import nnx

from fcn_jax.checkpoints import integrity
from fcn_jax.config import ModelConfig, build_section
from fcn_jax.errors import EXIT_CHECK_FAILED, EXIT_INPUT, EXIT_NOTHING_TO_VERIFY, EXIT_OK

#: Format of ``model.json``: 2 adds the package (channels, statistics, grid, climatology, provenance).
FORMAT = "fcn_jax.model/2"
CLIMATOLOGY_FILE = "climatology.nc"


def _barrier(name: str) -> None:
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(name)


def save_model(directory: str | Path, model, extra: dict | None = None, overwrite: bool = False,
               package: dict | None = None, climatology=None) -> Path:
    """Write ``model``'s parameters, configuration and package to ``directory``.

    ``package``: what a forecast needs besides the weights, as built by
    :func:`package_metadata` (``channels``, ``normalization``, ``grid``,
    ``time_step_hours``, ``precip``, ``provenance``); stored in ``model.json``.
    ``climatology``: an ``xarray.Dataset`` with ``time_mean`` (channel, lat, lon)
    and optionally ``clim_doy_hour`` (dayofyear, hour, channel, lat, lon),
    physical units, written as ``climatology.nc``. ``extra``: further keys for
    ``model.json`` (e.g. ``step``).

    Multi-process: every process calls this (each writes its shards); only
    process 0 touches directories and metadata, between barriers.
    """
    import orbax.checkpoint as ocp

    directory = Path(directory).resolve()
    primary = jax.process_index() == 0
    if directory.exists() and not overwrite:
        raise FileExistsError(f"{directory} already exists; choose a new --out or remove it")
    if package is not None:
        _check_package(package, model.config)
    tmp = directory.with_name(directory.name + ".tmp-partial")
    if primary:
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir(parents=True)
    _barrier(f"save_model:mkdir:{directory}")
    try:
        params = nnx.to_pure_dict(nnx.state(model, nnx.Param))
        with ocp.StandardCheckpointer() as ckptr:
            ckptr.save(tmp / "params", params)
            ckptr.wait_until_finished()
        _barrier(f"save_model:saved:{directory}")
        if primary:
            meta = {"format": FORMAT, "kind": model.config.kind, "model": _model_dict(model.config)}
            meta.update(package or {})
            if climatology is not None:
                climatology.to_netcdf(tmp / CLIMATOLOGY_FILE, engine="netcdf4")
                meta["climatology"] = {"file": CLIMATOLOGY_FILE,
                                       "variables": sorted(str(v) for v in climatology.data_vars),
                                       **{k: v for k, v in climatology.attrs.items() if isinstance(v, str)}}
            meta.update(extra or {})
            (tmp / "model.json").write_text(json.dumps(meta, indent=1))
            integrity.write_manifest(tmp)  # last: covers params/, model.json and the climatology
            if directory.exists():
                shutil.rmtree(directory)
            tmp.rename(directory)
    except BaseException:
        if primary:
            shutil.rmtree(tmp, ignore_errors=True)  # never leave a half-written checkpoint behind
        raise
    _barrier(f"save_model:done:{directory}")
    return directory


def _model_dict(cfg: ModelConfig) -> dict:
    d = dataclasses.asdict(cfg)
    return {k: list(v) if isinstance(v, tuple) else v for k, v in d.items()}


def read_model_config(directory: str | Path) -> ModelConfig:
    path = Path(directory) / "model.json"
    if not path.is_file():
        raise FileNotFoundError(f"{directory} is not an fcn_jax model checkpoint: {path} is missing")
    meta = json.loads(path.read_text())
    return build_section(ModelConfig, meta["model"], f"{path}: model")


# ------------------------------------------------------------------ the package
def git_revision() -> str | None:
    """The git revision of the fcn_jax source tree (``-dirty`` if modified), or None outside a checkout."""
    import subprocess

    root = Path(__file__).resolve().parent.parent
    try:
        rev = subprocess.run(["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True, text=True,
                             timeout=10, check=True).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return rev + ("-dirty" if dirty else "") if rev else None


def package_metadata(*, channels, mean, std, lat, lon, time_step_hours: float = 6.0, out_channels=None,
                     precip: dict | None = None, provenance: dict | None = None) -> dict:
    """The package entries of ``model.json`` (see the module doc), checked and JSON-ready.

    ``channels``: the model's input channels in order; ``mean``/``std``
    ``[channel]`` their normalisation; ``lat`` (north -> south) / ``lon`` the
    model grid; ``out_channels`` (default ``channels``; ``["tp"]`` for a
    precipitation model); ``precip``: ``{"eps": ..., "tp_mean": ..., "tp_std":
    ...}`` for precipitation models; ``provenance``: free-form strings (source
    checkpoint, statistics files, store, experiment); the git revision and the
    time are added.
    """
    import time

    import numpy as np

    mean = np.asarray(mean, np.float64).reshape(-1)
    std = np.asarray(std, np.float64).reshape(-1)
    channels = [str(c) for c in channels]
    if mean.shape != (len(channels),) or std.shape != (len(channels),):
        raise ValueError(f"normalisation mean {mean.shape} / std {std.shape} do not match the {len(channels)} "
                         f"channels {channels}")
    if not (np.all(np.isfinite(mean)) and np.all(np.isfinite(std)) and np.all(std > 0)):
        raise ValueError(f"normalisation statistics must be finite with std > 0: mean {mean}, std {std}")
    prov = {"git_revision": git_revision(), "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    prov.update({k: v for k, v in (provenance or {}).items() if v is not None})
    out = {
        "channels": channels,
        "out_channels": [str(c) for c in (out_channels if out_channels is not None else channels)],
        "normalization": {"mean": mean.tolist(), "std": std.tolist()},
        "grid": {"lat": np.asarray(lat, np.float64).tolist(), "lon": np.asarray(lon, np.float64).tolist()},
        "time_step_hours": float(time_step_hours),
        "provenance": prov,
    }
    if precip is not None:
        out["precip"] = {k: float(v) for k, v in precip.items() if v is not None}
    return out


def _check_package(package: dict, cfg: ModelConfig) -> None:
    chans, outs = package.get("channels", []), package.get("out_channels", [])
    if len(chans) != cfg.in_channels:
        raise ValueError(f"the package lists {len(chans)} input channels {chans}, the model takes {cfg.in_channels}")
    if outs and len(outs) != cfg.out_channels:
        raise ValueError(f"the package lists {len(outs)} output channels {outs}, the model gives {cfg.out_channels}")
    grid = package.get("grid") or {}
    shape = (len(grid.get("lat", [])), len(grid.get("lon", [])))
    if grid and shape != tuple(cfg.img_size):
        raise ValueError(f"the package grid is lat x lon = {shape}, the model's img_size is {tuple(cfg.img_size)}")


def climatology_dataset(time_mean, channels, lat, lon, doy_hour=None, hours=None, source: str = ""):
    """The ``climatology.nc`` contents: ``time_mean [channel, lat, lon]`` (+ ``clim_doy_hour``), physical units."""
    import numpy as np
    import xarray as xr

    data = {"time_mean": (("channel", "lat", "lon"), np.asarray(time_mean, np.float32))}
    coords = {"channel": [str(c) for c in channels], "lat": ("lat", np.asarray(lat, np.float64)),
              "lon": ("lon", np.asarray(lon, np.float64))}
    if doy_hour is not None:
        data["clim_doy_hour"] = (("dayofyear", "hour", "channel", "lat", "lon"), np.asarray(doy_hour, np.float32))
        coords["dayofyear"] = np.arange(1, np.shape(doy_hour)[0] + 1)
        coords["hour"] = np.asarray(hours)
    return xr.Dataset(data, coords=coords, attrs={"source": source} if source else {})


@dataclasses.dataclass(frozen=True)
class ModelPackage:
    """What a model directory says about itself (read by :func:`read_package`).

    ``channels``: input channels in order; ``out_channels`` (``("tp",)`` for a
    precipitation model); ``mean``/``std`` ``[channel]`` float64 normalisation
    of the input channels (None for a pre-package model); ``lat``/``lon`` the
    model grid (None when unknown); ``time_step_hours``; ``precip`` (``eps``,
    ``tp_mean``, ``tp_std``) for precipitation models; ``provenance``.
    """

    path: Path
    kind: str
    config: ModelConfig
    channels: tuple[str, ...]
    out_channels: tuple[str, ...]
    mean: "object | None"
    std: "object | None"
    lat: "object | None"
    lon: "object | None"
    time_step_hours: float
    precip: dict | None
    provenance: dict
    meta: dict

    @property
    def has_stats(self) -> bool:
        return self.mean is not None and self.std is not None

    def normalizer(self):
        """The :class:`~fcn_jax.normalize.Normalizer` of the input channels (ValueError if the package has none)."""
        from fcn_jax.normalize import Normalizer

        if not self.has_stats:
            raise ValueError(f"{self.path}: the model package carries no normalisation statistics (written before "
                             f"fcn_jax's package format 2); re-export it or convert with --stats")
        return Normalizer(self.mean, self.std)

    @property
    def has_climatology(self) -> bool:
        return (self.path / CLIMATOLOGY_FILE).is_file()

    def climatology(self):
        """The package's climatology as a lazily opened ``xarray.Dataset`` (None when it has none)."""
        import xarray as xr

        if not self.has_climatology:
            return None
        return xr.open_dataset(self.path / CLIMATOLOGY_FILE, engine="netcdf4")


def read_package(path: str | Path, verify: bool = True) -> ModelPackage:
    """The :class:`ModelPackage` of a model directory or of a run directory's ``model_best``/``model_final``.

    ``verify``: check the integrity manifest first (a damaged package is refused).
    """
    import numpy as np

    directory = resolve_model_dir(path).resolve()
    if verify:
        integrity.check(directory, what="model package")
    meta = json.loads((directory / "model.json").read_text())
    cfg = read_model_config(directory)
    chans = meta.get("channels") or _legacy_channels(directory, meta)
    outs = meta.get("out_channels") or (["tp"] if cfg.kind == "precip" else list(chans or []))
    norm = meta.get("normalization") or {}
    grid = meta.get("grid") or {}
    return ModelPackage(
        path=directory, kind=cfg.kind, config=cfg, channels=tuple(chans or ()), out_channels=tuple(outs),
        mean=np.asarray(norm["mean"], np.float64) if "mean" in norm else None,
        std=np.asarray(norm["std"], np.float64) if "std" in norm else None,
        lat=np.asarray(grid["lat"], np.float64) if grid.get("lat") else None,
        lon=np.asarray(grid["lon"], np.float64) if grid.get("lon") else None,
        time_step_hours=float(meta.get("time_step_hours", 6.0)), precip=_precip_settings(directory, meta, cfg),
        provenance=dict(meta.get("provenance") or {}), meta=meta)


#: A store's day-of-year x hour climatology is copied into a package only up to this size (bytes);
#: beyond it (0.25 deg: ~120 GB for 20 channels) the package keeps the time mean and says so.
MAX_DOY_CLIMATOLOGY_BYTES = 2 << 30


def package_from_store(store, channels, *, kind: str = "backbone", precip_eps: float | None = None,
                       experiment: str | None = None, info=None) -> tuple[dict, object]:
    """``(package, climatology)`` for :func:`save_model` from a training store's statistics and grid.

    The store's per-channel mean/std of ``channels`` become the package's
    normalisation; its ``time_mean`` (and its ``clim_doy_hour`` when present and
    at most :data:`MAX_DOY_CLIMATOLOGY_BYTES`) the package climatology; for a
    precipitation model (``kind="precip"``) the climatology is ``tp``'s and
    ``precip`` records ``eps`` and the store's ``tp`` mean/std.
    """
    import numpy as np

    from fcn_jax.data.store import StoreInfo, open_store

    info = info or StoreInfo.read(store)
    channels = list(channels)
    idx = info.index_of(channels)
    scored = ["tp"] if kind == "precip" else channels
    precip = None
    if kind == "precip":
        tp_mean, tp_std = info.stats(["tp"])
        precip = {"eps": float(precip_eps if precip_eps is not None else 1e-5), "tp_mean": float(tp_mean[0]),
                  "tp_std": float(tp_std[0])}
    package = package_metadata(
        channels=channels, mean=info.mean[idx], std=info.std[idx],
        lat=info.lat, lon=info.lon, time_step_hours=info.time_step_hours,
        out_channels=["tp"] if kind == "precip" else channels, precip=precip,
        provenance={"store": str(Path(info.path).resolve()), "experiment": experiment,
                    "stats_years": str(info.attrs.get("stats_years", "")) or None,
                    "statistics": "the training store's global per-channel mean/std"})
    tm = info.time_mean(scored)
    clim = None
    if tm is not None:
        doy, hours, note = None, None, "time mean of the training store"
        if "clim_doy_hour" in info.variables:
            ds = open_store(store)
            ci = [list(info.channels).index(c) for c in scored]
            da = ds["clim_doy_hour"].isel(channel=ci)
            if da.size * 4 <= MAX_DOY_CLIMATOLOGY_BYTES:
                doy = np.asarray(da.values, np.float32)
                hours = np.asarray(ds["hour"].values)
                note = "time mean and day-of-year x hour climatology of the training store"
            else:
                note += f" (its day-of-year x hour climatology, {da.size * 4 / 2**30:.0f} GiB, is not copied)"
        clim = climatology_dataset(tm, scored, info.lat, info.lon, doy_hour=doy, hours=hours, source=note)
    return package, clim


def _run_config(directory: Path) -> dict:
    """The resolved experiment of the run a pre-package model came from (``config.yaml`` beside it), or {}."""
    import yaml

    for cand in (directory / "config.yaml", directory.parent / "config.yaml"):
        if cand.is_file():
            return yaml.safe_load(cand.read_text()) or {}
    return {}


def _precip_settings(directory: Path, meta: dict, cfg: ModelConfig) -> dict | None:
    """A precipitation model's ``precip`` entry; a pre-package one's ``eps`` from its run (the original's 1e-5)."""
    if cfg.kind != "precip":
        return meta.get("precip")
    precip = dict(meta.get("precip") or {})
    if "eps" not in precip:
        precip["eps"] = float((_run_config(directory).get("train") or {}).get("precip_eps", 1e-5))
    return precip


def _legacy_channels(directory: Path, meta: dict) -> list[str] | None:
    """Channels of a pre-package model: the run's ``config.yaml`` (``data.channels``), else its experiment."""
    chans = (_run_config(directory).get("data") or {}).get("channels")
    if chans:
        return list(chans)
    if meta.get("experiment"):
        from fcn_jax.config import ConfigError, load_experiment

        try:
            return list(load_experiment(meta["experiment"]).data.channels)
        except ConfigError:
            return None
    return None


def load_model(directory: str | Path, mesh=None, model_cfg: ModelConfig | None = None, verify: bool = True):
    """Restore a model saved by :func:`save_model`, sharded for ``mesh`` (or one device).

    ``verify=False`` only where the caller has just verified the directory (:func:`read_package`):
    at 0.25 deg a check re-reads ~380 MB.
    """
    import orbax.checkpoint as ocp

    from fcn_jax.model.afnonet import build_model, param_shardings
    from fcn_jax.parallel.mesh import single_device_mesh

    directory = Path(directory).resolve()
    saved_cfg = read_model_config(directory)
    if verify:
        integrity.check(directory, what="model checkpoint")  # never load (or export onwards) damaged weights
    cfg = model_cfg or saved_cfg
    if model_cfg is not None:
        # runtime switches may differ; the architecture may not
        arch = lambda c: dataclasses.replace(c, compute_dtype="float32", remat=False)  # noqa: E731
        if arch(model_cfg) != arch(saved_cfg):
            raise ValueError(f"{directory}: saved model {saved_cfg} does not match the requested {model_cfg}")
    mesh = mesh or single_device_mesh()
    abstract_model = nnx.eval_shape(lambda: build_model(cfg))
    graphdef, abstract_state = nnx.split(abstract_model)
    shardings = param_shardings(abstract_model, mesh)
    target = jax.tree.map(
        lambda v, s: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=s),
        nnx.to_pure_dict(nnx.state(abstract_model, nnx.Param)),
        nnx.to_pure_dict(shardings),
    )
    with ocp.StandardCheckpointer() as ckptr:
        params = ckptr.restore(directory / "params", target)
    nnx.replace_by_pure_dict(abstract_state, params)
    return nnx.merge(graphdef, abstract_state)


# ------------------------------------------------------------------ verify
def describe_package(pkg: ModelPackage) -> str:
    """A few lines saying what a model package carries."""
    cfg = pkg.config
    lines = [f"{pkg.path}: {pkg.kind} model, {cfg.in_channels} -> {cfg.out_channels} channels, img_size "
             f"{tuple(cfg.img_size)}, patch {tuple(cfg.patch_size)}, embed {cfg.embed_dim}, depth {cfg.depth}"]
    lines.append(f"  channels      {', '.join(pkg.channels) or '(unknown)'}")
    if pkg.has_stats:
        lines.append("  normalisation " + ", ".join(f"{c} {m:.6g}+-{s:.4g}" for c, m, s in
                                                  zip(pkg.channels, pkg.mean, pkg.std)))
    else:
        lines.append("  normalisation NONE (a pre-package model: forecasts need a store's statistics)")
    if pkg.lat is not None:
        lines.append(f"  grid          {pkg.lat.size} x {pkg.lon.size}: lat {pkg.lat[0]:g} .. {pkg.lat[-1]:g}, "
                     f"lon {pkg.lon[0]:g} .. {pkg.lon[-1]:g}; time step {pkg.time_step_hours:g} h")
    clim = pkg.meta.get("climatology")
    lines.append(f"  climatology   {', '.join(clim['variables'])} ({clim.get('source', '')})" if clim else
                 "  climatology   none")
    if pkg.precip:
        lines.append("  precipitation " + ", ".join(f"{k} {v:.6g}" for k, v in pkg.precip.items()))
    for k, v in sorted(pkg.provenance.items()):
        lines.append(f"  {k:<13} {json.dumps(v) if isinstance(v, (dict, list)) else v}")
    return "\n".join(lines)


#: :func:`verify_path`'s verdicts, and the exit status ``checkpoint verify`` gives each (fcn_jax.errors).
VERIFY_EXIT = {"intact": EXIT_OK, "damaged": EXIT_CHECK_FAILED, "nothing": EXIT_NOTHING_TO_VERIFY,
               "missing": EXIT_INPUT}


def verify_path(path: str | Path) -> tuple[str, list[str]]:
    """Verify a run directory (its checkpoint steps and exported models), a ``checkpoints/`` directory or a model.

    Returns ``(verdict, report lines)``; the verdict is ``"intact"``,
    ``"damaged"`` (something failed its integrity check), ``"nothing"`` (no
    checkpoint step or model there yet: not damage) or ``"missing"`` (no such
    path). Changes nothing.
    """
    from fcn_jax.checkpoints.train_state import TMP_SUFFIX, verify_step_dir

    path = Path(path).resolve()
    lines: list[str] = []
    ok = True
    if not path.exists():
        return "missing", [f"missing  {path}: no such file or directory"]

    def report(label: str, d: Path, problems: list[str]) -> None:
        nonlocal ok
        if problems:
            ok = False
            lines.append(f"DAMAGED  {label}  {d}")
            lines.extend(f"           {p}" for p in problems)
        else:
            lines.append(f"ok       {label}  {d}  ({integrity.total_size(d) / 2**20:.1f} MiB)")

    if (path / "model.json").is_file():
        report("model", path, integrity.verify(path))
        return ("intact" if ok else "damaged"), lines
    ckdir = path / "checkpoints" if (path / "checkpoints").is_dir() else path
    steps = sorted((int(p.name), p) for p in ckdir.iterdir() if p.is_dir() and p.name.isdigit()) \
        if ckdir.is_dir() else []
    for step, d in steps:
        report(f"step {step}", d, verify_step_dir(d))
    for p in sorted(ckdir.glob(f"*{TMP_SUFFIX}*")) if ckdir.is_dir() else []:
        lines.append(f"partial  {p.name}: an interrupted save, never used (removed at the next start)")
    models = [path / n for n in ("model_best", "model_final") if (path / n).is_dir()]
    for m in models:
        report(m.name, m, integrity.verify(m))
    damaged = path / "checkpoints_damaged"
    if damaged.is_dir():
        moved = sorted(p.name for p in damaged.iterdir() if p.is_dir())
        lines.append(f"note     {len(moved)} damaged step(s) set aside earlier in {damaged}: {moved}")
    if not steps and not models:
        lines.append(f"nothing   {path}: no checkpoint steps, model_best/ or model_final/ yet (not damage)")
        return "nothing", lines
    return ("intact" if ok else "damaged"), lines


def verify_summary(verdicts: list[str]) -> tuple[int, str]:
    """``(exit status, summary line)`` of several :func:`verify_path` verdicts: damage outranks a missing
    path, which outranks nothing to verify."""
    for worst, line in (("damaged", "DAMAGED checkpoints found (see above)"),
                        ("missing", "a path does not exist (see above)"),
                        ("nothing", "nothing to verify (no checkpoint or model yet; not damage)")):
        if worst in verdicts:
            return VERIFY_EXIT[worst], line
    return VERIFY_EXIT["intact"], "all intact"


def seal_path(path: str | Path) -> list[str]:
    """Write integrity manifests where a trusted run directory / model lacks them (made before fcn_jax wrote them).

    Only directories *without* a manifest are sealed; one that has a manifest
    is never rewritten (that would bless damage). Returns what was sealed.
    """
    from fcn_jax.checkpoints.train_state import ORBAX_COMMIT_FILES

    path = Path(path).resolve()
    if (path / "model.json").is_file():
        targets = [(path, ())]
    else:
        ckdir = path / "checkpoints" if (path / "checkpoints").is_dir() else path
        targets = [(p, ORBAX_COMMIT_FILES) for p in sorted(ckdir.iterdir()) if p.is_dir() and p.name.isdigit()]
        targets += [(path / n, ()) for n in ("model_best", "model_final") if (path / n / "model.json").is_file()]
    sealed = []
    for d, unchecked in targets:
        if not (d / integrity.MANIFEST).exists():
            integrity.write_manifest(d, unchecked=unchecked)
            sealed.append(str(d))
    return sealed


def resolve_model_dir(path: str | Path) -> Path:
    """A model checkpoint dir, or a run dir (its ``model_best``, else ``model_final``)."""
    p = Path(path)
    if (p / "model.json").is_file():
        return p
    for name in ("model_best", "model_final"):
        if (p / name / "model.json").is_file():
            return p / name
    raise FileNotFoundError(
        f"{path}: neither a model checkpoint (model.json) nor a run directory with model_best/ or model_final/"
    )
