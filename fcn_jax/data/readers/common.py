"""Canonical form shared by all readers, and the checks every source must pass.

Every reader (CDS netCDF, WeatherBench 2 zarr, FourCastNet HDF5) produces a
:class:`CanonicalSource`: a lazy, labelled view of the data as

    fields: [time, channel, lat, lon]   float32, SI units as in ERA5
    lat:    north -> south (descending)
    lon:    0 -> 360 (ascending, [0, 360))
    time:   datetime64[ns], strictly increasing

built from *pieces*, one per (channel, file). Nothing is read until
:meth:`CanonicalSource.read` (a block of time steps) or the dask array behind
:meth:`CanonicalSource.to_xarray` is computed, so a 0.25-degree multi-year
source costs no memory up front and a store can be written streaming.

Why not a single dask graph from the start: concatenating many files lazily
along time and channel builds a graph whose size grows with the data; computing
one block at a time from such a graph costs O(graph) per block. Pieces with
explicit time ranges keep a block read O(1).

HDF5 and netCDF-C are not thread-safe (spec/jax-notes.md §9): every read goes
through :data:`HDF5_LOCK`, xarray's own process-wide lock. xarray's netCDF4
backend takes it internally around opens and reads; our h5py reads take it
explicitly, so both libraries' calls into libhdf5 are serialised together.
"""

from __future__ import annotations

import dataclasses
import json
import re
from typing import Callable, Sequence

import numpy as np
import xarray as xr

from fcn_jax.data.channels import STANDARD_GRAVITY, Channel
from fcn_jax.data.errors import DataError

try:  # the lock xarray's netCDF4/h5netcdf backends take around libhdf5 calls
    from xarray.backends.locks import HDF5_LOCK
except ImportError:  # pragma: no cover - xarray always has it today
    import threading

    HDF5_LOCK = threading.Lock()

# Dimension names accepted for each canonical dimension (spec/evaluation.md §8.3):
# select dimensions by name, never by position.
TIME_NAMES = ("valid_time", "time")
LEVEL_NAMES = ("pressure_level", "level", "isobaricInhPa", "plev")
LAT_NAMES = ("latitude", "lat")
LON_NAMES = ("longitude", "lon")


# --------------------------------------------------------------------------- units
def _unit_key(u: str) -> str:
    """Normalise a unit string for comparison: 'm s**-1', 'm s-1', 'm/s' -> 'ms-1'."""
    u = u.strip().replace("**", "").replace("^", "").replace(" ", "").replace(".", "")
    u = u.replace("metre", "m").replace("meter", "m")
    # a/b/c -> a b-1 c-1 for the simple cases met in files
    if "/" in u:
        head, *tail = u.split("/")
        u = head + "".join(re.sub(r"^([a-zA-Z]+)(\d*)$", lambda m: f"{m.group(1)}-{m.group(2) or '1'}", t)
                           for t in tail)
    return u.lower()


_EQUIV: dict[str, set[str]] = {
    "m s**-1": {"ms-1"},
    "K": {"k", "kelvin", "degk"},
    "Pa": {"pa", "pascal"},
    "m**2 s**-2": {"m2s-2"},
    "%": {"%", "percent"},
    "kg m**-2": {"kgm-2", "mm"},
    "kg kg**-1": {"kgkg-1", "1"},
    "Pa s**-1": {"pas-1"},
    "m": {"m"},
}

#: (expected units, unit key found) -> (scale, offset, note); value_si = raw * scale + offset
_CONVERSIONS: dict[tuple[str, str], tuple[float, float, str]] = {
    ("m**2 s**-2", "m"): (STANDARD_GRAVITY, 0.0, "geopotential height (m) x g"),
    ("m**2 s**-2", "gpm"): (STANDARD_GRAVITY, 0.0, "geopotential height (gpm) x g"),
    ("Pa", "hpa"): (100.0, 0.0, "hPa -> Pa"),
    ("K", "degc"): (1.0, 273.15, "degC -> K"),
    ("K", "c"): (1.0, 273.15, "degC -> K"),
}


