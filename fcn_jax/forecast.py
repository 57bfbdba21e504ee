"""``python -m fcn_jax.forecast``: deterministic and ensemble forecasts from a model package.

    python -m fcn_jax.forecast MODEL_DIR --ic-file SOURCE [SOURCE ...] --init TIMES --steps N \\
        [--members M --perturbation-std S --seed K] [--precip PRECIP_MODEL_DIR] \\
        [--regrid] [--member K] [--mesh D,C,H,W] --out PATH.nc|PATH.zarr
    python -m fcn_jax.forecast MODEL_DIR --store STORE --init TIMES --steps N --out PATH

``MODEL_DIR``: a model package (``model_best``/``model_final``, a run directory
holding them, or ``python -m fcn_jax.convert``'s output): it carries the
channels, normalisation statistics, grid and time step
(:mod:`fcn_jax.checkpoints.package`), so no training store is needed. ``SOURCE``: the
analysis to start from -- the original's HDF5 year files, CDS netCDF (new,
legacy, cfgrib-style), GRIB (ERA5, IFS, GFS), WeatherBench 2 / ARCO zarr (path
or URL), a NetCDF/zarr in fcn_jax's layout, or a store
(:mod:`fcn_jax.data.analysis`). Its grid is fitted as the original does: a
721-row 0.25 deg source feeds a 720-row model its first 720 rows; any other
mismatch is an error naming both grids unless ``--regrid`` (bilinear, stated in
the output's ``grid`` attribute). ``TIMES``: a comma list of ISO times
(``2003-01-01T00,2003-01-04T00``) or a range ``START/END/STRIDE``
(``2003-01-01T00/2003-03-01T00/72h``, both ends included when on the stride).

The file (:mod:`fcn_jax.inference.files`): one variable per channel in physical
units, dims ``(init_time, lead_time, [member], lat, lon)``, lead 0 = the IC,
``valid_time`` coordinate, CF attributes, and attributes saying which model,
source, grid fitting and statistics made it. With ``--precip`` a ``tp``
variable in metres: PrecipNet on the backbone's output at every lead (the
original's precipitation inference); lead 0 holds the source's ``tp`` when it
has one.

Rollouts are jitted ``lax.scan`` s (:mod:`fcn_jax.inference.rollout`), compiled once per
chunk shape. Ensemble members are folded into the batch and sharded over the
mesh's ``data`` axis, ``--member-chunk`` at a time, and each chunk is written to
the file as soon as it is computed: memory stays bounded by one chunk whatever
the ensemble size. Across hosts, start one process per host with the flags of
``python -m fcn_jax.train`` (``--coordinator HOST:PORT --num-processes N
--process-id I``, or under SLURM none): the mesh spans every process's
devices, each chunk is gathered, and process 0 alone writes. Everything is
checked before the first step (model vs source channels and grid, init times in
the source); on any error no output file is left behind.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Callable, Sequence

import jax
import numpy as np

from fcn_jax import cli
from fcn_jax.inference.files import ForecastError, ForecastWriter
from fcn_jax.inference.forecaster import Forecaster, PrecipDiagnosis, round_up

__all__ = [
    "ForecastError",
    "resolve_model_dir",
    "model_channels",
    "read_model_package",
    "run_forecast",
    "main",
]


# --------------------------------------------------------------------------- #
# Inputs
# --------------------------------------------------------------------------- #


def resolve_model_dir(path) -> Path:
    """:func:`fcn_jax.checkpoints.package.resolve_model_dir`, its error as a :class:`ForecastError` (exit status 2)."""
    from fcn_jax.checkpoints.package import resolve_model_dir as resolve

    try:
        return resolve(path)
    except FileNotFoundError as e:
        raise ForecastError(str(e)) from None


def read_model_package(path, what: str = "MODEL_DIR"):
    """:func:`fcn_jax.checkpoints.package.read_package`, verified; its errors as :class:`ForecastError`."""
    from fcn_jax.checkpoints.integrity import IntegrityError
    from fcn_jax.checkpoints.package import read_package

    try:
        return read_package(resolve_model_dir(path))
    except (IntegrityError, ValueError) as e:
        raise ForecastError(f"{what} {path}: {e}") from None


def model_channels(model, override: Sequence[str] | None = None) -> list[str]:
    """The input channels of a model (a directory or its read package), in order: ``override``, else the package's."""
    if override:
        return list(override)
    from fcn_jax.checkpoints.package import ModelPackage

    pkg = model if isinstance(model, ModelPackage) else read_model_package(model)
    if pkg.channels:
        return list(pkg.channels)
    raise ForecastError(f"{pkg.path}: cannot tell the model's channels (no channels in model.json, no run "
                        f"config.yaml, no experiment); pass --channels")


