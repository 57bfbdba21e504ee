"""Plots of forecasts, scores and tracks (apart from the scoring itself).

Every function draws on a ``matplotlib.figure.Figure`` with an Agg canvas (no
pyplot global state: safe headless and in threads) and writes the PNG
atomically (temporary name, then rename). Scores come as the Dataset of
:func:`fcn_jax.evaluate.evaluate_forecast` (dims ``system, channel,
lead_time``).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Sequence

import numpy as np

from fcn_jax.files import atomic_write

__all__ = ["plot_scores", "plot_spread_skill", "plot_rank_histogram", "plot_map_triplet", "plot_tracks"]

_STYLES = {"persistence": dict(ls="--", color="0.45"), "climatology": dict(ls=":", color="0.2")}


def _figure(nrows, ncols, size):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=size, constrained_layout=True)
    FigureCanvasAgg(fig)
    return fig, fig.subplots(nrows, ncols, squeeze=False)


def _save(fig, path) -> Path:
    return atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=110))


def _days(scores) -> np.ndarray:
    return scores["lead_time"].values / np.timedelta64(1, "D")


def _units(scores, c) -> str:
    if "units" in scores.coords:
        return str(scores["units"].sel(channel=c).values)
    return ""


def plot_scores(scores, path: str | os.PathLike, channels: Sequence[str]) -> Path:
    """RMSE, ACC (and CRPS for ensembles) against lead time, one column per channel, one line per system."""
    rows = ["rmse", "acc"] + (["crps"] if "crps" in scores else [])
    fig, axes = _figure(len(rows), len(channels), (3.6 * len(channels), 2.9 * len(rows)))
    days = _days(scores)
    for j, c in enumerate(channels):
        for i, v in enumerate(rows):
            for m in map(str, scores.system.values):
                axes[i, j].plot(days, scores[v].sel(channel=c, system=m).values, label=m,
                                **_STYLES.get(m, {}))
            axes[i, j].set_ylabel(v.upper() + ("" if v == "acc" else f" [{_units(scores, c)}]"))
            axes[i, j].grid(alpha=0.3)
        axes[0, j].set_title(c)
        axes[-1, j].set_xlabel("lead time [days]")
    axes[0, 0].legend(fontsize="small")
    return _save(fig, path)


def plot_spread_skill(scores, path: str | os.PathLike, channels: Sequence[str]) -> Path:
    """Ensemble spread and ensemble-mean RMSE (top) and their ratio (bottom) against lead time."""
    fig, axes = _figure(2, len(channels), (3.6 * len(channels), 5.6))
    days = _days(scores)
    for j, c in enumerate(channels):
        sel = {"channel": c, "system": "model"}
        axes[0, j].plot(days, scores["ensemble_mean_rmse"].sel(sel).values, label="ensemble-mean RMSE")
        axes[0, j].plot(days, scores["spread"].sel(sel).values, ls="--", label="spread")
        axes[0, j].set_title(c)
        axes[0, j].set_ylabel(f"[{_units(scores, c)}]")
        axes[1, j].plot(days, scores["spread_skill"].sel(sel).values, color="k")
        axes[1, j].axhline(1.0, color="0.5", lw=0.8)
        axes[1, j].set_ylabel("spread / skill")
        axes[1, j].set_xlabel("lead time [days]")
        for ax in axes[:, j]:
            ax.grid(alpha=0.3)
    axes[0, 0].legend(fontsize="small")
    return _save(fig, path)


def plot_rank_histogram(counts, lead_time, channels_all: Sequence[str], path: str | os.PathLike,
                        channels: Sequence[str], leads_h: Sequence[float] = (24, 72, 120)) -> Path:
    """Rank histograms (relative frequency of each rank) at a few leads, one panel per channel.

    ``counts [lead, channel, M+1]`` from :func:`fcn_jax.metrics.rank_counts`.
    """
    counts = np.asarray(counts, np.float64)
    hours = np.asarray(lead_time) / np.timedelta64(1, "h")
    pick = [int(np.argmin(np.abs(hours - h))) for h in leads_h if h <= hours.max()] or [len(hours) - 1]
    pick = sorted(set(pick))
    fig, axes = _figure(1, len(channels), (3.6 * len(channels), 3.0))
    n = counts.shape[-1]
    width = 0.8 / len(pick)
    for j, c in enumerate(channels):
        k = list(channels_all).index(c)
        ax = axes[0, j]
        for q, li in enumerate(pick):
            tot = counts[li, k].sum()
            ax.bar(np.arange(n) + (q - (len(pick) - 1) / 2) * width, counts[li, k] / max(tot, 1), width,
                   label=f"{hours[li]:g} h")
        ax.axhline(1.0 / n, color="k", lw=0.8)
        ax.set_title(c)
        ax.set_xlabel("rank of the truth")
    axes[0, 0].set_ylabel("frequency")
    axes[0, 0].legend(fontsize="small")
    return _save(fig, path)


def _extent(lat, lon):
    lat, lon = np.asarray(lat, np.float64), np.asarray(lon, np.float64)
    dlon = abs(lon[1] - lon[0]) / 2 if lon.size > 1 else 0.5
    dlat = abs(lat[1] - lat[0]) / 2 if lat.size > 1 else 0.5
    origin = "upper" if lat[0] > lat[-1] else "lower"  # imshow draws row 0 at the top
    return [lon.min() - dlon, lon.max() + dlon, lat.min() - dlat, lat.max() + dlat], origin


def plot_map_triplet(forecast, truth, lat, lon, path: str | os.PathLike, *, title: str = "", units: str = "") -> Path:
    """Forecast | truth | forecast - truth maps of one field ``[lat, lon]`` (physical units)."""
    f, t = np.asarray(forecast, np.float64), np.asarray(truth, np.float64)
    if f.shape != t.shape or f.ndim != 2:
        raise ValueError(f"forecast {f.shape} and truth {t.shape} must be the same [lat, lon]")
    extent, origin = _extent(lat, lon)
    vmin, vmax = float(np.nanmin([f.min(), t.min()])), float(np.nanmax([f.max(), t.max()]))
    d = f - t
    dmax = float(np.nanmax(np.abs(d))) or 1.0
    fig, axes = _figure(1, 3, (15, 3.8))
    for ax, (img, ttl, cmap, lo, hi) in zip(axes[0], [(f, "forecast", "viridis", vmin, vmax),
                                                       (t, "truth", "viridis", vmin, vmax),
                                                       (d, "forecast - truth", "RdBu_r", -dmax, dmax)]):
        im = ax.imshow(img, origin=origin, extent=extent, cmap=cmap, vmin=lo, vmax=hi, aspect="auto",
                       interpolation="nearest")
        ax.set_title(ttl)
        ax.set_xlabel("longitude [deg E]")
        fig.colorbar(im, ax=ax, shrink=0.85, label=units)
    axes[0, 0].set_ylabel("latitude [deg N]")
    if title:
        fig.suptitle(title)
    return _save(fig, path)


def plot_tracks(tracks, path: str | os.PathLike, *, background=None, lat=None, lon=None, title: str = "",
                interval: float = 0.9) -> Path:
    """Map of cyclone tracks: every member (thin), the ensemble's ``interval`` band of positions, the truth.

    ``tracks``: the Dataset of :func:`fcn_jax.track.track_forecast` (one init
    time): ``lat``/``lon`` ``[member, lead_time]`` and optionally
    ``truth_lat``/``truth_lon`` ``[lead_time]``. The band is, at each lead, the
    box spanned by the central ``interval`` quantiles of the members'
    latitudes and (unwrapped) longitudes, drawn as an ellipse. ``background``:
    an optional ``[lat, lon]`` field (the IC's pressure) drawn as contours.
    """
    from matplotlib.patches import Ellipse

    fig, axes = _figure(1, 1, (9, 5.2))
    ax = axes[0, 0]
    if background is not None:
        extent, origin = _extent(lat, lon)
        cs = ax.contour(np.asarray(lon), np.asarray(lat), np.asarray(background), levels=14, colors="0.7",
                        linewidths=0.6)
        ax.clabel(cs, fontsize=6, fmt="%.0f")
    tl = np.asarray(tracks["track_lat"].values, np.float64)  # [member, lead]
    tn = np.unwrap(np.asarray(tracks["track_lon"].values, np.float64), period=360.0, axis=-1)
    q = (1 - interval) / 2
    for li in range(tl.shape[1]):
        ok = np.isfinite(tl[:, li])
        if ok.sum() < 2:
            continue
        la = np.quantile(tl[ok, li], [q, 1 - q])
        lo = np.quantile(tn[ok, li], [q, 1 - q])
        ax.add_patch(Ellipse(((lo[0] + lo[1]) / 2, (la[0] + la[1]) / 2), max(lo[1] - lo[0], 0.3),
                             max(la[1] - la[0], 0.3), color="tab:blue", alpha=0.12, lw=0))
    for m in range(tl.shape[0]):
        ax.plot(tn[m], tl[m], color="tab:blue", lw=0.7, alpha=0.5)
    ax.plot(np.nanmedian(tn, axis=0), np.nanmedian(tl, axis=0), color="tab:blue", lw=2,
            label=f"ensemble median ({tl.shape[0]} members; shading: {int(interval * 100)} % of positions)")
    if "truth_lat" in tracks:
        ttl = np.asarray(tracks["truth_lat"].values, np.float64)
        ttn = np.unwrap(np.asarray(tracks["truth_lon"].values, np.float64), period=360.0)
        ax.plot(ttn, ttl, color="k", lw=2, marker="o", ms=3, label="truth")
    ax.plot(float(tracks.attrs.get("start_lon", tn[0, 0])), float(tracks.attrs.get("start_lat", tl[0, 0])),
            marker="*", ms=12, color="tab:red", label="start", ls="none")
    # zoom on the tracks (15 deg margin); longitudes stay unwrapped so a track may cross 0 E
    every_lat = np.concatenate([tl.ravel()] + ([ttl] if "truth_lat" in tracks else []))
    every_lon = np.concatenate([tn.ravel()] + ([ttn] if "truth_lat" in tracks else []))
    if np.isfinite(every_lat).any():
        ax.set_xlim(np.nanmin(every_lon) - 15, np.nanmax(every_lon) + 15)
        ax.set_ylim(max(np.nanmin(every_lat) - 15, -90), min(np.nanmax(every_lat) + 15, 90))
    ax.set_xlabel("longitude [deg E]")
    ax.set_ylabel("latitude [deg N]")
    ax.grid(alpha=0.3)
    ax.legend(fontsize="small", loc="best")
    if title:
        ax.set_title(title)
    return _save(fig, path)