def unit_conversion(found: str | None, channel: Channel, where: str) -> tuple[float, float, str]:
    """Scale and offset that turn values in units ``found`` into ``channel.units``.

    A variable without a ``units`` attribute is taken to be in the catalogue's
    units (WB2 and CDS files always carry units; hand-made files often do not).

    Raises:
      DataError: units that are neither equivalent nor convertible.
    """
    if found is None or str(found).strip() == "":
        return 1.0, 0.0, ""
    key = _unit_key(str(found))
    expected = channel.units
    if key in _EQUIV.get(expected, set()) or key == _unit_key(expected):
        return 1.0, 0.0, ""
    conv = _CONVERSIONS.get((expected, key))
    if conv is not None:
        return conv
    raise DataError(
        f"{where}: units {found!r} cannot be converted to {expected!r} "
        f"(channel {channel.name}, {channel.long_name})"
    )


# ---------------------------------------------------------------- dims and grid
def standardize(ds: xr.Dataset, where: str) -> xr.Dataset:
    """Rename dimensions/coordinates to (time, level, lat, lon) and tidy extras.

    * ``valid_time``/``time`` -> ``time``; ``pressure_level``/``level`` -> ``level``;
      ``latitude``/``longitude`` -> ``lat``/``lon``.
    * ``number`` (ensemble member): a length-1 dimension is dropped; more than
      one member is an error (prepare one member at a time).
    * ``expver`` as a *coordinate* (new CDS) is dropped; as a *dimension*
      (legacy files mixing ERA5 and ERA5T) it is kept and merged at read time,
      taking the first non-missing value.
    * Other non-dimension coordinates are dropped.
    """
    rename: dict[str, str] = {}
    for canon, names in (("time", TIME_NAMES), ("level", LEVEL_NAMES),
                         ("lat", LAT_NAMES), ("lon", LON_NAMES)):  # fmt: skip
        present = [n for n in names if n in ds.dims or n in ds.coords]
        dims_present = [n for n in present if n in ds.dims]
        if len(dims_present) > 1:
            raise DataError(f"{where}: both {dims_present} present; expected one {canon} dimension")
        pick = dims_present[0] if dims_present else (present[0] if present else None)
        if pick is not None and pick != canon:
            if canon in ds.variables:  # e.g. legacy 'time' coord next to 'valid_time'
                ds = ds.drop_vars(canon)
            rename[pick] = canon
    ds = ds.rename(rename)
    if "number" in ds.dims:
        if ds.sizes["number"] != 1:
            raise DataError(
                f"{where}: ensemble dimension 'number' has {ds.sizes['number']} members; "
                "expected a single (deterministic) member"
            )
        ds = ds.isel(number=0)
    keep_dims = {"time", "level", "lat", "lon", "expver"}
    drop = [c for c in ds.coords if c not in ds.dims or c not in keep_dims]
    drop = [c for c in drop if c not in ("time", "level", "lat", "lon")]
    ds = ds.drop_vars(drop, errors="ignore")
    for need in ("lat", "lon"):
        if need not in ds.dims:
            raise DataError(f"{where}: no {need} dimension; expected one of "
                            f"{LAT_NAMES if need == 'lat' else LON_NAMES} (dims: {dict(ds.sizes)})")
    if "time" not in ds.dims:
        raise DataError(f"{where}: no time dimension; expected one of {TIME_NAMES} (dims: {dict(ds.sizes)})")
    return ds


