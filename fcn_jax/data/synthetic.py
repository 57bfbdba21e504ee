"""Small source files in every supported format, with known contents.

Used by the tests (end-to-end checks of values, units, orientation and
channel order) and by ``bench/bench_data.py`` (a 0.25-degree-shaped store
made up on disk). The values are an analytic function of (time, channel, lat,
lon) -- :func:`truth` -- so any reader mistake (flipped latitude, rolled
longitude, swapped channels, a missed unit conversion) shows as a mismatch.

Writers mimic the real files' conventions (spec/evaluation.md §8,
fourcastnet-model.md §11): CDS netCDF new (``valid_time``, ``pressure_level``,
``number``/``expver`` coordinates, float32) and legacy (``time`` in hours since
1900, ``level``, int16 packed with scale/offset/_FillValue); WeatherBench 2
zarr (long names, ``level``, optionally ``(time, level, longitude, latitude)``
dimension order and ascending latitude); FourCastNet HDF5 year files
(``fields`` (n, 21, lat, lon)).
"""

from __future__ import annotations

import os
import zlib
from pathlib import Path
from typing import Sequence

import numpy as np
import xarray as xr

from fcn_jax.data.channels import STANDARD_GRAVITY, Channel, resolve_channels

# Typical magnitude (base, spread) per catalogue unit, so values look physical.
_SCALE = {
    "m s**-1": (0.0, 10.0), "K": (260.0, 20.0), "Pa": (98000.0, 2000.0), "m**2 s**-2": (50000.0, 3000.0),
    "%": (50.0, 20.0), "kg m**-2": (20.0, 10.0), "kg kg**-1": (0.005, 0.003), "Pa s**-1": (0.0, 0.5),
    "m": (0.001, 0.001),
}  # fmt: skip