# --------------------------------------------------------------------------- #
# The forecast
# --------------------------------------------------------------------------- #


def _warn_if_store_stats_differ(pkg, store) -> None:
    """A note when the store given next to a packaged model has other statistics (the model's are used)."""
    from fcn_jax.data.store import StoreInfo

    info = StoreInfo.read(store)
    if not all(c in info.channels for c in pkg.channels):
        return
    mean, _ = info.stats(list(pkg.channels))
    rel = float(np.max(np.abs(np.asarray(mean, np.float64) - pkg.mean) / pkg.std))
    if rel > 1e-4:
        print(f"note: normalising with the model's statistics (its training data); the store {store} has "
              f"others (means differ by up to {rel:.3g} std)", file=sys.stderr)


def _open_ics(pkg, source, chans, *, regrid: bool, member, model_dir):
    """The IC :class:`~fcn_jax.data.analysis.Analysis` fitted to the model grid (the package's, else img_size)."""
    from fcn_jax.data.analysis import open_analysis

    cfg = pkg.config
    h, w = map(int, cfg.img_size)
    what = f"the model {model_dir}"
    if pkg.lat is not None and pkg.lon is not None:
        return open_analysis(source, chans, lat=pkg.lat, lon=pkg.lon, regrid=regrid, member=member, model=what)
    # a pre-package model knows only its img_size: the source grid, or its first h rows (721 -> 720)
    an = open_analysis(source, chans, member=member, model=what)
    if (an.lat.size, an.lon.size) == (h, w):
        return an
    if an.lat.size == h + 1 and an.lon.size == w:
        return open_analysis(source, chans, lat=an.lat[:h], lon=an.lon, member=member, model=what)
    raise ForecastError(f"{an.where}: grid lat x lon = {(an.lat.size, an.lon.size)} but the model {model_dir} was "
                        f"built for img_size {(h, w)} (and its package records no grid to regrid to)")