def orientation_indexers(lat: np.ndarray, lon: np.ndarray, where: str) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Index arrays putting lat north->south and lon into [0, 360) ascending.

    Returns (lat_index, lon_index, new_lat, new_lon).
    """
    lat = np.asarray(lat, dtype=np.float64)
    lon = np.asarray(lon, dtype=np.float64)
    if lat.ndim != 1 or lon.ndim != 1:
        raise DataError(f"{where}: expected 1-D latitude/longitude coordinates")
    d = np.diff(lat)
    if len(lat) > 1 and not (np.all(d > 0) or np.all(d < 0)):
        raise DataError(f"{where}: latitude is not monotonic; expected a regular lat-lon grid")
    if lat.size and (lat.max() > 90.0 + 1e-6 or lat.min() < -90.0 - 1e-6):
        raise DataError(f"{where}: latitude outside [-90, 90] ({lat.min()} .. {lat.max()})")
    lat_idx = np.argsort(-lat, kind="stable")
    lon_wrapped = np.mod(lon, 360.0)
    lon_wrapped[np.isclose(lon_wrapped, 360.0)] = 0.0
    lon_idx = np.argsort(lon_wrapped, kind="stable")
    new_lon = lon_wrapped[lon_idx]
    if np.any(np.diff(new_lon) <= 1e-9):
        raise DataError(f"{where}: duplicate longitudes after wrapping to [0, 360) "
                        "(e.g. both 0 and 360 present); expected each meridian once")
    return lat_idx, lon_idx, lat[lat_idx], new_lon


def _is_identity(idx: np.ndarray) -> bool:
    return bool(np.array_equal(idx, np.arange(idx.size)))


def _as_indexer(idx: np.ndarray) -> slice | np.ndarray:
    """A slice where possible: lazy backends index slices without copying."""
    if _is_identity(idx):
        return slice(None)
    if _is_identity(idx[::-1]):
        return slice(None, None, -1)
    return idx


# ---------------------------------------------------------------------- pieces
@dataclasses.dataclass
class Piece:
    """One channel's data from one file: a lazy reader of a time range.

    ``read(a, b)`` returns [b - a, lat, lon] float32 in canonical orientation
    and the catalogue's units, for time indices *local to this piece*.
    """

    channel: Channel
    path: str
    variable: str
    times: np.ndarray  # datetime64[ns], strictly increasing
    lat: np.ndarray  # north -> south
    lon: np.ndarray  # [0, 360)
    reader: Callable[[int, int], np.ndarray]
    note: str = ""

    @property
    def where(self) -> str:
        lvl = f" level {self.channel.level} hPa" if self.channel.level is not None else ""
        return f"{self.path} variable {self.variable!r}{lvl} (channel {self.channel.name})"


def xarray_piece(ds: xr.Dataset, channel: Channel, variable: str, path: str,
                 *, level_required: bool) -> Piece:
    """Build a :class:`Piece` from a standardised dataset (see :func:`standardize`).

    Reads are lazy: ``ds`` must be opened without dask chunks so that
    ``isel(...).values`` reads only the requested slice.
    """
    da = ds[variable]
    where = f"{path} variable {variable!r}"
    if level_required:
        if "level" not in da.dims:
            raise DataError(f"{where}: no pressure-level dimension; expected one of {LEVEL_NAMES} "
                            f"containing {channel.level} hPa (channel {channel.name})")
        levels = np.asarray(da["level"].values, dtype=np.float64)
        # Some files give levels in Pa (e.g. 50000) rather than hPa.
        if levels.size and levels.max() > 2000:
            levels = levels / 100.0
        hit = np.nonzero(np.isclose(levels, channel.level))[0]
        if hit.size == 0:
            raise DataError(
                f"{where}: level {channel.level} hPa missing (channel {channel.name}); "
                f"levels present: {sorted(levels.tolist())}"
            )
        da = da.isel(level=int(hit[0]))
    elif "level" in da.dims:
        if da.sizes["level"] != 1:
            raise DataError(f"{where}: single-level channel {channel.name} but variable has "
                            f"{da.sizes['level']} levels")
        da = da.isel(level=0)
    extra = [d for d in da.dims if d not in ("time", "lat", "lon", "expver")]
    if extra:
        raise DataError(f"{where}: unexpected dimensions {extra}; expected (time, [level], lat, lon)")
    lat_idx, lon_idx, lat, lon = orientation_indexers(da["lat"].values, da["lon"].values, where)
    da = da.isel(lat=_as_indexer(lat_idx), lon=_as_indexer(lon_idx))
    has_expver = "expver" in da.dims
    da = da.transpose("time", *(["expver"] if has_expver else []), "lat", "lon")
    units = da.attrs.get("units")
    if variable in ("gh", "geopotential_height") and units is None:
        units = "m"  # height without units: still height
    scale, offset, note = unit_conversion(units, channel, where)
    times = _decode_times(da["time"].values, where)

    def read(a: int, b: int) -> np.ndarray:
        try:
            # xarray's netCDF4 backend takes HDF5_LOCK itself around each read
            # (taking it here too would deadlock: it is not re-entrant).
            x = np.asarray(da.isel(time=slice(a, b)).values)
        except DataError:
            raise
        except Exception as e:  # truncated / corrupt file surfaces here
            raise DataError(f"{where}: cannot read time steps {a}..{b - 1}: {type(e).__name__}: {e}") from e
        if has_expver:
            # Legacy ERA5/ERA5T mix: each time is valid in exactly one expver.
            merged = x[:, 0]
            for j in range(1, x.shape[1]):
                merged = np.where(np.isnan(merged), x[:, j], merged)
            x = merged
        x = x.astype(np.float64) * scale + offset if (scale != 1.0 or offset != 0.0) else x
        return np.asarray(x, dtype=np.float32)

    return Piece(channel, path, variable, times, lat, lon, read, note)


def _decode_times(values: np.ndarray, where: str) -> np.ndarray:
    values = np.asarray(values)
    if not np.issubdtype(values.dtype, np.datetime64):
        raise DataError(f"{where}: time coordinate is not decodable to dates (dtype {values.dtype}); "
                        "expected CF units such as 'hours since 1900-01-01'")
    return values.astype("datetime64[ns]")


def fmt_time(t) -> str:
    return str(np.datetime_as_string(np.datetime64(t, "ns"), unit="m"))


# --------------------------------------------------------------------- checks
def check_times_increasing(times: np.ndarray, where: str) -> None:
    """Strictly increasing time axis; names the first duplicate or step back."""
    d = np.diff(times.astype("datetime64[ns]").astype(np.int64))
    bad = np.nonzero(d <= 0)[0]
    if bad.size:
        i = int(bad[0])
        what = "duplicate time" if d[i] == 0 else "time goes backwards at"
        raise DataError(f"{where}: {what} {fmt_time(times[i + 1])} (after {fmt_time(times[i])}); "
                        "expected strictly increasing times")


def infer_time_step(times: np.ndarray) -> np.timedelta64:
    """The most common spacing (the nominal step; gaps are larger)."""
    if times.size < 2:
        return np.timedelta64(6, "h").astype("timedelta64[ns]")
    d = np.diff(times.astype("datetime64[ns]")).astype(np.int64)
    vals, counts = np.unique(d, return_counts=True)
    return np.timedelta64(int(vals[np.argmax(counts)]), "ns")


def check_regular(times: np.ndarray, where: str, *, allow_gaps: bool = False,
                  allowed_gap: Callable[[np.datetime64, np.datetime64], bool] | None = None) -> np.timedelta64:
    """Check a regular time axis; returns its step.

    A gap (a spacing larger than the step) is an error unless ``allow_gaps`` or
    ``allowed_gap(before, after)`` says it is expected (e.g. the FourCastNet
    HDF5 leap-year files that stop on 30 December). Irregular spacings smaller
    than the step are always an error.
    """
    check_times_increasing(times, where)
    step = infer_time_step(times)
    d = np.diff(times.astype("datetime64[ns]")).astype(np.int64)
    s = int(step.astype(np.int64))
    for i in np.nonzero(d != s)[0]:
        i = int(i)
        before, after = times[i], times[i + 1]
        if d[i] % s == 0 and (allow_gaps or (allowed_gap is not None and allowed_gap(before, after))):
            continue
        hours = s / 3.6e12
        raise DataError(
            f"{where}: time gap between {fmt_time(before)} and {fmt_time(after)} "
            f"(expected a step of {hours:g} h; {int(d[i] // s) - 1 if d[i] % s == 0 else 'non-integer number of'} "
            f"steps missing)"
        )
    return step


def check_same_grid(a: Piece, b: Piece) -> None:
    """Pieces must share the lat/lon grid (after orientation) to the float32 rounding."""
    for name, x, y in (("latitude", a.lat, b.lat), ("longitude", a.lon, b.lon)):
        if x.shape != y.shape or not np.allclose(x, y, atol=1e-4, rtol=0):
            raise DataError(
                f"grid mismatch in {name}: {a.where} has {x.size} points "
                f"({x[:1].tolist()}..{x[-1:].tolist()}) but {b.where} has {y.size} "
                f"({y[:1].tolist()}..{y[-1:].tolist()}); expected the same grid in every file"
            )


# ------------------------------------------------------------ canonical source
class CanonicalSource:
    """Lazy canonical data: ``read(t0, t1) -> [T, C, lat, lon]`` float32.

    Built by :func:`assemble` from pieces. Attributes: ``channels`` (list of
    :class:`Channel`), ``times`` (datetime64[ns]), ``lat`` (north -> south),
    ``lon`` ([0, 360)), ``time_step``, ``attrs`` (provenance, for the store).
    """

    def __init__(self, channels: Sequence[Channel], times: np.ndarray, lat: np.ndarray,
                 lon: np.ndarray, segments: dict[str, list[tuple[int, int, Piece]]],
                 time_step: np.timedelta64, attrs: dict):
        self.channels = list(channels)
        self.times = times
        self.lat = lat
        self.lon = lon
        self._segments = segments  # channel -> [(global start, global stop, piece)]
        self.time_step = time_step
        self.attrs = attrs

    @property
    def channel_names(self) -> list[str]:
        return [c.name for c in self.channels]

    @property
    def shape(self) -> tuple[int, int, int, int]:
        return (len(self.times), len(self.channels), len(self.lat), len(self.lon))

    def sources_of(self, channel: str) -> list[str]:
        return [p.where for _, _, p in self._segments[channel]]

    def read(self, t0: int, t1: int) -> np.ndarray:
        """Time steps [t0, t1): x: [t1 - t0, channel, lat, lon] float32."""
        out = np.empty((t1 - t0, len(self.channels), len(self.lat), len(self.lon)), np.float32)
        for ci, ch in enumerate(self.channels):
            for s0, s1, piece in self._segments[ch.name]:
                a, b = max(t0, s0), min(t1, s1)
                if a < b:
                    out[a - t0:b - t0, ci] = piece.reader(a - s0, b - s0)
        return out

    def select_times(self, mask: np.ndarray) -> "CanonicalSource":
        """A view restricted to the time steps where ``mask`` is true."""
        idx = np.nonzero(mask)[0]
        return _SubsetSource(self, idx)

    def drop_last_lat_row(self) -> "CanonicalSource":
        return _RowDropSource(self)

    def to_xarray(self) -> xr.DataArray:
        """The canonical form as a lazy (dask) ``DataArray`` named ``fields``.

        x: [time, channel, lat, lon], one time step per chunk; ``channel`` holds
        the names and ``channel_units`` the units.
        """
        import dask.array as dsa

        arr = dsa.from_array(_BlockView(self), chunks=(1,) + self.shape[1:], asarray=False,
                             fancy=False, lock=False)
        return xr.DataArray(
            arr, dims=("time", "channel", "lat", "lon"), name="fields",
            coords={
                "time": self.times, "channel": self.channel_names,
                "channel_units": ("channel", [c.units for c in self.channels]),
                "lat": ("lat", self.lat, {"units": "degrees_north"}),
                "lon": ("lon", self.lon, {"units": "degrees_east"}),
            },
            attrs={k: v for k, v in self.attrs.items() if isinstance(v, (str, int, float))},
        )


class _SubsetSource(CanonicalSource):
    def __init__(self, parent: CanonicalSource, idx: np.ndarray):
        self._parent = parent
        self._idx = idx
        super().__init__(parent.channels, parent.times[idx], parent.lat, parent.lon,
                         parent._segments, parent.time_step, dict(parent.attrs))

    def read(self, t0: int, t1: int) -> np.ndarray:
        sel = self._idx[t0:t1]
        if sel.size == 0:
            return np.empty((0,) + self.shape[1:], np.float32)
        # Read contiguous runs of the parent in one go.
        out = []
        start = 0
        for k in range(1, sel.size + 1):
            if k == sel.size or sel[k] != sel[k - 1] + 1:
                out.append(self._parent.read(int(sel[start]), int(sel[k - 1]) + 1))
                start = k
        return np.concatenate(out, axis=0)

    def sources_of(self, channel: str) -> list[str]:
        return self._parent.sources_of(channel)


class _RowDropSource(CanonicalSource):
    def __init__(self, parent: CanonicalSource):
        self._parent = parent
        super().__init__(parent.channels, parent.times, parent.lat[:-1], parent.lon,
                         parent._segments, parent.time_step, dict(parent.attrs))

    def read(self, t0: int, t1: int) -> np.ndarray:
        return self._parent.read(t0, t1)[:, :, :-1, :]

    def sources_of(self, channel: str) -> list[str]:
        return self._parent.sources_of(channel)


class _BlockView:
    """Array-like over a CanonicalSource for dask.array.from_array (time slices only)."""

    def __init__(self, src: CanonicalSource):
        self._src = src
        self.shape = src.shape
        self.dtype = np.dtype(np.float32)
        self.ndim = 4

    def __getitem__(self, key):
        if not isinstance(key, tuple):
            key = (key,)
        t = key[0] if key else slice(None)
        t0, t1, step = t.indices(self.shape[0])
        block = self._src.read(t0, t1)[::step]
        return block[(slice(None),) + tuple(key[1:])]


def assemble(channels: Sequence[Channel], pieces: Sequence[Piece], *, source_kind: str,
             files: Sequence[str], allow_gaps: bool = False,
             allowed_gap: Callable[[np.datetime64, np.datetime64], bool] | None = None,
             extra_attrs: dict | None = None) -> CanonicalSource:
    """Check pieces against each other and build a :class:`CanonicalSource`.

    Checks: same grid everywhere; per channel, pieces do not overlap in time
    (a duplicate names both files); every channel has the same time axis
    (a missing time names the channel and its files); the joint axis is
    regular (gaps named unless allowed).
    """
    by_channel: dict[str, list[Piece]] = {c.name: [] for c in channels}
    for p in pieces:
        by_channel[p.channel.name].append(p)
    ref = pieces[0]
    for p in pieces[1:]:
        check_same_grid(ref, p)
    segments: dict[str, list[tuple[int, int, Piece]]] = {}
    axes: dict[str, np.ndarray] = {}
    for c in channels:
        ps = sorted(by_channel[c.name], key=lambda p: p.times[0] if p.times.size else np.datetime64("NaT"))
        for p in ps:
            check_times_increasing(p.times, p.where)
        for p, q in zip(ps, ps[1:]):
            dup = np.intersect1d(p.times, q.times)
            if dup.size:
                raise DataError(f"duplicate time {fmt_time(dup[0])}: present in both {p.where} and {q.where}; "
                                "expected each time step in exactly one file")
            if q.times.size and p.times.size and q.times[0] < p.times[-1]:
                raise DataError(f"files interleave in time: {p.where} and {q.where} overlap "
                                f"({fmt_time(q.times[0])} < {fmt_time(p.times[-1])})")
        segs, start = [], 0
        for p in ps:
            segs.append((start, start + p.times.size, p))
            start += p.times.size
        segments[c.name] = segs
        axes[c.name] = np.concatenate([p.times for p in ps]) if ps else np.array([], "datetime64[ns]")
    names = [c.name for c in channels]
    t_ref = axes[names[0]]
    for n in names[1:]:
        t = axes[n]
        if t.shape != t_ref.shape or not np.array_equal(t, t_ref):
            only_ref = np.setdiff1d(t_ref, t)
            only_n = np.setdiff1d(t, t_ref)
            if only_ref.size:
                msg = (f"channel {n} lacks time {fmt_time(only_ref[0])} that channel {names[0]} has "
                       f"({only_ref.size} missing)")
            else:
                msg = (f"channel {n} has time {fmt_time(only_n[0])} that channel {names[0]} lacks "
                       f"({only_n.size} extra)")
            raise DataError(f"{msg}; sources of {n}: {[p.where for *_, p in segments[n]]}; "
                            f"sources of {names[0]}: {[p.where for *_, p in segments[names[0]]]}")
    if t_ref.size == 0:
        raise DataError(f"no time steps in {list(files)}")
    step = check_regular(t_ref, f"{source_kind} sources {list(files)}", allow_gaps=allow_gaps,
                         allowed_gap=allowed_gap)
    attrs = {
        "source_kind": source_kind,
        "source_files": json.dumps([str(f) for f in files]),
        "channel_sources": json.dumps({c.name: [p.where for *_, p in segments[c.name]] for c in channels}),
        "unit_conversions": json.dumps({p.where: p.note for p in pieces if p.note}),
    }
    attrs.update(extra_attrs or {})
    return CanonicalSource(channels, t_ref, ref.lat, ref.lon, segments, step, attrs)


# ------------------------------------------------------------ variable lookup
#: Names a geopotential *height* variable goes by (converted x g on read).
GEOPOTENTIAL_HEIGHT_NAMES = ("gh", "geopotential_height")


def variable_candidates(channel: Channel, prefer: str) -> list[str]:
    """Variable names to try for a channel, most likely first.

    ``prefer`` is ``"cds"`` (short names such as ``z``) or ``"wb2"`` (long
    names such as ``geopotential``); the other spelling is tried next, so
    hand-made files in either style work with either reader.
    """
    names = [channel.cds_short, channel.wb2_name, channel.cds_request]
    if prefer == "wb2":
        names = [channel.wb2_name, channel.cds_request, channel.cds_short]
    if channel.cds_short == "z":
        names += list(GEOPOTENTIAL_HEIGHT_NAMES)
    out: list[str] = []
    for n in names:
        if n not in out:
            out.append(n)
    return out


def collect_pieces(datasets: Sequence[tuple[str, xr.Dataset]], channels: Sequence[Channel],
                   *, prefer: str) -> list[Piece]:
    """Find every (channel, file) piece; a channel absent from all files is an error."""
    pieces: list[Piece] = []
    for ch in channels:
        found = False
        wrong_shape: list[str] = []
        for path, ds in datasets:
            for var in variable_candidates(ch, prefer):
                if var not in ds.data_vars:
                    continue
                has_level = "level" in ds[var].dims
                if ch.is_pressure_level and not has_level:
                    wrong_shape.append(f"{path} variable {var!r} (no pressure-level dimension)")
                    continue
                if not ch.is_pressure_level and has_level and ds.sizes["level"] > 1:
                    wrong_shape.append(f"{path} variable {var!r} (has {ds.sizes['level']} levels)")
                    continue
                pieces.append(xarray_piece(ds, ch, var, path, level_required=ch.is_pressure_level))
                found = True
                break
        if not found:
            lvl = f" at {ch.level} hPa" if ch.is_pressure_level else ""
            hint = f"; unsuitable candidates: {wrong_shape}" if wrong_shape else ""
            present = {p: sorted(map(str, ds.data_vars)) for p, ds in datasets}
            raise DataError(
                f"channel {ch.name} ({ch.long_name}): variable {variable_candidates(ch, prefer)}{lvl} "
                f"not found in any source file{hint}; variables present: {present}"
            )
    return pieces
