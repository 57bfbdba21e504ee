"""``python -m fcn_jax.evaluate``: score a forecast file against the truth and the baselines.

    python -m fcn_jax.evaluate FORECAST --truth STORE --out DIR \\
        [--baselines persistence,climatology] [--convention fcn|wb2]

``FORECAST``: any file in the forecast layout of :mod:`fcn_jax.forecast_io`
(dims ``(init_time, lead_time, [member], lat, lon)``, one variable per
channel, physical units), also one made elsewhere; ``valid_time`` is derived
from ``init_time + lead_time`` when absent. The truth at every valid time, the
persistence forecast (the truth at ``init_time``, at every lead) and the
climatology come from the store.

Writes ``DIR/scores.nc`` with data variables over ``(method, channel,
lead_time)`` -- ``method`` holds ``model`` and each baseline, ``channel`` the
channel names:

* ``rmse`` -- latitude-weighted RMSE, physical units; for an ensemble, of the
  ensemble mean;
* ``acc`` -- anomaly correlation against the climatology (not re-centred);
  the climatology baseline has no anomaly, so its correlation is undefined:
  reported as 0 (no skill), the conventional value;
* ``bias`` (forecast - truth) and ``mae``, area means, physical units;
* for ensembles: ``crps`` (fair estimator; a deterministic forecast is a
  one-member ensemble, so the baselines' CRPS is their MAE), ``spread``
  (sqrt of the IC-mean area-mean member variance, ddof 1),
  ``ensemble_mean_rmse`` (sqrt of the IC-mean MSE of the ensemble mean) and
  ``spread_skill`` = spread / ensemble_mean_rmse (WeatherBench 2's ratio); the
  baselines have NaN there.

plus ``DIR/scores.csv`` (long format, ``lead_time_hours``) and plots: scores
against lead time, spread-skill and rank histogram (ensembles), and maps of
forecast, truth and error.

Conventions (``--convention``):

* ``fcn`` (FourCastNet): RMSE and ACC per initial condition, then the mean
  over ICs; ACC and the climatology baseline use the store's time mean;
  latitude weights ``cos(lat)`` of the true latitudes (the original's
  assumed-pole-row quirk when the grid has a 90 deg row, see
  :func:`fcn_jax.metrics.lat_weights`).
* ``wb2`` (WeatherBench 2): RMSE = sqrt of the IC-mean MSE; ACC and the
  climatology baseline use the day-of-year x hour climatology at the valid
  time (time mean if the store has none); cell-area latitude weights.

Scores are computed in the store's normalised units (better conditioned in
float32) and scaled back by the channel std; ACC is invariant under it.
"""

from __future__ import annotations

import argparse
import io
import sys
import time
from pathlib import Path
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from fcn_jax import metrics
from fcn_jax.forecast_io import ForecastError, atomic_write, channel_units, forecast_channels, read_forecast

__all__ = [
    "MAIN_CHANNELS",
    "BASELINES",
    "evaluate_forecast",
    "format_table",
    "write_scores",
    "initial_condition_starts",
    "main",
]

#: Channels shown by default in tables and plots, in order, when present.
MAIN_CHANNELS: tuple[str, ...] = ("z500", "t850", "t2m", "u10", "v10", "msl", "sp", "tcwv", "r500", "tp")

#: Leads (hours) shown by default in the table: 6 h, 1, 2, 3 and 5 days.
DEFAULT_LEADS_H: tuple[int, ...] = (6, 24, 48, 72, 120)

BASELINES: tuple[str, ...] = ("persistence", "climatology")

_DET = ("mse", "acc", "bias", "mae")


def initial_condition_starts(n_times: int, prediction_length: int, stride: int, num_ics: int = 0) -> np.ndarray:
    """IC start indices of the original: ``range(0, n_times - prediction_length, stride)``.

    The exclusive stop reproduces ``inference.py`` (the last start that would
    still fit is never used). ``num_ics > 0`` keeps the first ``num_ics``.
    """
    starts = np.arange(0, max(n_times - prediction_length, 0), stride)
    return starts[:num_ics] if num_ics > 0 else starts