def run_forecast(model_dir, *, init_times, steps: int, out, store=None, members: int = 0,
                 perturbation_std: float = 0.3, seed: int = 0, precip_dir=None, mesh_shape=None,
                 ic_file=None, batch_size: int | None = None, member_chunk: int | None = None,
                 channels: Sequence[str] | None = None, precip_bound_std: float = 10.0, regrid: bool = False,
                 member: int | None = None, lead_chunk: int | None = 8, progress: bool = False,
                 overwrite: bool = False, resume: bool = True, perturbation: str = "gaussian",
                 perturbation_scale_km: float = 500.0, breeding_cycles: int = 4) -> Path:
    """Run a forecast and write it to ``out`` (.nc / .zarr); see the module doc. Returns the path.

    ``ic_file``: the analysis to start from -- any source
    :func:`fcn_jax.data.analysis.open_analysis` reads (a path or a list of
    paths); without it the ICs come from ``store``. Normalisation, grid, time
    step and precipitation settings come from the model package; only a model
    written before packages carried statistics falls back to ``store``'s (with
    a warning). ``regrid``: interpolate an IC source on another grid
    (bilinear). ``member``: the member of an ensemble IC source.
    ``init_times``: datetime64 array or a ``--init`` string. ``members`` 0 is
    deterministic. ``mesh_shape``: ``(data, channel, height, width)`` (-1
    allowed; default all devices on ``data``). ``batch_size``: ICs per
    deterministic chunk; ``member_chunk``: members per ensemble chunk (both
    rounded up to a multiple of the ``data`` axis; default 8). ``lead_chunk``:
    model steps rolled out (and held) at a time by a deterministic forecast,
    each segment written as soon as it is computed (None/0: all at once).
    ``precip_bound_std``: the precipitation model's log-space output is
    bounded at ``log1p(tp_max / eps)`` with ``tp_max = mean + K std`` of ``tp``
    in its training data (K = this; 0 = unbounded; unbounded too when neither
    the package nor a store knows ``tp``'s statistics, as in the original): the
    inverse ``eps * expm1(y)`` is exponential, and a few over-confident outputs
    would otherwise dominate an RMSE in metres.

    ``perturbation``: ``gaussian`` (i.i.d. per grid point, the original's),
    ``spherical`` (isotropic random fields of correlation length
    ``perturbation_scale_km``) or ``bred`` (that noise grown by the model over
    ``breeding_cycles`` steps before each initial time, which the source must
    hold) -- :mod:`fcn_jax.inference.perturbations`; ``perturbation_std`` is the
    amplitude in normalised units for each.

    ``overwrite``: replace an existing ``out`` (else it is refused before
    anything runs). ``resume``: chunks go through a journal in a partial output
    keyed by :func:`resume_key`, so the same call after a kill continues where
    it stopped and writes the same file (``False``: a throw-away temporary).
    """
    from fcn_jax.checkpoints import package as model_ckpt
    from fcn_jax.data.errors import DataError
    from fcn_jax.normalize import Normalizer
    from fcn_jax.parallel.mesh import make_mesh

    t0 = time.perf_counter()
    if steps < 1:
        raise ForecastError(f"--steps must be >= 1, got {steps}")
    if members < 0:
        raise ForecastError(f"--members must be >= 0, got {members}")
    if perturbation_std < 0:
        raise ForecastError(f"--perturbation-std must be >= 0, got {perturbation_std}")
    from fcn_jax.inference.perturbations import KINDS

    if perturbation not in KINDS:
        raise ForecastError(f"--perturbation must be one of {', '.join(KINDS)}, got {perturbation!r}")
    if perturbation == "spherical" and not perturbation_scale_km > 0:
        raise ForecastError(f"--perturbation spherical needs --perturbation-scale-km > 0, got {perturbation_scale_km}")
    if perturbation == "bred" and breeding_cycles < 1:
        raise ForecastError(f"--breeding-cycles must be >= 1, got {breeding_cycles}")
    if lead_chunk is not None and lead_chunk < 0:
        raise ForecastError(f"--lead-chunk must be >= 0 (0 = all steps at once), got {lead_chunk}")
    if ic_file is None and store is None:
        raise ForecastError("no initial conditions: give --ic-file SOURCE (an analysis: HDF5, netCDF, GRIB, zarr, "
                            "a store) or --store STORE")
    pkg = read_model_package(model_dir)
    model_dir, cfg = pkg.path, pkg.config
    if cfg.kind != "backbone":
        raise ForecastError(f"{model_dir}: a {cfg.kind} model; MODEL_DIR must be a backbone (give a precipitation "
                            f"model with --precip)")
    chans = model_channels(pkg, channels)
    if len(chans) != cfg.in_channels or cfg.out_channels != cfg.in_channels:
        raise ForecastError(f"{model_dir}: the model maps {cfg.in_channels} -> {cfg.out_channels} channels but its "
                            f"channel list has {len(chans)}: {chans}")
    if pkg.has_stats and list(chans) == list(pkg.channels):
        norm = pkg.normalizer()
        stats_from = f"the model package {model_dir}"
        if store is not None:
            _warn_if_store_stats_differ(pkg, store)
    elif store is not None:
        from fcn_jax.data.store import store_stats

        norm = Normalizer(*store_stats(store, chans))
        stats_from = f"the store {store}"
        print(f"warning: the model {model_dir} carries no normalisation statistics for {chans}; normalising "
              f"with the store's ({store}). Forecasts are only right if these are the statistics it was trained "
              f"with (give convert --stats / --store to package them)", file=sys.stderr)
    else:
        raise ForecastError(f"{model_dir}: the model carries no normalisation statistics; re-export it with "
                            f"statistics (python -m fcn_jax.convert CKPT --stats DIR | --store STORE), or give "
                            f"--store STORE to normalise with that store's")
    source = ic_file if ic_file is not None else store
    analysis = _open_ics(pkg, source, chans, regrid=regrid, member=member, model_dir=model_dir)
    if (analysis.lat.size, analysis.lon.size) != tuple(cfg.img_size):
        raise ForecastError(f"{analysis.where}: grid lat x lon = {(analysis.lat.size, analysis.lon.size)} but the "
                            f"model {model_dir} was built for img_size {tuple(cfg.img_size)}")
    times = cli.parse_init_times(init_times) if isinstance(init_times, str) else \
        np.asarray(init_times, "datetime64[ns]").reshape(-1)
    idx = analysis.index(times, what=lambda t: "initial time")
    pcfg = ppkg = None
    if precip_dir is not None:
        ppkg = read_model_package(precip_dir, "--precip")
        precip_dir, pcfg = ppkg.path, ppkg.config
        if pcfg.kind != "precip" or pcfg.in_channels != cfg.out_channels:
            raise ForecastError(f"--precip {precip_dir}: a {pcfg.kind} model with {pcfg.in_channels} input "
                                f"channels; need a precipitation model taking the backbone's {cfg.out_channels}")
        if ppkg.channels and ppkg.has_stats and list(ppkg.channels) != list(chans):
            raise ForecastError(f"--precip {precip_dir}: takes channels {list(ppkg.channels)}, the backbone gives "
                                f"{list(chans)}")
    mesh = make_mesh(tuple(mesh_shape) if mesh_shape else (-1, 1, 1, 1))
    step_hours = pkg.time_step_hours
    if "time_step_hours" not in pkg.meta and analysis.store is not None:
        from fcn_jax.data.store import StoreInfo

        step_hours = StoreInfo.read(analysis.store).time_step_hours
    lat, lon = analysis.lat, analysis.lon
    out_channels = chans + (["tp"] if pcfg is not None else [])

    # load -> wrap: the backbone with its statistics, PrecipNet as a diagnosis on every state
    # (both packages verified by read_model_package above: not read twice more)
    precip, eps, bound_note = None, None, None
    if pcfg is not None:
        eps, y_max, bound_note = _precip_settings(ppkg, store, precip_bound_std)
        precip = PrecipDiagnosis(model_ckpt.load_model(precip_dir, mesh, verify=False), eps, y_max)
    forecaster = Forecaster(model_ckpt.load_model(model_dir, mesh, verify=False), norm, mesh, precip)
    tp_init = _tp_source(source, analysis, regrid, member) if pcfg is not None else None

    def tp_at_init(sel: np.ndarray) -> Callable[[], np.ndarray] | None:
        """Lead 0's ``tp`` [n, lat, lon]: the analysis's, NaN where it has none (not PrecipNet's)."""
        if precip is None:
            return None

        def read() -> np.ndarray:
            if tp_init is not None:
                try:
                    return tp_init.read(times[sel])[..., 0]
                except DataError:  # the source has tp, but not at these times
                    pass
            return np.full((len(sel), len(lat), len(lon)), np.nan, np.float32)
        return read

    attrs = {"model": str(model_dir), "ic_source": str(analysis.where), "store": str(store) if store else None,
             "grid": analysis.grid_note, "normalization": stats_from,
             "precip_model": str(precip_dir) if pcfg else None, "precip_eps": eps, "precip_bound": bound_note,
             "perturbation_std": perturbation_std if members else None, "seed": seed if members else None,
             "perturbation": (perturbation + (f", {perturbation_scale_km:g} km" if perturbation != "gaussian" else "")
                              + (f", {breeding_cycles} breeding cycles" if perturbation == "bred" else ""))
             if members else None,
             "mesh": ",".join(f"{a}={n}" for a, n in mesh.shape.items()), "processes": jax.process_count(),
             "history": f"fcn_jax.forecast {time.strftime('%Y-%m-%dT%H:%M:%SZ', time.gmtime())}"}
    from tqdm.auto import tqdm

    basis = None
    if members and perturbation in ("spherical", "bred") and perturbation_scale_km > 0:
        from fcn_jax.inference.perturbations import spherical_basis

        basis = spherical_basis(lat, lon, perturbation_scale_km)
    # chunk -> write, resumably: a chunk (an IC batch, or one IC's member chunk) is committed to the partial
    # output's journal once all its leads are written; the same command again skips committed chunks.
    # Multi-host: every process computes (and gathers) each chunk, process 0 alone writes.
    bs = round_up(batch_size or min(len(times), 8), forecaster.data_size)
    m_chunk = round_up(min(member_chunk or 8, members), forecaster.data_size) if members else 0
    chunks = [(i0, 0) for i0 in range(0, len(times), bs)] if not members else \
        [(i, m0) for i in range(len(times)) for m0 in range(0, members, m_chunk)]
    key, info = resume_key(pkg=pkg, ppkg=ppkg, analysis=analysis, times=times, steps=steps, members=members,
                           perturbation_std=perturbation_std, seed=seed, batch=bs, member_chunk=m_chunk,
                           lead_chunk=lead_chunk, mesh=mesh, channels=out_channels, regrid=regrid, member=member,
                           precip_bound_std=precip_bound_std, out=out,
                           perturbation=(perturbation, perturbation_scale_km, breeding_cycles) if members else None
                           ) if resume else (None, None)
    writer_cm = ForecastWriter(out, init_times=times, n_lead=steps + 1, step_hours=step_hours, lat=lat, lon=lon,
                               channels=out_channels, members=members or None, attrs=attrs,
                               var_attrs={"tp": {"units": "m"}}, overwrite=overwrite, resume_key=key,
                               resume_info=info) if jax.process_index() == 0 else _NoWriter()
    with jax.set_mesh(mesh), writer_cm as writer:
        if progress:
            for note in writer.notes:
                print(note, file=sys.stderr, flush=True)
        done = _done_everywhere([writer.is_done(i, m) for i, m in chunks])  # process 0's journal, on all
        bar = tqdm(total=len(chunks), initial=sum(done), desc="ensemble" if members else "forecast",
                   unit="chunk", disable=not progress)
        if not members:
            for (i0, _), skip in zip(chunks, done):
                if skip:
                    continue
                sel = np.arange(i0, min(i0 + bs, len(times)))
                for lead0, fields in forecaster.deterministic(analysis.read_index(idx[sel]), steps,
                                                              lead_chunk=lead_chunk, tp0=tp_at_init(sel)):
                    writer.write(fields, i0, lead_start=lead0)
                writer.commit(i0)
                bar.update()
        else:
            rng = jax.random.key(seed)
            skipped = {c for c, skip in zip(chunks, done) if skip}
            for i in range(len(times)):
                if all((i, m0) in skipped for m0 in range(0, members, m_chunk)):
                    continue
                sel = np.asarray([i])
                # the IC index is folded into the key: each IC's noise is its own
                last = None
                history = None
                if perturbation == "bred":  # the analyses every step before this IC, oldest first
                    earlier = times[i] - np.arange(breeding_cycles, 0, -1) * np.timedelta64(
                        int(round(step_hours * 3600)), "s")
                    history = analysis.read_index(analysis.index(earlier, what=lambda t: "breeding analysis"))
                for m0, lead0, fields in forecaster.ensemble(
                        analysis.read_index(idx[sel]), steps, members=members, member_chunk=m_chunk,
                        perturbation_std=perturbation_std, key=jax.random.fold_in(rng, i), lead_chunk=lead_chunk,
                        tp0=tp_at_init(sel), skip=lambda m0, i=i: (i, m0) in skipped, perturbation=perturbation,
                        basis=basis, history=history, lat=lat):
                    if last is not None and m0 != last:
                        writer.commit(i, last)
                        bar.update()
                    writer.write(fields, i, member_start=m0, lead_start=lead0)
                    last = m0
                if last is not None:
                    writer.commit(i, last)
                    bar.update()
        bar.close()
    if progress:
        kind = f"{members}-member ensemble" if members else "deterministic"
        print(f"wrote {out}: {kind}, {len(times)} ICs x {steps + 1} leads, {len(out_channels)} channels "
              f"({time.perf_counter() - t0:.1f} s)")
    return Path(out)


