"""``python -m fcn_jax.forecast``: deterministic and ensemble forecasts from a trained model.

    python -m fcn_jax.forecast MODEL_DIR --store STORE --init TIMES --steps N \\
        [--members M --perturbation-std S --seed K] [--precip PRECIP_MODEL_DIR] \\
        [--mesh D,C,H,W] --out PATH.nc|PATH.zarr

``MODEL_DIR``: an exported model (``model_best``/``model_final``, or a run
directory holding them, or a converted original checkpoint). ``TIMES``: a
comma list of ISO times (``2003-01-01T00,2003-01-04T00``) or a range
``START/END/STRIDE`` (``2003-01-01T00/2003-03-01T00/72h``, both ends included
when on the stride). Initial conditions come from the store, or from
``--ic-file`` (NetCDF/zarr with a ``time`` dim, one time per IC, and one
variable per channel on the store's grid).

The file (:mod:`fcn_jax.forecast_io`): one variable per channel in physical
units, dims ``(init_time, lead_time, [member], lat, lon)``, lead 0 = the IC,
``valid_time`` coordinate, CF attributes. With ``--precip`` a ``tp`` variable
in metres: PrecipNet on the backbone's output at every lead (the original's
precipitation inference); lead 0 holds the store's ``tp`` when it has one.

Rollouts are jitted ``lax.scan`` s (:mod:`fcn_jax.rollout`), compiled once per
chunk shape. Ensemble members are folded into the batch and sharded over the
mesh's ``data`` axis, ``--member-chunk`` at a time, and each chunk is written to
the file as soon as it is computed: memory stays bounded by one chunk whatever
the ensemble size. Across hosts, start one process per host with the flags of
``python -m fcn_jax.train`` (``--coordinator HOST:PORT --num-processes N
--process-id I``, or under SLURM none): the mesh spans every process's
devices, each chunk is gathered, and process 0 alone writes. Everything is
checked before the first step (model vs store channels and grid, init times in
the store); on any error no output file is left behind.
"""

from __future__ import annotations

import argparse
import json
import math
import re
import sys
import time
from pathlib import Path
from typing import Sequence

import jax
import numpy as np

from fcn_jax import distributed
from fcn_jax.config import parse_mesh_arg
from fcn_jax.forecast_io import ForecastError, ForecastWriter
from fcn_jax.rollout import ensemble_rollout, perturb, rollout  # noqa: F401  (the public rollout API)

__all__ = [
    "ForecastError",
    "rollout",
    "ensemble_rollout",
    "perturb",
    "parse_init_times",
    "resolve_model_dir",
    "model_channels",
    "run_forecast",
    "main",
]


# --------------------------------------------------------------------------- #
# Inputs
# --------------------------------------------------------------------------- #


_STRIDE = re.compile(r"^\s*(\d+)\s*([hd])\s*$")


def parse_init_times(spec: str) -> np.ndarray:
    """``datetime64[ns] [n]`` from ``"T1,T2,..."`` or ``"START/END/STRIDE"`` (stride ``6h``, ``3d``)."""
    spec = spec.strip()
    try:
        if "/" in spec:
            parts = spec.split("/")
            if len(parts) != 3:
                raise ValueError("a range is START/END/STRIDE")
            start, end = (np.datetime64(p.strip(), "ns") for p in parts[:2])
            m = _STRIDE.match(parts[2])
            if not m:
                raise ValueError(f"stride {parts[2]!r} must be a number of hours or days, e.g. 12h or 3d")
            stride = np.timedelta64(int(m.group(1)) * (24 if m.group(2) == "d" else 1), "h")
            if stride <= np.timedelta64(0, "h") or end < start:
                raise ValueError("the stride must be positive and END not before START")
            times = np.arange(start, end + np.timedelta64(1, "ns"), stride).astype("datetime64[ns]")
        else:
            times = np.asarray([np.datetime64(t.strip(), "ns") for t in spec.split(",") if t.strip()])
    except ValueError as e:
        raise ForecastError(f"--init {spec!r}: {e}; give ISO times 'T1,T2' or 'START/END/STRIDE'") from e
    if times.size == 0:
        raise ForecastError(f"--init {spec!r}: no initial time")
    return times


