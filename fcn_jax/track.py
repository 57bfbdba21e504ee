"""``python -m fcn_jax.track``: follow a cyclone (a pressure minimum) through every member of a forecast.

    python -m fcn_jax.track FORECAST --start LAT,LON [--radius-km R] [--truth STORE] \\
        [--init TIME] [--out DIR]

The tracker (a simple nearest-minimum tracker, as ECMWF's and TempestExtremes'
in their simplest form): at lead 0 the minimum of the pressure field
(``msl``; on the embedded world, which has no orography, surface pressure
``sp``) within ``R`` km of ``--start``; at every later lead the minimum within
``R`` km of the previous position. The grid minimum is refined to sub-grid
precision with a parabola through it and its neighbours along latitude and
longitude (clamped to half a cell). Distances are great-circle distances on a
sphere of radius 6371 km; longitudes wrap.

The same tracker runs on the truth from the store (default: the store named in
the forecast's ``store`` attribute), starting from the same point. Outputs in
``DIR`` (default: next to the forecast): ``tracks.csv`` (one row per member,
lead; ``member = -1`` is the truth), ``tracks.nc`` (``track_lat``,
``track_lon``, ``track_pressure`` over ``(member, lead_time)``, ``truth_*``
over ``lead_time``, ``track_error_km`` per member and
``ensemble_mean_track_error_km``), and ``tracks.png``: every member, the
ensemble's 90 % interval of positions at each lead, and the truth.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

from fcn_jax import cli
from fcn_jax.files import atomic_write
from fcn_jax.inference.files import ForecastError, forecast_channels, read_forecast

__all__ = ["EARTH_RADIUS_KM", "great_circle_km", "find_minimum", "follow", "find_low", "track_forecast", "main"]

EARTH_RADIUS_KM = 6371.0
PRESSURE_VARIABLES = ("msl", "sp")


def great_circle_km(lat1, lon1, lat2, lon2):
    """Haversine distance in km between points given in degrees (broadcasts)."""
    p1, p2 = np.deg2rad(lat1), np.deg2rad(lat2)
    dphi, dlam = p2 - p1, np.deg2rad(np.asarray(lon2) - np.asarray(lon1))
    a = np.sin(dphi / 2) ** 2 + np.cos(p1) * np.cos(p2) * np.sin(dlam / 2) ** 2
    return 2 * EARTH_RADIUS_KM * np.arcsin(np.sqrt(np.clip(a, 0, 1)))


def _parabola(fm, f0, fp) -> float:
    """Offset in cells of the vertex of the parabola through (-1, fm), (0, f0), (1, fp), clamped to +-0.5."""
    den = fm - 2 * f0 + fp
    if not np.isfinite(den) or den <= 0:
        return 0.0
    return float(np.clip(0.5 * (fm - fp) / den, -0.5, 0.5))


def find_minimum(field, lat, lon, center, radius_km: float):
    """``(lat, lon, value)`` of the minimum of ``field [lat, lon]`` within ``radius_km`` of ``center``.

    Sub-grid refined (see the module doc); NaNs when no grid point lies
    within the radius.
    """
    lat, lon = np.asarray(lat, np.float64), np.asarray(lon, np.float64)
    f = np.asarray(field, np.float64)
    d = great_circle_km(lat[:, None], lon[None, :], center[0], center[1])
    masked = np.where(d <= radius_km, f, np.inf)
    if not np.isfinite(masked).any():
        return np.nan, np.nan, np.nan
    i, j = np.unravel_index(np.argmin(masked), f.shape)
    nlon = lon.size
    dj = _parabola(f[i, (j - 1) % nlon], f[i, j], f[i, (j + 1) % nlon])
    di = _parabola(f[i - 1, j], f[i, j], f[i + 1, j]) if 0 < i < lat.size - 1 else 0.0
    dlat = (lat[min(i + 1, lat.size - 1)] - lat[max(i - 1, 0)]) / (min(i + 1, lat.size - 1) - max(i - 1, 0))
    dlon = 360.0 / nlon
    return float(lat[i] + di * dlat), float((lon[j] + dj * dlon) % 360.0), float(f[i, j])


def follow(fields, lat, lon, start, radius_km: float):
    """Track through ``fields [lead, lat, lon]`` from ``start``: ``(lat [lead], lon [lead], value [lead])``."""
    n = fields.shape[0]
    out = np.full((3, n), np.nan)
    pos = (float(start[0]), float(start[1]) % 360.0)
    for t in range(n):
        la, lo, v = find_minimum(fields[t], lat, lon, pos, radius_km)
        if not np.isfinite(la):
            break  # lost: no grid point within the radius
        out[:, t] = la, lo, v
        pos = (la, lo)
    return out[0], out[1], out[2]


def find_low(field, lat, lon, lat_band=(25.0, 70.0), smooth_anomaly: bool = True):
    """``(lat, lon)`` of the deepest low in a latitude band: the minimum of ``field`` minus its zonal mean."""
    f = np.asarray(field, np.float64)
    lat = np.asarray(lat, np.float64)
    a = f - f.mean(axis=1, keepdims=True) if smooth_anomaly else f
    band = (lat >= min(lat_band)) & (lat <= max(lat_band))
    a = np.where(band[:, None], a, np.inf)
    i, j = np.unravel_index(np.argmin(a), a.shape)
    return float(lat[i]), float(np.asarray(lon)[j])


def _mean_position(lat, lon):
    """Mean position on the sphere of points ``[member]`` (NaNs ignored)."""
    p, l = np.deg2rad(lat), np.deg2rad(lon)
    xyz = np.stack([np.cos(p) * np.cos(l), np.cos(p) * np.sin(l), np.sin(p)])
    m = np.nanmean(xyz, axis=1)
    return float(np.rad2deg(np.arctan2(m[2], np.hypot(m[0], m[1])))), float(np.rad2deg(np.arctan2(m[1], m[0])) % 360)


def track_forecast(forecast, start, radius_km: float = 600.0, *, truth=None, init=None, variable=None):
    """Tracks of every member of one initial condition of ``forecast`` (path or Dataset), and of the truth.

    Returns an ``xarray.Dataset`` (see the module doc). ``init``: an init time
    (default the first); ``variable``: the pressure variable (default ``msl``,
    else ``sp``); ``truth``: a store path (default the forecast's ``store``
    attribute when it exists, else no truth track).
    """
    import xarray as xr

    path = forecast if isinstance(forecast, (str, Path)) else "forecast"
    fc = read_forecast(forecast) if isinstance(forecast, (str, Path)) else forecast
    have = forecast_channels(fc)
    variable = variable or next((v for v in PRESSURE_VARIABLES if v in have), None)
    if variable is None or variable not in have:
        raise ForecastError(f"{path}: no pressure variable to track ({variable or ' or '.join(PRESSURE_VARIABLES)});"
                            f" it has {have}")
    if not (-90 <= start[0] <= 90):
        raise ForecastError(f"--start {start}: latitude must be within -90..90")
    if radius_km <= 0:
        raise ForecastError(f"--radius-km must be > 0, got {radius_km}")
    inits = fc["init_time"].values.astype("datetime64[ns]")
    i = 0
    if init is not None:
        t = np.datetime64(init, "ns")
        if t not in set(inits):
            raise ForecastError(f"{path}: init time {init} not in the forecast (has {inits[0]} .. {inits[-1]})")
        i = int(np.nonzero(inits == t)[0][0])
    lat, lon = fc["lat"].values, fc["lon"].values
    x = np.asarray(fc[variable].isel(init_time=i).values, np.float64)  # [lead, (member), lat, lon]
    if x.ndim == 3:
        x = x[:, None]
    n_lead, n_mem = x.shape[:2]
    tr = np.stack([np.stack(follow(x[:, m], lat, lon, start, radius_km)) for m in range(n_mem)])  # [m, 3, lead]
    lead = fc["lead_time"].values
    data = {
        "track_lat": (("member", "lead_time"), tr[:, 0], {"units": "degrees_north"}),
        "track_lon": (("member", "lead_time"), tr[:, 1], {"units": "degrees_east"}),
        "track_pressure": (("member", "lead_time"), tr[:, 2], {"units": "Pa", "long_name": f"minimum {variable}"}),
    }
    store = truth if truth is not None else fc.attrs.get("store")
    if store:
        from fcn_jax.data.store import open_store

        ds = open_store(store)
        names = [str(c) for c in ds["channel"].values]
        if variable not in names:
            raise ForecastError(f"truth store {store}: no channel {variable!r} (it has {names})")
        st = ds["time"].values.astype("datetime64[ns]")
        valid = inits[i] + lead
        ok = np.isin(valid, st)
        y = np.full((n_lead, len(lat), len(lon)), np.nan)
        if ok.any():
            y[ok] = ds["fields"].sel(channel=variable, time=valid[ok]).transpose("time", "lat", "lon").values
        n_ok = int(np.argmin(ok)) if not ok.all() else n_lead  # truth up to the first missing time
        tl = np.full((3, n_lead), np.nan)
        if n_ok:
            tl[:, :n_ok] = np.stack(follow(y[:n_ok], lat, lon, start, radius_km))
        err = great_circle_km(tr[:, 0], tr[:, 1], tl[0][None], tl[1][None])
        mean_pos = np.array([_mean_position(tr[:, 0, t], tr[:, 1, t]) if np.isfinite(tr[:, 0, t]).any()
                             else (np.nan, np.nan) for t in range(n_lead)])
        data.update({
            "truth_lat": (("lead_time",), tl[0], {"units": "degrees_north"}),
            "truth_lon": (("lead_time",), tl[1], {"units": "degrees_east"}),
            "truth_pressure": (("lead_time",), tl[2], {"units": "Pa"}),
            "track_error_km": (("member", "lead_time"), err, {"units": "km",
                                                              "long_name": "great-circle distance to the truth"}),
            "ensemble_mean_track_error_km": (("lead_time",), great_circle_km(mean_pos[:, 0], mean_pos[:, 1], tl[0],
                                                                             tl[1]),
                                             {"units": "km", "long_name": "error of the members' mean position"}),
        })
    out = xr.Dataset(data, coords={"member": np.arange(n_mem), "lead_time": lead})
    out.attrs.update({"init_time": str(inits[i]), "start_lat": float(start[0]), "start_lon": float(start[1]),
                      "radius_km": float(radius_km), "variable": variable, "forecast": str(path)})
    return out


def write_tracks(tracks, out_dir, *, background=None, lat=None, lon=None) -> list[Path]:
    """``tracks.csv``, ``tracks.nc`` and ``tracks.png`` in ``out_dir`` (each atomically)."""
    import io

    from fcn_jax.plots import plot_tracks

    out_dir = Path(out_dir)
    hours = tracks["lead_time"].values / np.timedelta64(1, "h")
    rows = ["init_time,member,lead_time_hours,lat,lon,pressure"]
    series = [(int(m), tracks["track_lat"].values[k], tracks["track_lon"].values[k],
               tracks["track_pressure"].values[k]) for k, m in enumerate(tracks["member"].values)]
    if "truth_lat" in tracks:
        series.append((-1, tracks["truth_lat"].values, tracks["truth_lon"].values, tracks["truth_pressure"].values))
    for m, la, lo, p in series:
        for h, a, b, c in zip(hours, la, lo, p):
            rows.append(f"{tracks.attrs['init_time']},{m},{h:g},{a:.4f},{b:.4f},{c:.2f}")
    buf = io.StringIO("\n".join(rows) + "\n")
    paths = [atomic_write(out_dir / "tracks.csv", lambda tmp: Path(tmp).write_text(buf.getvalue())),
             atomic_write(out_dir / "tracks.nc", lambda tmp: tracks.to_netcdf(tmp, engine="netcdf4"))]
    title = (f"{tracks.attrs['variable']} minimum from {tracks.attrs['start_lat']:.1f}N "
             f"{tracks.attrs['start_lon']:.1f}E, init {tracks.attrs['init_time'][:16]}")
    paths.append(plot_tracks(tracks, out_dir / "tracks.png", background=background, lat=lat, lon=lon, title=title))
    return paths


def format_track_errors(tracks, leads_h=(0, 24, 48, 72, 96, 120)) -> str:
    """Track error (km) against lead: members' mean error and the ensemble-mean position's error."""
    if "track_error_km" not in tracks:
        return "(no truth track)"
    hours = list(tracks["lead_time"].values / np.timedelta64(1, "h"))
    lines = [f"{'lead':>6} | {'mean member error [km]':>22} | {'ens.-mean position error [km]':>29} | lost"]
    for h in leads_h:
        if float(h) not in hours:
            continue
        j = hours.index(float(h))
        e = tracks["track_error_km"].values[:, j]
        lines.append(f"{h:>4g} h | {np.nanmean(e) if np.isfinite(e).any() else np.nan:>22.0f} | "
                     f"{float(tracks['ensemble_mean_track_error_km'].values[j]):>29.0f} | "
                     f"{int((~np.isfinite(e)).sum())}/{e.size}")
    return "\n".join(lines)


def _background(fc, tracks, truth=None):
    """The pressure field at the initial time for the map: the truth's, else the members' mean at lead 0."""
    var, t0 = tracks.attrs["variable"], np.datetime64(tracks.attrs["init_time"], "ns")
    store = truth or fc.attrs.get("store")
    if store:
        from fcn_jax.data.store import open_store

        ds = open_store(store)
        if t0 in set(ds["time"].values.astype("datetime64[ns]")):
            return np.asarray(ds["fields"].sel(channel=var, time=t0).values)
    f = fc[var].sel(init_time=t0).isel(lead_time=0)
    return np.asarray((f.mean("member") if "member" in f.dims else f).values)


def _latlon(s: str):
    try:
        a, b = (float(v) for v in s.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"--start {s!r}: give LAT,LON in degrees, e.g. 45,300") from None
    return a, b


def main(argv=None) -> int:
    ap = cli.parser("track", __doc__)
    ap.add_argument("forecast", help="forecast file (.nc / .zarr) with msl or sp")
    ap.add_argument("--start", type=_latlon, required=True, help="LAT,LON of the low at the initial time (write --start=-40,300 for a negative latitude)")
    ap.add_argument("--radius-km", type=float, default=600.0, help="search radius per step (default 600 km)")
    cli.add_store(ap, help="store (or 'world') for the truth track (default: the forecast's store)")
    ap.add_argument("--truth", dest="store", default=None, help=argparse.SUPPRESS)  # the name before --store
    ap.add_argument("--init", default=None, help="init time to track (default: the first)")
    ap.add_argument("--variable", default=None, help="pressure variable (default msl, else sp)")
    ap.add_argument("--out", default=None, help="output directory (default: the forecast's directory)")
    cli.add_experiment(ap, positional=False,
                       help="the experiment whose world --store world means (its data.world_seed)")
    args = cli.parse(ap, argv)

    def body() -> None:
        truth = cli.resolve_store(args.store, cli.load_experiment(args, required=False))
        tracks = track_forecast(args.forecast, args.start, args.radius_km, truth=truth, init=args.init,
                                variable=args.variable)
        out = Path(args.out) if args.out else Path(args.forecast).resolve().parent
        fc = read_forecast(args.forecast)
        bg = _background(fc, tracks, truth)
        paths = write_tracks(tracks, out, background=bg, lat=fc["lat"].values, lon=fc["lon"].values)
        print(format_track_errors(tracks))
        print("wrote " + ", ".join(map(str, paths)))

    return cli.run(body)


if __name__ == "__main__":
    sys.exit(main())