def resume_key(*, pkg, ppkg, analysis, times, steps, members, perturbation_std, seed, batch, member_chunk,
               lead_chunk, mesh, channels, regrid, member, precip_bound_std, out,
               perturbation=None) -> tuple[str, dict]:
    """``(key, description)`` of everything that decides a forecast file's values.

    The key names the partial output (:class:`~fcn_jax.inference.files.ForecastWriter`): the same command
    on the same inputs finds its own partial output; anything else -- another model (its integrity
    manifest), source (paths, sizes, modification times), times, sizes, chunking or mesh -- does not,
    and the description says how it differs.
    """
    import hashlib

    from fcn_jax.checkpoints.integrity import MANIFEST

    def package_id(p):
        if p is None:
            return None
        manifest = Path(p.path) / MANIFEST
        data = manifest.read_bytes() if manifest.is_file() else json.dumps(p.meta, sort_keys=True).encode()
        return hashlib.sha256(data).hexdigest()[:16]

    def source_id(where):
        files = []
        for part in str(where).split(", "):
            q = Path(part)
            if q.exists():
                stat = q.stat()
                files.append([str(q.resolve()), stat.st_size, int(stat.st_mtime)])
        return files or str(where)

    info = {"model": package_id(pkg), "precip_model": package_id(ppkg), "source": source_id(analysis.where),
            "grid": analysis.grid_note, "init_times": [str(t) for t in (times[0], times[-1])],
            "n_init": len(times), "steps": int(steps), "members": int(members),
            "perturbation_std": float(perturbation_std) if members else None, "seed": int(seed) if members else None,
            "perturbation": list(perturbation) if perturbation else None,
            "ic_batch": int(batch), "member_chunk": int(member_chunk), "lead_chunk": int(lead_chunk or 0),
            "mesh": dict(mesh.shape), "processes": jax.process_count(), "channels": list(channels),
            "regrid": bool(regrid), "member": member, "precip_bound_std": float(precip_bound_std),
            "format": Path(out).suffix, "jax": jax.__version__}
    digest = hashlib.sha256(json.dumps({**info, "all_init_times": [str(t) for t in times]},
                                       sort_keys=True).encode()).hexdigest()
    return digest, info