# --------------------------------------------------------------------------- #
# Per-IC scores (one jitted function per chunk shape)
# --------------------------------------------------------------------------- #


@jax.jit
def _det_scores(pred, truth, clim, w):
    """``{mse, acc, bias, mae}`` each ``[ic, lead, channel]``; fields ``[ic, lead, lat, lon, channel]`` (pred/clim broadcast)."""
    pred, truth = jnp.broadcast_arrays(pred, truth)
    return {
        "mse": metrics.weighted_mse(pred, truth, w),
        "acc": metrics.weighted_acc(pred, truth, clim, w),
        "bias": metrics.weighted_bias(pred, truth, w),
        "mae": metrics.weighted_mae(pred, truth, w),
    }


@jax.jit
def _ens_scores(members, truth, clim, w):
    """Ensemble ``members [ic, lead, member, lat, lon, channel]`` vs ``truth [ic, lead, lat, lon, channel]``."""
    out = _det_scores(jnp.mean(members, axis=2), truth, clim, w)
    out["crps"] = metrics.weighted_crps(members, truth, w, axis=2, estimator="fair")
    out["var"] = metrics.ensemble_variance(members, w, axis=2)
    out["rank"] = jnp.sum(metrics.rank_counts(members, truth, axis=2), axis=0)  # [lead, channel, M+1]
    return out


# --------------------------------------------------------------------------- #
# Evaluation of a file
# --------------------------------------------------------------------------- #


def _weights(lat, convention: str) -> np.ndarray:
    lat = np.asarray(lat, np.float64)
    if convention == "wb2":
        return metrics.lat_weights(lat, scheme="wb2")
    # FourCastNet's assumed-pole-row weights only where the grid really starts at a pole
    scheme = "fcn" if abs(abs(lat[0]) - 90.0) < 1e-6 else "cos"
    return metrics.lat_weights(lat, scheme=scheme)


def _check_grid(fc, ds, path, store) -> None:
    for ax in ("lat", "lon"):
        a, b = np.asarray(fc[ax].values, np.float64), np.asarray(ds[ax].values, np.float64)
        if a.shape != b.shape or not np.allclose(a, b, atol=1e-4):
            raise ForecastError(f"{path}: its {ax} grid ({a.size} points, {a[0]:g} .. {a[-1]:g}) differs from the "
                                f"truth store {store} ({b.size} points, {b[0]:g} .. {b[-1]:g}); regrid first")


def _ts(t) -> str:
    return str(np.datetime64(t, "s"))


def _time_index(store_times, times, what) -> np.ndarray:
    """Indices of ``times`` (any shape) in ``store_times``; error naming the first missing one."""
    flat = times.reshape(-1)
    pos = np.searchsorted(store_times, flat)
    ok = (pos < store_times.size) & (store_times[np.minimum(pos, store_times.size - 1)] == flat)
    if not ok.all():
        bad = flat[~ok][0]
        raise ForecastError(f"{what(bad)}: {_ts(bad)} is not in the truth store (it has {store_times.size} times "
                            f"{_ts(store_times[0])} .. {_ts(store_times[-1])})")
    return pos.reshape(times.shape)