def resolve_model_dir(path) -> Path:
    """:func:`fcn_jax.checkpoint.resolve_model_dir`, its error as a :class:`ForecastError` (exit status 2)."""
    from fcn_jax.checkpoint import resolve_model_dir as resolve

    try:
        return resolve(path)
    except FileNotFoundError as e:
        raise ForecastError(str(e)) from None


def _run_config(model_dir: Path) -> dict:
    """The training run's resolved experiment (``../config.yaml``), or ``{}``."""
    import yaml

    for cand in (model_dir / "config.yaml", model_dir.parent / "config.yaml"):
        if cand.is_file():
            return yaml.safe_load(cand.read_text()) or {}
    return {}


def model_channels(model_dir, override: Sequence[str] | None = None) -> list[str]:
    """The input channels of a model, in order.

    From (first found): ``override``; ``model.json``'s ``channels``; the run's
    ``config.yaml`` (``data.channels``); the experiment named in
    ``model.json`` (converted checkpoints).
    """
    if override:
        return list(override)
    model_dir = Path(model_dir)
    meta = json.loads((model_dir / "model.json").read_text())
    if meta.get("channels"):
        return list(meta["channels"])
    chans = (_run_config(model_dir).get("data") or {}).get("channels")
    if chans:
        return list(chans)
    if meta.get("experiment"):
        from fcn_jax.config import ConfigError, load_experiment

        try:
            return list(load_experiment(meta["experiment"]).data.channels)
        except ConfigError as e:
            raise ForecastError(f"{model_dir}: cannot read the channels of its experiment {meta['experiment']!r} "
                                f"({e}); pass --channels") from e
    raise ForecastError(f"{model_dir}: cannot tell the model's channels (no channels in model.json, no run "
                        f"config.yaml, no experiment); pass --channels")


def precip_eps(model_dir) -> float:
    """``train.precip_eps`` of a precipitation model's run (default 1e-5, the original's)."""
    return float((_run_config(Path(model_dir)).get("train") or {}).get("precip_eps", 1e-5))


def _check_store_channels(ds, channels, store) -> list[int]:
    names = [str(c) for c in ds["channel"].values]
    missing = [c for c in channels if c not in names]
    if missing:
        raise ForecastError(f"{store}: channels {missing} of the model are not in the store; it has {names}")
    return [names.index(c) for c in channels]


def _check_grid(cfg, ds, what: str, model_dir) -> None:
    shape = (ds.sizes["lat"], ds.sizes["lon"])
    if tuple(shape) != tuple(cfg.img_size):
        raise ForecastError(f"{what}: grid lat x lon = {shape} but the model {model_dir} was built for "
                            f"img_size {tuple(cfg.img_size)}")


def _store_time_index(ds, times, store) -> np.ndarray:
    st = ds["time"].values.astype("datetime64[ns]")
    pos = np.searchsorted(st, times)
    bad = [str(np.datetime64(t, "s")) for t, p in zip(times, pos) if p >= st.size or st[p] != t]
    if bad:
        step = (st[1] - st[0]).astype("timedelta64[h]") if st.size > 1 else "?"
        raise ForecastError(f"initial time(s) {bad[:5]} not in the store {store}: it has {st.size} times from "
                            f"{np.datetime64(st[0], 's')} to {np.datetime64(st[-1], 's')} every {step}")
    return pos


