"""Scoring forecasts against the truth and the two reference baselines.

FourCastNet's protocol (evaluation spec §5, model spec §15-§16): latitude-
weighted RMSE in physical units and ACC against a time-mean climatology, per
initial condition (IC), per lead and per channel, then averaged over ICs. The
model is always shown next to

* **persistence** -- the forecast at every lead is the initial condition;
* **climatology** -- the forecast at every lead is the climatology,

both scored by the same code (spec §6), as a smoke test and as the bar a
trained model has to clear.

Layouts: truth and forecast trajectories are ``[n_ic, steps+1, lat, lon,
channel]`` in **normalised** units (entry 0 of the lead axis is the IC, lead
``i`` is ``i * step_hours``); :func:`forecast_trajectories` produces that
layout from a model. Per-channel ``mean``/``std`` are ``[channel]``
(physical = normalised * std + mean). The climatology is in **physical** units,
``[lat, lon, channel]`` (a time mean, FCN-style) or anything broadcastable to
the trajectories (e.g. a valid-time climatology ``[n_ic, steps+1, lat, lon,
channel]``).

Scores are computed in normalised units (better float32 conditioning) and
RMSE is scaled by ``std`` into physical units; ACC is invariant under the
normalisation because the climatology is normalised the same way.

The result is an ``xarray.Dataset`` with dims ``(method, lead_time_h,
channel)``:

* ``rmse`` -- physical units, FCN order: sqrt per IC, then mean over ICs;
* ``rmse_wb2`` -- physical units, WB2 order: sqrt of the IC-mean MSE;
* ``acc`` -- mean over ICs of the per-IC ACC. The climatology baseline has no
  anomaly at all, so its correlation is undefined; it is reported as 0 (no
  skill), the conventional value.

Select a method with a dict, ``scores.sel({"method": "model"})``:
``sel(method=...)`` is taken by xarray as its *interpolation-method* argument.
"""

from __future__ import annotations

import io
import os
from pathlib import Path
from typing import Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from fcn_jax import metrics
from fcn_jax.forecast import _atomic, rollout

__all__ = [
    "MAIN_CHANNELS",
    "Scorer",
    "score_forecasts",
    "forecast_trajectories",
    "initial_condition_starts",
    "truth_trajectories",
    "format_table",
    "plot_scores",
    "plot_forecast_vs_truth",
    "write_scores",
]

#: Channels shown by default in tables and plots, in order, when present.
MAIN_CHANNELS: tuple[str, ...] = ("z500", "t850", "t2m", "u10", "v10", "msl", "tcwv", "r500")

#: Leads (hours) shown by default in the table: 6 h, 1, 2, 3 and 5 days.
DEFAULT_LEADS_H: tuple[int, ...] = (6, 24, 48, 72, 120)


# --------------------------------------------------------------------------- #
# Trajectories
# --------------------------------------------------------------------------- #


def initial_condition_starts(n_times: int, prediction_length: int, stride: int, num_ics: int = 0) -> np.ndarray:
    """IC start indices of the original: ``range(0, n_times - prediction_length, stride)``.

    The exclusive stop reproduces ``inference.py`` exactly (the last start that
    would still fit, ``n_times - prediction_length``, is never used).
    ``num_ics > 0`` keeps the first ``num_ics``.
    """
    starts = np.arange(0, max(n_times - prediction_length, 0), stride)
    return starts[:num_ics] if num_ics > 0 else starts


def truth_trajectories(series, starts: Sequence[int], prediction_length: int) -> np.ndarray:
    """Windows ``[n_ic, prediction_length, lat, lon, channel]`` of ``series [time, lat, lon, channel]``."""
    return np.stack([np.asarray(series[s : s + prediction_length]) for s in starts])


def forecast_trajectories(model, x0, steps: int, batch_size: int | None = None):
    """Model forecasts ``[n_ic, steps+1, lat, lon, channel]`` from ICs ``[n_ic, lat, lon, channel]``.

    ICs are rolled out ``batch_size`` at a time (default: all at once) with
    :func:`fcn_jax.forecast.rollout`; the result is gathered to host memory.
    On a mesh, ``batch_size`` must be a multiple of the ``data`` axis.
    """
    x0 = np.asarray(x0) if not isinstance(x0, jax.Array) else x0
    n = x0.shape[0]
    bs = n if batch_size is None else int(batch_size)
    out = []
    for i in range(0, n, bs):
        traj = rollout(model, x0[i : i + bs], steps)  # [steps+1, b, lat, lon, ch]
        out.append(np.swapaxes(np.asarray(jax.device_get(traj)), 0, 1))
    return np.concatenate(out, axis=0)