def grid(n_lat: int, n_lon: int, *, poles: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """Regular grid, latitude north -> south, longitude 0 -> 360."""
    if poles:
        lat = np.linspace(90.0, -90.0, n_lat)
    else:
        d = 180.0 / n_lat
        lat = np.linspace(90.0 - d / 2, -90.0 + d / 2, n_lat)
    lon = np.arange(n_lon) * (360.0 / n_lon)
    return lat, lon


def six_hourly(start: str, n: int) -> np.ndarray:
    return np.datetime64(start, "ns") + np.arange(n) * np.timedelta64(6, "h").astype("timedelta64[ns]")


def _spatial(lat: np.ndarray, lon: np.ndarray) -> np.ndarray:
    la = np.deg2rad(np.asarray(lat))[:, None]
    lo = np.deg2rad(np.asarray(lon))[None, :]
    return la / (np.pi / 2) + 0.5 * np.cos(lo) + 0.3 * np.sin(lo)  # distinguishes every flip/roll


def _channel_values(c: Channel, hours: np.ndarray, spatial: np.ndarray) -> np.ndarray:
    """[time, lat, lon] float32 for one channel."""
    base, spread = _SCALE[c.units]
    # Channel-specific pattern that depends on the name, not the position, so
    # any subset or reordering of channels has the same values per channel.
    j = zlib.crc32(c.name.encode()) % 23
    k = 1.0 + 0.1 * j + (c.level or 0) / 1000.0
    out = np.empty((len(hours),) + spatial.shape, np.float32)
    for ti, h in enumerate(hours):
        out[ti] = base + spread * (k * spatial + 0.2 * np.sin(2 * np.pi * h / 120.0) + 0.01 * j)
    return out


def _hours(times: np.ndarray) -> np.ndarray:
    return (np.asarray(times).astype("datetime64[ns]") - np.datetime64("2000-01-01", "ns")) / np.timedelta64(1, "h")


def truth(times: np.ndarray, channels: Sequence[str] | Sequence[Channel], lat: np.ndarray,
          lon: np.ndarray) -> np.ndarray:
    """Known field values, catalogue units: x: [time, channel, lat, lon] float32."""
    chans = [c if isinstance(c, Channel) else None for c in channels]
    if any(c is None for c in chans):
        chans = resolve_channels([str(c) for c in channels])
    hours, spatial = _hours(times), _spatial(lat, lon)
    out = np.empty((len(hours), len(chans), len(lat), len(lon)), np.float32)
    for ci, c in enumerate(chans):
        out[:, ci] = _channel_values(c, hours, spatial)
    return out


def synthetic_source(times: np.ndarray, channels, lat: np.ndarray, lon: np.ndarray, *,
                     noise: float = 0.0, seed: int = 0):
    """A lazy :class:`~fcn_jax.data.readers.CanonicalSource` of :func:`truth` values.

    Nothing is held in memory: blocks are computed on read, so it can stand in
    for a 0.25-degree source (benchmarks). ``noise`` adds uniform noise of that
    fraction of each channel's spread (deterministic per time step), which
    makes compression behave more like real data.
    """
    from fcn_jax.data.readers.pieces import Piece
    from fcn_jax.data.readers.source import assemble

    chans = resolve_channels(channels) if not (channels and isinstance(channels[0], Channel)) else list(channels)
    times = np.asarray(times).astype("datetime64[ns]")
    hours, spatial = _hours(times), _spatial(lat, lon)
    lat_a, lon_a = np.asarray(lat, np.float64), np.asarray(lon, np.float64)

    def reader_for(ci: int, c: Channel):
        def read(a: int, b: int) -> np.ndarray:
            x = _channel_values(c, hours[a:b], spatial)
            if noise:
                spread = _SCALE[c.units][1]
                for i in range(b - a):
                    rng = np.random.default_rng((seed, a + i, ci))
                    x[i] += (rng.random(spatial.shape, dtype=np.float32) - 0.5) * np.float32(noise * spread)
            return x
        return read

    pieces = [Piece(c, "<synthetic>", c.name, times, lat_a, lon_a, reader_for(i, c)) for i, c in enumerate(chans)]
    return assemble(chans, pieces, source_kind="synthetic", files=["<synthetic>"])


def _split(channels: Sequence[Channel]) -> tuple[list[Channel], dict[str, list[Channel]]]:
    surface = [c for c in channels if not c.is_pressure_level]
    pl: dict[str, list[Channel]] = {}
    for c in channels:
        if c.is_pressure_level:
            pl.setdefault(c.cds_short, []).append(c)
    return surface, pl


def _levels(pl: dict[str, list[Channel]]) -> list[int]:
    return sorted({c.level for cs in pl.values() for c in cs})  # type: ignore[misc]


def write_cds(directory: str | os.PathLike, times: np.ndarray, channels, lat: np.ndarray, lon: np.ndarray, *,
              convention: str = "new", lat_ascending: bool = False, lon_180: bool = False,
              geopotential_height: bool = False, prefix: str = "era5", values: np.ndarray | None = None,
              extra_levels: Sequence[int] = ()) -> list[str]:
    """Write CDS-style netCDF: one single-level file and one pressure-level file.

    ``convention='new'``: valid_time (seconds since 1970), pressure_level,
    scalar ``number``, ``expver`` per time, float32. ``'legacy'``: time (hours
    since 1900), level, int16 packed with scale_factor/add_offset/_FillValue.
    Every pressure-level variable is written on the union of levels (plus
    ``extra_levels``), as a CDS request would. ``values`` overrides
    :func:`truth` (same layout). Returns the paths written.
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    chans = resolve_channels(channels) if not (channels and isinstance(channels[0], Channel)) else list(channels)
    x = truth(times, chans, lat, lon) if values is None else values
    surface, pl = _split(chans)
    levels = sorted(set(_levels(pl)) | set(extra_levels))
    new = convention == "new"
    tname, lname = ("valid_time", "pressure_level") if new else ("time", "level")
    la, lo = np.asarray(lat, np.float64), np.asarray(lon, np.float64)
    if lat_ascending:
        x, la = x[:, :, ::-1], la[::-1]
    if lon_180:
        order = np.argsort(np.where(lo >= 180.0, lo - 360.0, lo), kind="stable")
        x, lo = x[..., order], np.where(lo >= 180.0, lo - 360.0, lo)[order]
    coords = {tname: np.asarray(times).astype("datetime64[ns]"),
              "latitude": ("latitude", la, {"units": "degrees_north"}),
              "longitude": ("longitude", lo, {"units": "degrees_east"})}
    if new:
        coords["number"] = 0
        coords["expver"] = (tname, np.array(["0001"] * len(times)))
    tenc = ({"units": "seconds since 1970-01-01", "dtype": "int64"} if new
            else {"units": "hours since 1900-01-01 00:00:00.0", "dtype": "int32", "calendar": "gregorian"})

    def enc(v: np.ndarray) -> dict:
        if new:
            return {"dtype": "float32", "zlib": True, "complevel": 1}
        lo_v, hi_v = float(np.nanmin(v)), float(np.nanmax(v))
        # keep the packed range off -32767, the fill value
        scale = (hi_v - lo_v) / (2**16 - 4) or 1.0
        return {"dtype": "int16", "scale_factor": scale, "add_offset": (hi_v + lo_v) / 2, "_FillValue": -32767}

    paths = []
    if surface:
        data = {}
        for c in surface:
            v = x[:, chans.index(c)]
            data[c.cds_short] = ((tname, "latitude", "longitude"), v, {"units": c.units, "long_name": c.long_name})
        ds = xr.Dataset(data, coords=coords)
        p = directory / f"{prefix}_single_levels.nc"
        ds.to_netcdf(p, engine="netcdf4", encoding={**{k: enc(ds[k].values) for k in data}, tname: tenc})
        paths.append(str(p))
    if pl:
        data = {}
        for var, cs in pl.items():
            arr = np.full((len(times), len(levels), len(la), len(lo)), np.float32(0))
            for li, lev in enumerate(levels):
                hit = [c for c in cs if c.level == lev]
                arr[:, li] = x[:, chans.index(hit[0])] if hit else x[:, chans.index(cs[0])] * 0.5 + 1.0
            name, units, attrs = var, cs[0].units, {}
            if var == "z" and geopotential_height:
                name, units = "gh", "m"
                arr = arr / STANDARD_GRAVITY
            attrs = {"units": units, "long_name": cs[0].long_name.split(" at ")[0]}
            data[name] = ((tname, lname, "latitude", "longitude"), arr, attrs)
        ds = xr.Dataset(data, coords={**coords, lname: (lname, np.asarray(levels, np.float64 if new else np.int32),
                                                        {"units": "hPa"})})
        p = directory / f"{prefix}_pressure_levels.nc"
        ds.to_netcdf(p, engine="netcdf4", encoding={**{k: enc(ds[k].values) for k in data}, tname: tenc})
        paths.append(str(p))
    return paths


def write_wb2(path: str | os.PathLike, times: np.ndarray, channels, lat: np.ndarray, lon: np.ndarray, *,
              lon_lat_order: bool = False, lat_ascending: bool = False, zarr_format: int = 2,
              values: np.ndarray | None = None, append: bool = False) -> str:
    """Write a WeatherBench 2-style zarr store (long names, ``level`` in hPa).

    ``lon_lat_order`` writes dims (time, [level,] longitude, latitude) as the
    older 64x32 WB2 stores do. ``values`` overrides :func:`truth`; ``append``
    adds the times to an existing store (written in pieces).
    """
    chans = resolve_channels(channels) if not (channels and isinstance(channels[0], Channel)) else list(channels)
    x = truth(times, chans, lat, lon) if values is None else values
    la = np.asarray(lat, np.float64)
    if lat_ascending:
        x, la = x[:, :, ::-1], la[::-1]
    surface, pl = _split(chans)
    levels = _levels(pl)
    sdims = ("time", "longitude", "latitude") if lon_lat_order else ("time", "latitude", "longitude")
    pdims = ("time", "level", "longitude", "latitude") if lon_lat_order else ("time", "level", "latitude", "longitude")
    data = {}
    for c in surface:
        v = x[:, chans.index(c)]
        data[c.wb2_name] = (sdims, np.swapaxes(v, 1, 2) if lon_lat_order else v, {"units": c.units})
    for var, cs in pl.items():
        arr = np.zeros((len(times), len(levels), len(la), len(lon)), np.float32)
        for li, lev in enumerate(levels):
            hit = [c for c in cs if c.level == lev]
            arr[:, li] = x[:, chans.index(hit[0])] if hit else -1.0
        data[cs[0].wb2_name] = (pdims, np.swapaxes(arr, 2, 3) if lon_lat_order else arr, {"units": cs[0].units})
    ds = xr.Dataset(data, coords={"time": np.asarray(times).astype("datetime64[ns]"), "level": np.asarray(levels, np.int64),
                                  "latitude": la, "longitude": np.asarray(lon, np.float64)})
    ds = ds.chunk({"time": 1})
    if append:
        ds.to_zarr(path, append_dim="time", zarr_format=zarr_format, consolidated=True)
    else:
        ds.to_zarr(path, mode="w", zarr_format=zarr_format, consolidated=True)
    return str(path)


def write_fcn_hdf5(directory: str | os.PathLike, years: Sequence[int], n_per_year: int, lat: np.ndarray,
                   lon: np.ndarray, *, layout: Sequence[str | None] | None = None, chunks: bool = False) -> list[str]:
    """Write FourCastNet-style ``<year>.h5`` files with dataset ``fields`` (n, 21, lat, lon).

    The unused 21st channel holds a constant. Time is 6-hourly from 1 January.
    """
    import h5py

    from fcn_jax.data.channels import FCN_HDF5_LAYOUT

    layout = list(FCN_HDF5_LAYOUT if layout is None else layout)
    names = [n for n in layout if n]
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    paths = []
    for y in years:
        times = six_hourly(f"{y:04d}-01-01T00", n_per_year)
        x = truth(times, names, lat, lon)
        full = np.full((n_per_year, len(layout), len(lat), len(lon)), 273.0, np.float32)
        j = 0
        for i, n in enumerate(layout):
            if n:
                full[:, i] = x[:, j]
                j += 1
        p = directory / f"{y}.h5"
        with h5py.File(p, "w") as f:
            f.create_dataset("fields", data=full, chunks=(1, 1, len(lat), len(lon)) if chunks else None)
        paths.append(str(p))
    return paths