def load_ic_file(path, channels, times_wanted=None, store_ds=None):
    """ICs from a NetCDF/zarr file: ``(times [n], fields [n, lat, lon, channel] physical)``.

    The file has a ``time`` dim and either one variable per channel
    ``(time, lat, lon)`` or a store-like ``fields (time, channel, lat, lon)``.
    Its grid must equal the store's (``store_ds``) when one is given.
    """
    import xarray as xr

    p = Path(path)
    if not p.exists():
        raise ForecastError(f"--ic-file {path}: not found")
    try:
        ds = xr.open_zarr(p) if p.is_dir() else xr.open_dataset(p)
    except Exception as e:
        raise ForecastError(f"--ic-file {path}: cannot open ({type(e).__name__}: {e})") from e
    for d in ("time", "lat", "lon"):
        if d not in ds.dims:
            raise ForecastError(f"--ic-file {path}: no '{d}' dimension (has {tuple(ds.dims)})")
    if store_ds is not None:
        for ax in ("lat", "lon"):
            a, b = np.asarray(ds[ax].values, np.float64), np.asarray(store_ds[ax].values, np.float64)
            if a.shape != b.shape or not np.allclose(a, b, atol=1e-4):
                raise ForecastError(f"--ic-file {path}: its {ax} ({a.size} points, {a[0]:g}..{a[-1]:g}) differs "
                                    f"from the store's ({b.size} points, {b[0]:g}..{b[-1]:g})")
    if times_wanted is not None:
        have = ds["time"].values.astype("datetime64[ns]")
        bad = [str(t) for t in times_wanted if t not in set(have)]
        if bad:
            raise ForecastError(f"--ic-file {path}: initial time(s) {bad[:5]} not in the file (has {have.size} "
                                f"times {have[0]} .. {have[-1]})")
        ds = ds.sel(time=times_wanted)
    if "fields" in ds and "channel" in ds["fields"].dims:
        names = [str(c) for c in ds["channel"].values]
        missing = [c for c in channels if c not in names]
        if missing:
            raise ForecastError(f"--ic-file {path}: channels {missing} missing; it has {names}")
        x = ds["fields"].sel(channel=list(channels)).transpose("time", "lat", "lon", "channel").values
    else:
        missing = [c for c in channels if c not in ds.data_vars]
        if missing:
            raise ForecastError(f"--ic-file {path}: channels {missing} missing; it has {sorted(ds.data_vars)}")
        x = np.stack([ds[c].transpose("time", "lat", "lon").values for c in channels], axis=-1)
    return ds["time"].values.astype("datetime64[ns]"), np.asarray(x, np.float32)


# --------------------------------------------------------------------------- #
# The forecast
# --------------------------------------------------------------------------- #


def _to_host(x) -> np.ndarray:
    if getattr(x, "is_fully_addressable", True):
        return np.asarray(jax.device_get(x))
    from jax.experimental import multihost_utils

    return np.asarray(multihost_utils.process_allgather(x, tiled=True))