def evaluate_forecast(forecast, truth, out=None, *, baselines: Sequence[str] = BASELINES, convention: str = "fcn",
                      channels: Sequence[str] | None = None, plots: bool = True, max_chunk_bytes: int = 1 << 29,
                      progress: bool = False):
    """Score ``forecast`` (path or Dataset in the forecast layout) against the store ``truth``.

    Returns the scores ``xarray.Dataset`` (see the module doc); with ``out``
    also writes ``scores.nc``, ``scores.csv``, ``rank_histogram.nc`` (ensembles)
    and the plots there. Everything is checked before any score is computed
    and nothing is written on error. ``max_chunk_bytes`` bounds the forecast
    slice held in memory (as many ICs at once as fit, else one IC with its leads in chunks).
    """
    import xarray as xr

    from fcn_jax.data.store import climatology_at, open_store, store_stats

    if convention not in ("fcn", "wb2"):
        raise ForecastError(f"--convention must be 'fcn' or 'wb2', got {convention!r}")
    bad = [b for b in baselines if b not in BASELINES]
    if bad:
        raise ForecastError(f"--baselines {bad} unknown; choose from {list(BASELINES)}")
    t0 = time.perf_counter()
    path = forecast if isinstance(forecast, (str, Path)) else "forecast"
    fc = read_forecast(forecast) if isinstance(forecast, (str, Path)) else forecast
    ds = open_store(truth)
    _check_grid(fc, ds, path, truth)
    have = forecast_channels(fc)
    if channels is not None:
        missing = [c for c in channels if c not in have]
        if missing:
            raise ForecastError(f"{path}: channels {missing} not in the forecast; it has {have}")
        have = list(channels)
    store_names = [str(c) for c in ds["channel"].values]
    missing = [c for c in have if c not in store_names]
    if missing:
        raise ForecastError(f"{path}: channel(s) {missing} of the forecast are not in the truth store {truth} "
                            f"(it has {store_names})")
    chans = list(have)
    ci = [store_names.index(c) for c in chans]
    st = ds["time"].values.astype("datetime64[ns]")
    init = fc["init_time"].values.astype("datetime64[ns]")
    lead = fc["lead_time"].values.astype("timedelta64[ns]")
    valid = init[:, None] + lead[None, :]
    lead_h = lead / np.timedelta64(1, "h")
    vidx = _time_index(st, valid, lambda v: f"{path}: valid time of lead "
                       f"{lead_h[np.argwhere(valid == v)[0][1]]:g} h from init "
                       f"{_ts(init[np.argwhere(valid == v)[0][0]])} (past the end of the data?)")
    iidx = _time_index(st, init, lambda v: f"{path}: init_time") if "persistence" in baselines else None
    mean, std = store_stats(truth, chans)
    ensemble = "member" in fc.dims
    n_mem = int(fc.sizes.get("member", 0))
    w = _weights(fc["lat"].values, convention)
    fields = ds["fields"]
    tmean = np.asarray(ds["time_mean"].isel(channel=ci).transpose("lat", "lon", "channel").values, np.float32)
    tmean_n = (tmean - mean) / std
    nlat, nlon = fc.sizes["lat"], fc.sizes["lon"]
    per_lead = nlat * nlon * len(chans) * 4 * max(n_mem, 1)
    lc = int(max(1, min(len(lead), max_chunk_bytes // per_lead)))
    methods = ["model"] + list(baselines)
    acc_store = {m: {k: np.zeros((len(init), len(lead), len(chans)), np.float64) for k in _DET} for m in methods}
    ens_store = {k: np.zeros((len(init), len(lead), len(chans)), np.float64) for k in ("crps", "var")}
    ranks = np.zeros((len(lead), len(chans), n_mem + 1), np.int64) if ensemble else None

    def norm(x):
        return (np.asarray(x, np.float32) - mean) / std

    def read_truth(tidx):  # [n, lat, lon, ch] normalised
        x = fields.isel(time=xr.DataArray(np.asarray(tidx).reshape(-1), dims="t"), channel=ci)
        return norm(x.transpose("t", "lat", "lon", "channel").values)

    n_init = len(init)
    ic_chunk = int(max(1, max_chunk_bytes // (per_lead * len(lead)))) if lc == len(lead) else 1
    chunks = [(i0, min(i0 + ic_chunk, n_init)) for i0 in range(0, n_init, ic_chunk)]
    if progress:
        from tqdm.auto import tqdm

        chunks = tqdm(chunks, desc="evaluate")
    for i0, i1 in chunks:  # ICs [i0, i1) x leads in chunks of lc: one read per channel and chunk
        n = i1 - i0
        pers = read_truth(iidx[i0:i1])[:, None] if iidx is not None else None  # [n, 1, lat, lon, ch]
        for l0 in range(0, len(lead), lc):
            sl = slice(l0, min(l0 + lc, len(lead)))
            L = sl.stop - sl.start
            f = np.stack([np.asarray(fc[c].isel(init_time=slice(i0, i1), lead_time=sl).values, np.float32)
                          for c in chans], -1)
            f = norm(f)  # [n, L, (M), lat, lon, ch]
            y = read_truth(vidx[i0:i1, sl]).reshape((n, L) + f.shape[-3:])  # [n, L, lat, lon, ch]
            if convention == "wb2":
                cl = climatology_at(ds, valid[i0:i1, sl].reshape(-1)).isel(channel=ci)
                clim = norm(cl.transpose("time", "lat", "lon", "channel").values).reshape(y.shape)
            else:
                clim = tmean_n[None, None]
            res = jax.device_get(_ens_scores(f, y, clim, w) if ensemble else _det_scores(f, y, clim, w))
            for k in _DET:
                acc_store["model"][k][i0:i1, sl] = res[k]
            if ensemble:
                ens_store["crps"][i0:i1, sl] = res["crps"]
                ens_store["var"][i0:i1, sl] = res["var"]
                ranks[sl] += np.asarray(res["rank"], np.int64)
            for b in baselines:
                pred = pers if b == "persistence" else clim
                rb = jax.device_get(_det_scores(pred, y, clim, w))
                for k in _DET:
                    acc_store[b][k][i0:i1, sl] = rb[k]
    scores = _assemble(acc_store, ens_store if ensemble else None, methods, chans, lead, std, convention)
    scores.attrs.update({"n_ic": len(init), "convention": convention, "members": n_mem,
                         "lat_weights": "wb2 cell area" if convention == "wb2" else
                         ("fcn" if abs(abs(float(fc['lat'].values[0])) - 90) < 1e-6 else "cos"),
                         "forecast": str(path), "truth": str(truth)})
    if out is not None:
        out = Path(out)
        write_scores(scores, out / "scores")
        if ensemble:
            rh = xr.Dataset({"rank_histogram": (("lead_time", "channel", "rank"), ranks)},
                            coords={"lead_time": lead, "channel": chans, "rank": np.arange(n_mem + 1)})
            atomic_write(out / "rank_histogram.nc", lambda tmp: rh.to_netcdf(tmp, engine="netcdf4"))
        if plots:
            from fcn_jax import plots as P

            show = [c for c in MAIN_CHANNELS if c in chans][:4] or chans[:4]
            P.plot_scores(scores, out / "scores_vs_lead.png", channels=show)
            if ensemble:
                P.plot_spread_skill(scores, out / "spread_skill.png", channels=show)
                P.plot_rank_histogram(ranks, lead, chans, out / "rank_histogram.png", channels=show)
            j = int(min(4, len(lead) - 1))  # 24 h at 6-hourly leads
            c = show[0]
            fmap = fc[c].isel(init_time=0, lead_time=j)
            if ensemble:
                fmap = fmap.mean("member")
            tmap = fields.isel(time=int(vidx[0, j]), channel=store_names.index(c))
            P.plot_map_triplet(np.asarray(fmap.values), np.asarray(tmap.values), fc["lat"].values,
                               fc["lon"].values, out / f"map_{c}.png",
                               title=f"{c}{' ensemble mean' if ensemble else ''}, init {init[0]}, lead "
                                     f"{lead_h[j]:g} h", units=channel_units([c])[0])
    if progress:
        print(f"scored {len(init)} ICs x {len(lead)} leads x {len(chans)} channels"
              f"{f' x {n_mem} members' if ensemble else ''} ({time.perf_counter() - t0:.1f} s)")
    return scores


def _assemble(det, ens, methods, chans, lead, std, convention):
    """The scores Dataset from per-IC normalised sums ``[n_ic, lead, channel]``."""
    import xarray as xr

    std = np.asarray(std, np.float64)
    dims = ("method", "channel", "lead_time")

    def t(a):  # [method, lead, ch] -> [method, ch, lead]
        return np.swapaxes(np.asarray(a, np.float64), -1, -2).astype(np.float32)

    mse = np.stack([det[m]["mse"] for m in methods])  # [method, ic, lead, ch]
    rmse = np.sqrt(mse).mean(axis=1) * std if convention == "fcn" else np.sqrt(mse.mean(axis=1)) * std
    acc = np.stack([det[m]["acc"] for m in methods]).mean(axis=1)
    if "climatology" in methods:
        acc[methods.index("climatology")] = 0.0  # no anomaly: undefined correlation, reported as no skill
    data = {
        "rmse": (dims, t(rmse), {"long_name": "latitude-weighted RMSE" + (" of the ensemble mean" if ens else ""),
                                 "convention": "sqrt per IC, then mean" if convention == "fcn" else
                                 "sqrt of the IC-mean MSE"}),
        "acc": (dims, t(acc), {"long_name": "latitude-weighted anomaly correlation", "units": "1"}),
        "bias": (dims, t(np.stack([det[m]["bias"] for m in methods]).mean(axis=1) * std),
                 {"long_name": "area-mean forecast - truth"}),
        "mae": (dims, t(np.stack([det[m]["mae"] for m in methods]).mean(axis=1) * std),
                {"long_name": "area-mean absolute error"}),
    }
    if ens is not None:
        nan = np.full((len(lead), len(chans)), np.nan)
        crps = [ens["crps"].mean(axis=0) * std] + [det[m]["mae"].mean(axis=0) * std for m in methods[1:]]
        spread = np.sqrt(ens["var"].mean(axis=0)) * std
        em_rmse = np.sqrt(det["model"]["mse"].mean(axis=0)) * std
        with np.errstate(divide="ignore", invalid="ignore"):
            ssr = spread / em_rmse
        pad = [nan] * (len(methods) - 1)
        data.update({
            "crps": (dims, t(np.stack(crps)), {"long_name": "fair CRPS (baselines: one-member ensembles, = MAE)"}),
            "spread": (dims, t(np.stack([spread] + pad)), {"long_name": "sqrt of mean ensemble variance (ddof 1)"}),
            "ensemble_mean_rmse": (dims, t(np.stack([em_rmse] + pad)),
                                   {"long_name": "sqrt of the IC-mean MSE of the ensemble mean"}),
            "spread_skill": (dims, t(np.stack([ssr] + pad)),
                             {"long_name": "spread / ensemble_mean_rmse", "units": "1"}),
        })
    units = [u or "?" for u in channel_units(chans)]
    ds = xr.Dataset(data, coords={"method": ("method", methods), "channel": ("channel", chans),
                                  "lead_time": ("lead_time", np.asarray(lead, "timedelta64[ns]")),
                                  "units": ("channel", units)})
    for v in ("rmse", "bias", "mae", "crps", "spread", "ensemble_mean_rmse"):
        if v in ds:
            ds[v].attrs["units"] = "channel units (see the units coordinate)"
    return ds


# --------------------------------------------------------------------------- #
# Reporting
# --------------------------------------------------------------------------- #


def _hours(scores) -> np.ndarray:
    return scores["lead_time"].values / np.timedelta64(1, "h")


def _lead_label(h) -> str:
    h = float(h)
    return f"{int(h // 24)} d" if h >= 24 and h % 24 == 0 else f"{h:g} h"


def _fmt(x: float) -> str:
    if not np.isfinite(x):
        return "nan"
    return f"{x:.4g}" if abs(x) < 1e4 else f"{x:.0f}"


def format_table(scores, channels: Sequence[str] | None = None, leads_h: Sequence[float] = DEFAULT_LEADS_H) -> str:
    """Plain-text table: RMSE and ACC per method, and for ensembles CRPS per method and the spread-skill ratio."""
    names = [str(c) for c in scores.channel.values]
    channels = [c for c in (channels or MAIN_CHANNELS) if c in names] or names[:4]
    methods = [str(m) for m in scores.method.values]
    hours = list(_hours(scores))
    leads = [l for l in leads_h if float(l) in hours]
    units = dict(zip(names, map(str, scores.units.values))) if "units" in scores.coords else {}
    ens = "crps" in scores
    w = max(11, max(len(m) for m in methods) + 1)
    blocks = [("RMSE", "rmse"), ("ACC", "acc")] + ([("CRPS", "crps")] if ens else [])
    head1 = f"{'channel':<8} {'units':<10} {'lead':>5} | " + " | ".join(t.center(w * len(methods)) for t, _ in blocks)
    head2 = f"{'':<8} {'':<10} {'':>5} | " + " | ".join("".join(f"{m:>{w}}" for m in methods) for _ in blocks)
    if ens:
        head1 += " | " + "spread/skill".rjust(12)
        head2 += " | " + "model".rjust(12)
    lines = [head1, head2, "-" * len(head2)]
    for c in channels:
        for l in leads:
            j = hours.index(float(l))
            row = f"{c:<8} {units.get(c, ''):<10} {_lead_label(l):>5} | "
            cells = []
            for _, v in blocks:
                vals = scores[v].sel(channel=c).isel(lead_time=j)
                fmt = (lambda x: f"{x:.3f}") if v == "acc" else _fmt
                cells.append("".join(f"{fmt(float(vals.sel({'method': m}))):>{w}}" for m in methods))
            row += " | ".join(cells)
            if ens:
                row += " | " + f"{float(scores['spread_skill'].sel({'method': 'model', 'channel': c}).isel(lead_time=j)):>12.3f}"
            lines.append(row)
    n_ic = scores.attrs.get("n_ic")
    lines.append(f"({scores.attrs.get('convention', '?')} convention, {scores.attrs.get('lat_weights', '?')} "
                 f"latitude weights" + (f", {n_ic} ICs" if n_ic is not None else "")
                 + (f", {scores.attrs.get('members')} members, fair CRPS" if ens else "") + ")")
    return "\n".join(lines)


def write_scores(scores, path_stem) -> tuple[Path, Path]:
    """Write ``<stem>.nc`` and ``<stem>.csv`` (long format with ``lead_time_hours``), each atomically."""
    stem = Path(path_stem)
    if stem.suffix in (".csv", ".nc"):
        stem = stem.with_suffix("")
    df = scores.to_dataframe().reset_index()
    df.insert(df.columns.get_loc("lead_time"), "lead_time_hours", df["lead_time"] / np.timedelta64(1, "h"))
    df = df.drop(columns=["lead_time"])
    buf = io.StringIO()
    df.to_csv(buf, index=False, float_format="%.7g")
    text = buf.getvalue()
    csv = atomic_write(stem.with_name(stem.name + ".csv"), lambda tmp: Path(tmp).write_text(text))
    nc = atomic_write(stem.with_name(stem.name + ".nc"), lambda tmp: scores.to_netcdf(tmp, engine="netcdf4"))
    return csv, nc


# --------------------------------------------------------------------------- #
# CLI
# --------------------------------------------------------------------------- #


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m fcn_jax.evaluate", description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("forecast", help="forecast file (.nc or .zarr) in the forecast layout")
    ap.add_argument("--truth", required=True, help="prepared store with the verifying data, or 'world'")
    ap.add_argument("--out", required=True, help="output directory")
    ap.add_argument("--baselines", default="persistence,climatology", help="comma list, or 'none'")
    ap.add_argument("--convention", choices=["fcn", "wb2"], default="fcn")
    ap.add_argument("--channels", default=None, help="comma list (default: every forecast channel)")
    ap.add_argument("--no-plots", action="store_true")
    args = ap.parse_args(argv)
    from fcn_jax.data.errors import DataError

    baselines = [] if args.baselines in ("", "none") else [b.strip() for b in args.baselines.split(",")]
    try:
        truth = args.truth
        if truth == "world":
            from fcn_jax.data.store import resolve_store

            truth = resolve_store("world")
        scores = evaluate_forecast(args.forecast, truth, args.out, baselines=baselines, convention=args.convention,
                                   channels=args.channels.split(",") if args.channels else None,
                                   plots=not args.no_plots, progress=True)
    except (ForecastError, DataError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(format_table(scores))
    print(f"scores in {Path(args.out) / 'scores.nc'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