# --------------------------------------------------------------------------- #
# Scoring
# --------------------------------------------------------------------------- #


@jax.jit
def _per_ic(pred, truth, clim_norm, weights):
    """MSE and ACC per (IC, lead, channel) in normalised units; pred broadcasts to truth."""
    mse = metrics.weighted_mse(pred, truth, weights)
    acc = metrics.weighted_acc(pred, truth, clim_norm, weights)
    mse = jnp.broadcast_to(mse, truth.shape[:-3] + truth.shape[-1:])
    return mse, jnp.broadcast_to(acc, mse.shape)


class Scorer:
    """Accumulates per-IC scores chunk by chunk; :meth:`result` gives the Dataset.

    Streaming keeps memory bounded: a 0.25 deg, 41-lead, 20-channel trajectory
    is 3.4 GB per IC, so 36 ICs never sit in memory together. Only the small
    per-IC score arrays ``[n_ic, lead, channel]`` are kept.

    Args:
      mean, std: per-channel normalisation ``[channel]``.
      climatology: physical units, broadcastable to ``[n_ic, steps+1, lat, lon,
        channel]`` (normally the time mean ``[lat, lon, channel]``). A
        climatology with an IC axis must match each chunk passed to :meth:`add`.
      lat: latitudes in degrees ``[lat]`` (needed for ``weights="cos"``; may be
        None for ``"fcn"``).
      channels: channel names (default ``c0, c1, ...``).
      step_hours: hours per lead step.
      weights: ``"fcn"`` (the original's quirk), ``"cos"`` (true latitudes), or
        an explicit ``[lat]`` / ``[lat, lon]`` array.
    """

    def __init__(self, mean, std, climatology, lat=None, *, channels: Sequence[str] | None = None,
                 step_hours: float = 6.0, weights="fcn"):
        self.mean = np.asarray(mean, np.float32).reshape(-1)
        self.std = np.asarray(std, np.float32).reshape(-1)
        n_ch = self.std.size
        clim = np.asarray(climatology, np.float32)
        if clim.shape[-1] != n_ch:
            raise ValueError(f"climatology has {clim.shape[-1]} channels, std has {n_ch} (layout [..., lat, lon, channel])")
        self.clim_norm = (clim - self.mean) / self.std  # normalised like the fields
        self.lat = None if lat is None else np.asarray(lat, np.float64)
        self.channels = list(channels) if channels is not None else [f"c{i}" for i in range(n_ch)]
        if len(self.channels) != n_ch:
            raise ValueError(f"{len(self.channels)} channel names for {n_ch} channels")
        self.step_hours = float(step_hours)
        self.weights_spec = weights
        self._weights = None
        self._mse: dict[str, list[np.ndarray]] = {}
        self._acc: dict[str, list[np.ndarray]] = {}

    def _get_weights(self, n_lat: int):
        if self._weights is None:
            if isinstance(self.weights_spec, str):
                self._weights = metrics.lat_weights(self.lat, n_lat, scheme=self.weights_spec)
            else:
                self._weights = np.asarray(self.weights_spec, np.float32)
        return self._weights

    def add(self, truth, forecasts=None) -> "Scorer":
        """Score one chunk of ICs.

        Args:
          truth: ``[n, steps+1, lat, lon, channel]`` normalised (NumPy or jax,
            possibly sharded).
          forecasts: ``None`` (baselines only), one array of ``truth``'s shape
            (method ``"model"``), or ``{method name: array}``.
        """
        truth = jnp.asarray(truth, jnp.float32) if not isinstance(truth, jax.Array) else truth
        if truth.ndim != 5:
            raise ValueError(f"truth must be [n_ic, steps+1, lat, lon, channel], got {truth.shape}")
        if forecasts is None:
            forecasts = {}
        elif not isinstance(forecasts, Mapping):
            forecasts = {"model": forecasts}
        w = self._get_weights(truth.shape[-3])
        clim = jnp.asarray(self.clim_norm)
        preds = dict(forecasts)
        preds["persistence"] = truth[:, :1]  # the IC, broadcast over leads
        preds["climatology"] = clim  # broadcast inside the metric, never materialised per lead
        for name, pred in preds.items():
            if name not in ("persistence", "climatology") and tuple(pred.shape) != tuple(truth.shape):
                raise ValueError(f"forecast {name!r} has shape {tuple(pred.shape)}, truth {tuple(truth.shape)}")
            mse, acc = _per_ic(pred, truth, clim, w)
            mse, acc = np.asarray(jax.device_get(mse)), np.asarray(jax.device_get(acc))
            if name == "climatology":
                acc = np.zeros_like(acc)  # zero anomaly: undefined correlation, no skill
            self._mse.setdefault(name, []).append(mse)
            self._acc.setdefault(name, []).append(acc)
        return self

    def per_ic(self) -> dict[str, dict[str, np.ndarray]]:
        """``{method: {"rmse": [n_ic, lead, ch] physical, "acc": [n_ic, lead, ch]}}``."""
        return {
            m: {"rmse": np.sqrt(np.concatenate(self._mse[m])) * self.std, "acc": np.concatenate(self._acc[m])}
            for m in self._mse
        }

    def result(self):
        """The scores as an ``xarray.Dataset`` (dims ``method, lead_time_h, channel``)."""
        import xarray as xr

        if not self._mse:
            raise ValueError("no ICs scored yet: call add() first")
        order = [m for m in self._mse if m not in ("persistence", "climatology")] + ["persistence", "climatology"]
        mse = np.stack([np.concatenate(self._mse[m]) for m in order])  # [method, n_ic, lead, ch]
        acc = np.stack([np.concatenate(self._acc[m]) for m in order])
        n_ic, n_lead = mse.shape[1], mse.shape[2]
        rmse_fcn = (np.sqrt(mse) * self.std).mean(axis=1)
        rmse_wb2 = np.sqrt(mse.mean(axis=1)) * self.std
        leads = np.arange(n_lead) * self.step_hours
        leads = leads.astype(np.int64) if np.all(leads == np.round(leads)) else leads
        units = _units(self.channels)
        dims = ("method", "lead_time_h", "channel")
        ds = xr.Dataset(
            {
                "rmse": (dims, rmse_fcn.astype(np.float32),
                         {"long_name": "latitude-weighted RMSE, sqrt per IC then mean over ICs (FourCastNet)",
                          "units": "channel units"}),
                "rmse_wb2": (dims, rmse_wb2.astype(np.float32),
                             {"long_name": "latitude-weighted RMSE, sqrt of the IC-mean MSE (WeatherBench 2)",
                              "units": "channel units"}),
                "acc": (dims, acc.mean(axis=1).astype(np.float32),
                        {"long_name": "latitude-weighted ACC vs climatology, not re-centred, mean over ICs",
                         "units": "1"}),
            },
            coords={
                "method": ("method", order),
                "lead_time_h": ("lead_time_h", leads, {"units": "hours"}),
                "channel": ("channel", self.channels),
                "units": ("channel", units),
            },
        )
        ds.attrs.update({
            "n_ic": int(n_ic),
            "lat_weights": self.weights_spec if isinstance(self.weights_spec, str) else "custom",
            "climatology_acc": "set to 0: the climatology forecast has no anomaly",
        })
        return ds