def run_forecast(model_dir, *, store, init_times, steps: int, out, members: int = 0,
                 perturbation_std: float = 0.3, seed: int = 0, precip_dir=None, mesh_shape=None,
                 ic_file=None, batch_size: int | None = None, member_chunk: int | None = None,
                 channels: Sequence[str] | None = None, precip_bound_std: float = 10.0,
                 progress: bool = False) -> Path:
    """Run a forecast and write it to ``out`` (.nc / .zarr); see the module doc. Returns the path.

    ``init_times``: datetime64 array or a ``--init`` string. ``members`` 0 is
    deterministic. ``mesh_shape``: ``(data, channel, height, width)`` (-1
    allowed; default all devices on ``data``). ``batch_size``: ICs per
    deterministic chunk; ``member_chunk``: members per ensemble chunk (both
    rounded up to a multiple of the ``data`` axis; default 8).
    ``precip_bound_std``: the precipitation model's log-space output is
    bounded at ``log1p(tp_max / eps)`` with ``tp_max = mean + K std`` of the
    store's ``tp`` (K = this; 0 = unbounded): the inverse ``eps * expm1(y)`` is
    exponential, and a few over-confident outputs would otherwise dominate an
    RMSE in metres.
    """
    from flax import nnx
    from jax.sharding import NamedSharding

    from fcn_jax import checkpoint as model_ckpt
    from fcn_jax.data.store import open_store, store_stats
    from fcn_jax.normalize import Normalizer
    from fcn_jax.parallel.axes import IMAGE_SPEC
    from fcn_jax.parallel.mesh import make_mesh
    from fcn_jax.rollout import ensemble_chunk

    t0 = time.perf_counter()
    if steps < 1:
        raise ForecastError(f"--steps must be >= 1, got {steps}")
    if members < 0:
        raise ForecastError(f"--members must be >= 0, got {members}")
    if perturbation_std < 0:
        raise ForecastError(f"--perturbation-std must be >= 0, got {perturbation_std}")
    model_dir = resolve_model_dir(model_dir)
    cfg = model_ckpt.read_model_config(model_dir)
    if cfg.kind != "backbone":
        raise ForecastError(f"{model_dir}: a {cfg.kind} model; MODEL_DIR must be a backbone (give a precipitation "
                            f"model with --precip)")
    chans = model_channels(model_dir, channels)
    if len(chans) != cfg.in_channels or cfg.out_channels != cfg.in_channels:
        raise ForecastError(f"{model_dir}: the model maps {cfg.in_channels} -> {cfg.out_channels} channels but its "
                            f"channel list has {len(chans)}: {chans}")
    ds = open_store(store)
    _check_store_channels(ds, chans, store)
    _check_grid(cfg, ds, f"store {store}", model_dir)
    times = parse_init_times(init_times) if isinstance(init_times, str) else \
        np.asarray(init_times, "datetime64[ns]").reshape(-1)
    if ic_file is None:
        idx = _store_time_index(ds, times, store)
        ics = None
    else:
        times, ics = load_ic_file(ic_file, chans, times, ds)
    pcfg = None
    if precip_dir is not None:
        precip_dir = resolve_model_dir(precip_dir)
        pcfg = model_ckpt.read_model_config(precip_dir)
        if pcfg.kind != "precip" or pcfg.in_channels != cfg.out_channels:
            raise ForecastError(f"--precip {precip_dir}: a {pcfg.kind} model with {pcfg.in_channels} input "
                                f"channels; need a precipitation model taking the backbone's {cfg.out_channels}")
    norm = Normalizer(*store_stats(store, chans))
    mesh = make_mesh(tuple(mesh_shape) if mesh_shape else (-1, 1, 1, 1))
    n_data = int(mesh.shape["data"])
    step_hours = float(ds.attrs.get("time_step_hours", 6.0))
    lat, lon = ds["lat"].values, ds["lon"].values
    has_tp = "tp" in [str(c) for c in ds["channel"].values]
    out_channels = chans + (["tp"] if pcfg is not None else [])
    model = model_ckpt.load_model(model_dir, mesh)
    pnet = model_ckpt.load_model(precip_dir, mesh) if pcfg is not None else None
    eps = precip_eps(precip_dir) if pcfg is not None else None
    y_max = None
    if pcfg is not None and precip_bound_std > 0:
        if not has_tp:
            raise ForecastError(f"store {store}: no 'tp' channel to bound the precipitation model's output with; "
                                f"pass precip_bound_std=0 (--precip-bound-std 0)")
        tp_mean, tp_std = store_stats(store, ["tp"])
        y_max = float(np.log1p((tp_mean[0] + precip_bound_std * tp_std[0]) / eps))
    sharding = NamedSharding(mesh, IMAGE_SPEC)

    def read_ics(sel: np.ndarray) -> np.ndarray:  # [n, lat, lon, ch] physical
        if ics is not None:
            return ics[sel]
        ci = [list(map(str, ds["channel"].values)).index(c) for c in chans]
        x = ds["fields"].isel(time=idx[sel], channel=ci).transpose("time", "lat", "lon", "channel").values
        return np.asarray(x, np.float32)

    def tp_at_init(sel: np.ndarray) -> np.ndarray:  # [n, lat, lon]
        if ics is None and has_tp:
            return np.asarray(ds["fields"].sel(channel="tp").isel(time=idx[sel]).values, np.float32)
        return np.full((len(sel), len(lat), len(lon)), np.nan, np.float32)

    def with_precip(traj_n, sel, n_members=0):
        """Physical ``[n, lead, (m), lat, lon, ch(+tp)]`` from a normalised trajectory."""
        phys = norm.denormalize(_to_host(traj_n))
        if pnet is None:
            return phys
        tp = _precip(pnet, traj_n, eps, y_max, sharding)  # [n, lead, (m), lat, lon]
        tp[:, 0] = tp_at_init(sel)[:, None] if n_members else tp_at_init(sel)
        return np.concatenate([phys, tp[..., None]], axis=-1)

    attrs = {"model": str(model_dir), "store": str(store), "precip_model": str(precip_dir) if pcfg else None,
             "perturbation_std": perturbation_std if members else None, "seed": seed if members else None,
             "mesh": ",".join(f"{a}={n}" for a, n in mesh.shape.items()), "processes": jax.process_count(),
             "history": f"fcn_jax.forecast {time.strftime('%Y-%m-%dT%H:%M:%SZ', time.gmtime())}"}
    tqdm = _tqdm(progress)
    # multi-host: every process computes (and gathers) each chunk, process 0 alone writes the file
    writer_cm = ForecastWriter(out, init_times=times, n_lead=steps + 1, step_hours=step_hours, lat=lat, lon=lon,
                               channels=out_channels, members=members or None, attrs=attrs,
                               var_attrs={"tp": {"units": "m"}}) if jax.process_index() == 0 else _NoWriter()
    with jax.set_mesh(mesh), writer_cm as writer:
        if not members:
            bs = _round_up(batch_size or min(len(times), 8), n_data)
            for i0 in tqdm(range(0, len(times), bs), desc="forecast"):
                sel = np.arange(i0, min(i0 + bs, len(times)))
                x = norm.normalize(read_ics(sel))
                x = np.concatenate([x, np.repeat(x[-1:], bs - len(sel), axis=0)])  # pad to one compiled shape
                traj = rollout(model, jax.device_put(x, sharding), steps)[: len(sel)]
                writer.write(with_precip(traj, sel), i0)
        else:
            chunk = _round_up(min(member_chunk or 8, members), n_data)
            split = nnx.split(model)
            key = jax.random.key(seed)
            for i in tqdm(range(len(times)), desc="ensemble"):
                sel = np.asarray([i])
                x = norm.normalize(read_ics(sel))
                # the IC index is folded into the key: each IC's noise is its own
                k_ic = jax.random.fold_in(key, i)
                for m0 in range(0, members, chunk):
                    ids = np.arange(m0, m0 + chunk)  # the last chunk computes spare members, dropped below
                    ens = ensemble_chunk(split, x, perturbation_std, k_ic, ids, steps)
                    keep = min(chunk, members - m0)
                    writer.write(with_precip(ens[:, :, :keep], sel, keep), i, member_start=m0)
    if progress:
        kind = f"{members}-member ensemble" if members else "deterministic"
        print(f"wrote {out}: {kind}, {len(times)} ICs x {steps + 1} leads, {len(out_channels)} channels "
              f"({time.perf_counter() - t0:.1f} s)")
    return Path(out)