def _done_everywhere(done: list[bool]) -> list[bool]:
    """Process 0's committed-chunk flags on every process (they must skip the same chunks)."""
    if jax.process_count() == 1:
        return list(done)
    from jax.experimental import multihost_utils

    return [bool(v) for v in multihost_utils.broadcast_one_to_all(np.asarray(done, np.int32))]


def _precip_settings(ppkg, store, bound_std: float):
    """``(eps, y_max, note)`` of a precipitation model: its package's eps and tp statistics, else a store's."""
    info = ppkg.precip or {}
    eps = float(info["eps"])  # read_package fills a pre-package model's from its run (default 1e-5)
    if bound_std <= 0:
        return eps, None, "unbounded (--precip-bound-std 0)"
    if "tp_mean" in info and "tp_std" in info:
        m, s, src = info["tp_mean"], info["tp_std"], "the precipitation model's training data"
    elif store is not None:
        from fcn_jax.data.store import StoreInfo

        st = StoreInfo.read(store)
        if "tp" not in st.channels:
            raise ForecastError(f"store {store}: no 'tp' channel to bound the precipitation model's output with; "
                                f"pass precip_bound_std=0 (--precip-bound-std 0)")
        m, s = (float(v[0]) for v in st.stats(["tp"]))
        src = f"the store {store}"
    else:
        return eps, None, "unbounded (no tp statistics in the package; as the original)"
    tp_max = m + bound_std * s
    return eps, float(np.log1p(tp_max / eps)), f"tp <= {tp_max:.6g} m (mean + {bound_std:g} std of tp in {src})"