def score_forecasts(truth, forecast, mean, std, climatology, lat=None, *, channels=None,
                    step_hours: float = 6.0, weights="fcn", ic_chunk: int | None = None):
    """RMSE (physical) and ACC of model, persistence and climatology; see the module doc.

    Args:
      truth: ``[n_ic, steps+1, lat, lon, channel]`` normalised.
      forecast: same shape (method ``"model"``), ``{name: array}``, or None.
      mean, std: ``[channel]``; climatology: physical, ``[lat, lon, channel]``.
      lat: latitudes in degrees ``[lat]``.
      ic_chunk: ICs moved to the device per step (default all; lower to bound
        memory for NumPy inputs).

    Returns:
      ``xarray.Dataset`` with ``rmse``, ``rmse_wb2``, ``acc`` over ``(method,
      lead_time_h, channel)``.
    """
    scorer = Scorer(mean, std, climatology, lat, channels=channels, step_hours=step_hours, weights=weights)
    n = truth.shape[0]
    chunk = n if ic_chunk is None else int(ic_chunk)
    if forecast is not None and not isinstance(forecast, Mapping):
        forecast = {"model": forecast}
    for i in range(0, n, chunk):
        sl = slice(i, i + chunk)
        scorer.add(truth[sl], None if forecast is None else {k: v[sl] for k, v in forecast.items()})
    return scorer.result()


def _units(channels):
    from fcn_jax.forecast import _channel_units

    return [u or "?" for u in _channel_units(channels)]


# --------------------------------------------------------------------------- #
# Reporting
# --------------------------------------------------------------------------- #