def _precip(pnet, traj_n, eps: float, y_max, sharding) -> np.ndarray:
    """``tp`` in metres ``traj.shape[:-1]``: PrecipNet on every normalised state, un-logged (bounded at ``y_max``)."""
    from flax import nnx

    from fcn_jax.normalize import precip_to_metres

    shape = traj_n.shape
    flat = np.asarray(_to_host(traj_n)).reshape((-1,) + shape[-3:])  # [N, lat, lon, ch]
    n, n_data = flat.shape[0], int(sharding.mesh.shape["data"])
    pad = _round_up(n, n_data) - n  # the batch must divide over 'data'
    flat = np.concatenate([flat, np.repeat(flat[-1:], pad, axis=0)]) if pad else flat
    gd, st = nnx.split(pnet)
    y = _precip_apply(gd, st, jax.device_put(flat, sharding))  # [N, lat, lon, 1] log1p(tp / eps)
    y = _to_host(y)[:n, ..., 0]
    return np.asarray(precip_to_metres(y, eps, y_max), np.float32).reshape(shape[:-1])


def _precip_apply_impl(graphdef, state, x):
    from flax import nnx

    return nnx.merge(graphdef, state)(x)


_precip_apply = jax.jit(_precip_apply_impl, static_argnums=0)


class _NoWriter:
    """The writer of the processes other than 0 in a multi-host run."""

    def write(self, *args, **kwargs) -> None:
        pass

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def _round_up(n: int, k: int) -> int:
    return int(math.ceil(max(int(n), 1) / k) * k)