def _tp_source(source, analysis, regrid, member):
    """An analysis of ``tp`` on the same source and grid for lead 0, or None when the source has none."""
    from fcn_jax.data.analysis import open_analysis
    from fcn_jax.data.errors import DataError

    try:
        return open_analysis(source, ["tp"], lat=analysis.lat, lon=analysis.lon, regrid=regrid, member=member)
    except (DataError, KeyError, ValueError):
        return None


class _NoWriter:
    """The writer of the processes other than 0 in a multi-host run."""

    notes: list[str] = []

    def write(self, *args, **kwargs) -> None:
        pass

    def commit(self, *args, **kwargs) -> None:
        pass

    def is_done(self, *args, **kwargs) -> bool:
        return False

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


# --------------------------------------------------------------------------- #
# CLI
# --------------------------------------------------------------------------- #


def main(argv=None) -> int:
    ap = cli.parser("forecast", __doc__, raw=True)
    ap.add_argument("model_dir", help="exported model (model_best / model_final / converted) or its run dir")
    ap.add_argument("--ic-file", nargs="+", default=None, metavar="SOURCE",
                    help="the analysis to start from: original HDF5 year file(s), CDS netCDF, GRIB, WeatherBench 2 "
                         "zarr (path or URL), a NetCDF/zarr in fcn_jax's layout, a store, or 'world'; several files "
                         "or a directory for variables split across files")
    cli.add_store(ap, help="prepared store (or 'world') giving the ICs when there is no --ic-file; also the "
                           "statistics of a model written before packages carried them")
    cli.add_experiment(ap, positional=False,
                       help="the experiment whose world 'world' means (its data.world_seed; default: the model "
                            "package's experiment, else the world experiment's)")
    ap.add_argument("--init", required=True, help="ISO times 'T1,T2' or a range 'START/END/STRIDE' (e.g. 72h)")
    ap.add_argument("--steps", type=int, required=True, help="model steps (lead = steps x 6 h)")
    ap.add_argument("--out", required=True,
                    help="output .nc or .zarr; written through a partial output beside it, so the same command "
                         "after an interruption continues where it stopped")
    ap.add_argument("--overwrite", action="store_true",
                    help="replace an existing --out (only once the new file is complete); without it an existing "
                         "file is refused")
    ap.add_argument("--members", type=int, default=0, help="ensemble size (0 = deterministic)")
    ap.add_argument("--perturbation-std", type=float, default=0.3, help="IC noise std, normalised units")
    ap.add_argument("--perturbation", choices=["gaussian", "spherical", "bred"], default="gaussian",
                    help="gaussian: i.i.d. per grid point (the original's); spherical: isotropic random fields of "
                         "--perturbation-scale-km; bred: that noise grown by the model over --breeding-cycles steps "
                         "before each initial time (the source must hold those analyses)")
    ap.add_argument("--perturbation-scale-km", type=float, default=500.0,
                    help="correlation length of spherical and bred noise, km (default 500; bred with 0: white)")
    ap.add_argument("--breeding-cycles", type=int, default=4, help="steps of breeding before each IC (default 4)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--member-chunk", type=int, default=None, help="members per compiled call (default 8)")
    ap.add_argument("--batch-size", type=int, default=None, help="ICs per deterministic call (default 8)")
    ap.add_argument("--lead-chunk", type=int, default=8,
                    help="steps rolled out and held at a time (per IC batch or member chunk), each segment written "
                         "when computed: bounds memory for long forecasts (0 = all steps at once; default 8)")
    ap.add_argument("--precip", default=None, help="precipitation model dir: adds tp (metres)")
    ap.add_argument("--precip-bound-std", type=float, default=10.0,
                    help="bound tp at the store's mean + K std of tp (default 10; 0 = unbounded)")
    cli.add_mesh(ap, help="D,C,H,W mesh; one size may be -1 = the rest (default: all devices on data)")
    ap.add_argument("--regrid", action="store_true",
                    help="interpolate an IC source on another grid to the model's (bilinear); default: only the "
                         "model's grid or its first rows (721 -> 720) are accepted")
    ap.add_argument("--member", type=int, default=None, help="the member to start from in an ensemble IC file")
    ap.add_argument("--channels", default=None, help="comma list overriding the model's channel list")
    cli.add_runtime(ap)
    args = cli.parse(ap, argv)

    def body() -> None:
        # platform, CPU tuning, jax.distributed; every process then runs the same forecast on its share
        # of the mesh and process 0 writes the file
        cli.start(args)
        ic = args.ic_file
        if ic is not None:
            ic = ic[0] if len(ic) == 1 else ic
        store = args.store
        if "world" in (store, ic):
            world = cli.resolve_store("world", _world_experiment(args))
            store = world if store == "world" else store
            ic = str(world) if ic == "world" else ic
        run_forecast(args.model_dir, store=store, init_times=args.init, steps=args.steps, out=args.out,
                     members=args.members, perturbation_std=args.perturbation_std, seed=args.seed,
                     precip_dir=args.precip, mesh_shape=args.mesh, ic_file=ic, regrid=args.regrid, member=args.member,
                     batch_size=args.batch_size, member_chunk=args.member_chunk, lead_chunk=args.lead_chunk,
                     channels=args.channels.split(",") if args.channels else None,
                     precip_bound_std=args.precip_bound_std, progress=cli.is_primary(),
                     overwrite=args.overwrite, perturbation=args.perturbation,
                     perturbation_scale_km=args.perturbation_scale_km, breeding_cycles=args.breeding_cycles)

    return cli.run(body)


def _world_experiment(args):
    """The experiment whose world ``world`` names: ``--experiment``, else the model package's, else none."""
    cfg = cli.load_experiment(args, required=False)
    if cfg is not None:
        return cfg
    from fcn_jax.config import ConfigError, load_experiment

    name = (read_model_package(args.model_dir).meta.get("provenance") or {}).get("experiment")
    try:
        return load_experiment(name) if name else None
    except ConfigError:  # a package from elsewhere names an experiment this checkout does not have
        return None


if __name__ == "__main__":
    sys.exit(main())