def _pick_channels(scores, channels):
    names = [str(c) for c in scores.channel.values]
    if channels is None:
        main = [c for c in MAIN_CHANNELS if c in names]
        return main or names[: min(4, len(names))]
    missing = [c for c in channels if c not in names]
    if missing:
        raise ValueError(f"channels {missing} not in the scores (have {names})")
    return list(channels)


def _lead_label(h) -> str:
    h = float(h)
    if h >= 24 and h % 24 == 0:
        return f"{int(h // 24)} d"
    return f"{h:g} h"


def format_table(scores, channels: Sequence[str] | None = None, leads_h: Sequence[float] = DEFAULT_LEADS_H) -> str:
    """Plain-text table of RMSE and ACC for every method at chosen leads.

    One row per (channel, lead); RMSE columns then ACC columns, one per method
    (model(s), persistence, climatology). Leads not in ``scores`` are skipped.
    RMSE is in the channel's physical units (FCN order: sqrt per IC).
    """
    channels = _pick_channels(scores, channels)
    methods = [str(m) for m in scores.method.values]
    avail = [float(v) for v in scores.lead_time_h.values]
    leads = [l for l in leads_h if float(l) in avail]
    units = dict(zip([str(c) for c in scores.channel.values], [str(u) for u in scores.units.values])) \
        if "units" in scores.coords else {}
    w = max(11, max(len(m) for m in methods) + 1)
    head1 = f"{'channel':<8} {'units':<11} {'lead':>5} | " + "RMSE".center(w * len(methods)) + " | " \
        + "ACC".center(w * len(methods))
    head2 = f"{'':<8} {'':<11} {'':>5} | " + "".join(f"{m:>{w}}" for m in methods) + " | " \
        + "".join(f"{m:>{w}}" for m in methods)
    lines = [head1, head2, "-" * len(head2)]
    for c in channels:
        for l in leads:
            r = scores.rmse.sel(channel=c, lead_time_h=l)
            a = scores.acc.sel(channel=c, lead_time_h=l)
            row = f"{c:<8} {units.get(c, ''):<11} {_lead_label(l):>5} | "
            row += "".join(f"{_fmt(float(r.sel({'method': m}))):>{w}}" for m in methods) + " | "
            row += "".join(f"{float(a.sel({'method': m})):>{w}.3f}" for m in methods)
            lines.append(row)
    n_ic = scores.attrs.get("n_ic")
    lines.append(f"(latitude-weighted, {scores.attrs.get('lat_weights', '?')} weights"
                 + (f", mean over {n_ic} ICs" if n_ic is not None else "") + ")")
    return "\n".join(lines)


def _fmt(x: float) -> str:
    if not np.isfinite(x):
        return "nan"
    return f"{x:.4g}" if abs(x) < 1e4 else f"{x:.0f}"


def _figure(nrows, ncols, size):
    # Figure + Agg canvas directly: no pyplot global state (safe in threads and headless)
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=size, constrained_layout=True)
    FigureCanvasAgg(fig)
    axes = fig.subplots(nrows, ncols, squeeze=False)
    return fig, axes


def _save(fig, path) -> Path:
    return _atomic(path, lambda tmp: fig.savefig(tmp, format=Path(path).suffix.lstrip(".") or "png", dpi=110))


def plot_scores(scores, path: str | os.PathLike, channels: Sequence[str] | None = None) -> Path:
    """PNG of RMSE (top row) and ACC (bottom row) against lead time, one column per channel.

    Every method in ``scores`` is one line (model, persistence, climatology).
    Written atomically; returns the path.
    """
    channels = _pick_channels(scores, channels)
    fig, axes = _figure(2, len(channels), (3.6 * len(channels), 6.0))
    days = np.asarray(scores.lead_time_h.values, np.float64) / 24.0
    styles = {"persistence": dict(ls="--", color="0.4"), "climatology": dict(ls=":", color="0.2")}
    units = dict(zip(map(str, scores.channel.values), map(str, scores.units.values))) if "units" in scores.coords else {}
    for j, c in enumerate(channels):
        for m in map(str, scores.method.values):
            kw = styles.get(m, {})
            axes[0, j].plot(days, scores.rmse.sel({"channel": c, "method": m}).values, label=m, **kw)
            axes[1, j].plot(days, scores.acc.sel({"channel": c, "method": m}).values, label=m, **kw)
        axes[0, j].set_title(c)
        axes[0, j].set_ylabel(f"RMSE [{units.get(c, '')}]")
        axes[1, j].set_ylabel("ACC")
        axes[1, j].set_xlabel("lead time [days]")
        axes[1, j].set_ylim(min(-0.05, float(np.nanmin(scores.acc.sel(channel=c).values)) - 0.05), 1.02)
        for ax in axes[:, j]:
            ax.grid(alpha=0.3)
    axes[0, 0].legend(fontsize="small")
    return _save(fig, path)