def _tqdm(enabled: bool):
    if not enabled:
        return lambda it, **kw: it
    from tqdm.auto import tqdm

    return tqdm


# --------------------------------------------------------------------------- #
# CLI
# --------------------------------------------------------------------------- #


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m fcn_jax.forecast", description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model_dir", help="exported model (model_best / model_final / converted) or its run dir")
    ap.add_argument("--store", required=True, help="prepared store (ICs, statistics, grid), or 'world'")
    ap.add_argument("--init", required=True, help="ISO times 'T1,T2' or a range 'START/END/STRIDE' (e.g. 72h)")
    ap.add_argument("--steps", type=int, required=True, help="model steps (lead = steps x 6 h)")
    ap.add_argument("--out", required=True, help="output .nc or .zarr")
    ap.add_argument("--members", type=int, default=0, help="ensemble size (0 = deterministic)")
    ap.add_argument("--perturbation-std", type=float, default=0.3, help="IC noise std, normalised units")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--member-chunk", type=int, default=None, help="members per compiled call (default 8)")
    ap.add_argument("--batch-size", type=int, default=None, help="ICs per deterministic call (default 8)")
    ap.add_argument("--precip", default=None, help="precipitation model dir: adds tp (metres)")
    ap.add_argument("--precip-bound-std", type=float, default=10.0,
                    help="bound tp at the store's mean + K std of tp (default 10; 0 = unbounded)")
    ap.add_argument("--mesh", type=parse_mesh_arg, default=None, help="D,C,H,W mesh (default: all devices on data)")
    ap.add_argument("--ic-file", default=None, help="NetCDF/zarr with the ICs (time dim) instead of the store")
    ap.add_argument("--channels", default=None, help="comma list overriding the model's channel list")
    distributed.add_arguments(ap)
    args = ap.parse_args(argv)
    # platform, CPU tuning, jax.distributed; every process then runs the same forecast on its share
    # of the mesh and process 0 writes the file
    distributed.start_from_args(args)

    from fcn_jax.config import ConfigError
    from fcn_jax.data.errors import DataError
    from fcn_jax.parallel.mesh import MeshError

    try:
        store = args.store
        if store == "world":
            from fcn_jax.data.store import resolve_store

            store = resolve_store("world")
        run_forecast(args.model_dir, store=store, init_times=args.init, steps=args.steps, out=args.out,
                     members=args.members, perturbation_std=args.perturbation_std, seed=args.seed,
                     precip_dir=args.precip, mesh_shape=args.mesh, ic_file=args.ic_file,
                     batch_size=args.batch_size, member_chunk=args.member_chunk,
                     channels=args.channels.split(",") if args.channels else None,
                     precip_bound_std=args.precip_bound_std, progress=distributed.is_primary())
    except (ForecastError, DataError, ConfigError, MeshError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