def plot_forecast_vs_truth(forecast, truth, lat, lon, channel, lead, path: str | os.PathLike, *,
                           channels: Sequence[str] | None = None, step_hours: float = 6.0,
                           units: str | None = None, title: str | None = None) -> Path:
    """PNG of forecast | truth | forecast - truth maps for one channel and lead.

    Args:
      forecast, truth: one IC's trajectories ``[lead, lat, lon, channel]``
        (``lead`` indexes axis 0), or single states ``[lat, lon, channel]``
        (``lead`` only labels the plot). Pass physical units for physical
        colour bars.
      lat, lon: coordinates in degrees (any latitude order).
      channel: index, or name looked up in ``channels``.
      lead: lead index (step number).
    """
    f, t = np.asarray(forecast, np.float32), np.asarray(truth, np.float32)
    if f.shape != t.shape:
        raise ValueError(f"forecast {f.shape} and truth {t.shape} differ")
    if isinstance(channel, str):
        if channels is None:
            raise ValueError("a channel name needs the `channels` list")
        name, ci = channel, list(channels).index(channel)
    else:
        ci = int(channel)
        name = channels[ci] if channels is not None else f"channel {ci}"
    if f.ndim == 4:
        f, t = f[lead], t[lead]
    elif f.ndim != 3:
        raise ValueError(f"expected [lead, lat, lon, channel] or [lat, lon, channel], got {f.shape}")
    f, t = f[..., ci], t[..., ci]
    lat, lon = np.asarray(lat, np.float64), np.asarray(lon, np.float64)
    if units is None:
        from fcn_jax.forecast import _channel_units

        units = _channel_units([name])[0]
    # imshow draws row 0 at the top: north-first data use origin "upper"
    origin = "upper" if lat[0] > lat[-1] else "lower"
    # pixel centres sit on the coordinates: extend the image by half a cell on each side
    dlon = abs(lon[1] - lon[0]) / 2 if lon.size > 1 else 0.5
    dlat = abs(lat[1] - lat[0]) / 2 if lat.size > 1 else 0.5
    extent = [lon.min() - dlon, lon.max() + dlon, lat.min() - dlat, lat.max() + dlat]
    vmin, vmax = float(min(f.min(), t.min())), float(max(f.max(), t.max()))
    d = f - t
    dmax = float(np.abs(d).max()) or 1.0
    fig, axes = _figure(1, 3, (15, 3.8))
    lead_h = lead * step_hours
    panels = [(f, f"forecast +{_lead_label(lead_h)}", "viridis", vmin, vmax),
              (t, "truth", "viridis", vmin, vmax),
              (d, "forecast - truth", "RdBu_r", -dmax, dmax)]
    for ax, (img, ttl, cmap, lo, hi) in zip(axes[0], panels):
        im = ax.imshow(img, origin=origin, extent=extent, cmap=cmap, vmin=lo, vmax=hi, aspect="auto",
                       interpolation="nearest")
        ax.set_title(ttl)
        ax.set_xlabel("longitude [deg E]")
        fig.colorbar(im, ax=ax, shrink=0.85, label=units)
    axes[0, 0].set_ylabel("latitude [deg N]")
    fig.suptitle(title or f"{name}, lead {_lead_label(lead_h)}")
    return _save(fig, path)


def write_scores(scores, path_stem: str | os.PathLike) -> tuple[Path, Path]:
    """Write ``<stem>.csv`` (long format: method, lead_time_h, channel, scores) and ``<stem>.nc``.

    Both files are written to a temporary name and renamed into place.
    """
    stem = Path(path_stem)
    if stem.suffix in (".csv", ".nc"):
        stem = stem.with_suffix("")
    df = scores.to_dataframe().reset_index()
    buf = io.StringIO()
    df.to_csv(buf, index=False, float_format="%.7g")
    text = buf.getvalue()

    def _write_csv(tmp):
        with open(tmp, "w") as fh:
            fh.write(text)

    csv = _atomic(stem.with_name(stem.name + ".csv"), _write_csv)
    nc = _atomic(stem.with_name(stem.name + ".nc"), lambda tmp: scores.to_netcdf(tmp, engine="netcdf4"))
    return csv, nc
