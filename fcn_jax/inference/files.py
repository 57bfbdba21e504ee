"""Forecast files: the layout, atomic/incremental writing and checked reading.

The layout every forecast file of fcn_jax has, and every forecast file
:mod:`fcn_jax.evaluate` and :mod:`fcn_jax.track` accept (also ones made
elsewhere):

* dims ``(init_time, lead_time, [member], lat, lon)``; ``init_time``
  datetime64, ``lead_time`` timedelta64 (lead 0 = the initial condition),
  ``lat``/``lon`` in degrees;
* one float32 data variable per channel, physical units (CF ``units``,
  ``long_name``); ``valid_time = init_time + lead_time`` a 2-D coordinate
  (derived on reading when a file lacks it);
* global attribute ``Conventions = "CF-1.8"``.

Writing is incremental and atomic: :class:`ForecastWriter` creates the file's
skeleton under a temporary name next to the target, fills it chunk by chunk
(initial conditions x members; a large ensemble never sits in host memory),
and renames it into place on success. On any error the temporary file is
removed: no partial output is ever left behind. ``.nc`` is NetCDF-4 (netCDF4),
``.zarr`` a zarr directory.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np

from fcn_jax.errors import InputError
from fcn_jax.files import atomic_path, atomic_write

__all__ = [
    "ForecastError",
    "channel_attrs",
    "channel_units",
    "lead_times",
    "atomic_write",
    "atomic_path",
    "ForecastWriter",
    "forecast_to_dataset",
    "write_forecast",
    "read_forecast",
    "forecast_channels",
]


class ForecastError(InputError):
    """A forecast file, its request or its truth is not usable (the message names the value at fault)."""


# --------------------------------------------------------------------------- #
# Metadata
# --------------------------------------------------------------------------- #


def channel_attrs(name: str) -> dict[str, str]:
    """CF attributes of a channel from the catalogue (``units``, ``long_name``); ``{}`` if unknown."""
    from fcn_jax.data.channels import get_channel

    try:
        ch = get_channel(name)
    except Exception:
        return {}
    return {k: v for k, v in (("units", ch.units), ("long_name", ch.long_name)) if v}


def channel_units(names: Sequence[str]) -> list[str]:
    """Units of each channel (``""`` when the catalogue does not know it)."""
    return [channel_attrs(n).get("units", "") for n in names]


def lead_times(n_lead: int, step_hours: float) -> np.ndarray:
    """``[n_lead]`` timedelta64[ns]: ``0, dt, 2 dt, ...``."""
    return (np.arange(n_lead) * np.timedelta64(int(round(step_hours * 3600)), "s")).astype("timedelta64[ns]")


def _is_zarr(path) -> bool:
    return str(path).rstrip("/").endswith(".zarr")


def _check_suffix(path) -> None:
    s = str(path).rstrip("/")
    if not (s.endswith(".nc") or s.endswith(".zarr")):
        raise ForecastError(f"--out {path}: the output must end in .nc (NetCDF) or .zarr")


# --------------------------------------------------------------------------- #
# Incremental writer
# --------------------------------------------------------------------------- #


def _skeleton(init_times, n_lead, step_hours, lat, lon, members, attrs):
    import xarray as xr

    init = np.asarray(init_times, dtype="datetime64[ns]").reshape(-1)
    lead = lead_times(n_lead, step_hours)
    coords = {
        "init_time": ("init_time", init, {"long_name": "forecast initial time"}),
        "lead_time": ("lead_time", lead, {"long_name": "forecast lead time", "standard_name": "forecast_period"}),
        "lat": ("lat", np.asarray(lat, np.float32), {"units": "degrees_north", "standard_name": "latitude"}),
        "lon": ("lon", np.asarray(lon, np.float32), {"units": "degrees_east", "standard_name": "longitude"}),
        "valid_time": (("init_time", "lead_time"), init[:, None] + lead[None, :],
                       {"standard_name": "time", "long_name": "valid time = init_time + lead_time"}),
    }
    if members:
        coords["member"] = ("member", np.arange(members, dtype=np.int32), {"long_name": "ensemble member"})
    ds = xr.Dataset(coords=coords)
    ds.attrs.update({"Conventions": "CF-1.8", "source": "fcn_jax AFNO forecast"})
    ds.attrs.update({k: v for k, v in dict(attrs or {}).items() if v is not None})
    return ds


_TIME_ENCODING = {
    "init_time": {"units": "hours since 1970-01-01 00:00:00", "dtype": "float64"},
    "valid_time": {"units": "hours since 1970-01-01 00:00:00", "dtype": "float64"},
    "lead_time": {"units": "hours", "dtype": "float64"},
}


PARTIAL_SUFFIX = ".partial"


def partial_outputs(path) -> list[Path]:
    """The partial outputs (of any command) for ``path``: hidden ``.NAME.KEY.partial`` directories beside it."""
    path = Path(path)
    return sorted(path.parent.glob(f".{path.name}.*{PARTIAL_SUFFIX}")) if path.parent.is_dir() else []


def _dir_bytes(d: Path) -> int:
    return sum(f.stat().st_size for f in d.rglob("*") if f.is_file())


def _write_json_atomic(path: Path, obj) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=1, sort_keys=True)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


class ForecastWriter:
    """Write a forecast file chunk by chunk, resumably; the file appears at ``path`` only when complete.

    The chunks go to a staging zarr store in a hidden directory beside
    ``path``; :meth:`close` turns it into the file (a rename for ``.zarr``, a
    conversion for ``.nc``) and removes the directory.

    * Without ``resume_key`` the directory has a unique name and goes when an
      exception escapes (nothing is left behind).
    * With ``resume_key`` (a digest of everything that determines the values,
      see :func:`fcn_jax.forecast.resume_key`) it is ``.NAME.KEY.partial`` and
      is kept when the run stops: its ``journal.json`` lists the committed
      chunks (:meth:`commit`), and the same command started again skips them
      (:meth:`is_done`) and writes the rest -- the file is the one an
      uninterrupted run writes. Another command's partial output is never
      reused; :attr:`notes` names how it differs and how to remove it.

    An existing ``path`` is refused unless ``overwrite`` (then replaced only
    once the new file is complete). Use as a context manager.

    Args:
      path: ``*.nc`` or ``*.zarr``.
      init_times: ``[init_time]`` datetimes.
      n_lead: number of leads (steps + 1; lead 0 is the IC).
      step_hours: hours per lead step.
      lat, lon: coordinates in degrees.
      channels: channel names, one data variable each.
      members: ensemble size, or ``None``/0 for a deterministic file (no member dim).
      attrs: global attributes; ``var_attrs``: per-channel attribute overrides.
      overwrite: replace an existing ``path``.
      resume_key, resume_info: the partial output's key and a description of
        the command (compared with another partial's to say how they differ).
      check_space: refuse when the file system cannot hold the rest (uncompressed upper bound).
    """

    def __init__(self, path, *, init_times, n_lead: int, step_hours: float, lat, lon, channels: Sequence[str],
                 members: int | None = None, attrs: Mapping | None = None,
                 var_attrs: Mapping[str, Mapping] | None = None, overwrite: bool = False,
                 resume_key: str | None = None, resume_info: Mapping | None = None, check_space: bool = True):
        _check_suffix(path)
        self.path = Path(path)
        if self.path.exists() and not overwrite:
            raise ForecastError(f"--out {self.path} exists; pass --overwrite to replace it (the new file replaces "
                                f"it only once complete)")
        self.zarr = _is_zarr(path)
        self.channels = list(channels)
        self.members = int(members or 0)
        self.dims = ("init_time", "lead_time") + (("member",) if self.members else ()) + ("lat", "lon")
        self.shape = (len(np.atleast_1d(init_times)), n_lead) + ((self.members,) if self.members else ()) \
            + (len(lat), len(lon))
        self.nbytes = int(np.prod(self.shape)) * len(self.channels) * 4  # float32, uncompressed
        self.resumable = resume_key is not None
        self.notes: list[str] = []
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if self.resumable:
            self.partial = self.path.parent / f".{self.path.name}.{resume_key[:16]}{PARTIAL_SUFFIX}"
            self._note_other_partials(resume_info or {})
        else:
            self.partial = Path(tempfile.mkdtemp(prefix=f".{self.path.name}.", suffix=".tmp", dir=self.path.parent))
        self.staging = self.partial / "fields.zarr"
        self.journal_path = self.partial / "journal.json"
        self.done: set[str] = set()
        vattrs = {c: {**channel_attrs(c), **dict((var_attrs or {}).get(c, {}))} for c in self.channels}
        self.var_attrs = vattrs
        try:
            journal = json.loads(self.journal_path.read_text()) if self.journal_path.is_file() else None
            if journal is not None and journal.get("key") == resume_key and self.staging.is_dir():
                self.done = set(journal.get("done", []))
                self.notes.append(f"resuming {self.path} from {self.partial} ({len(self.done)} chunk(s) committed, "
                                  f"{_dir_bytes(self.partial) / 1e9:.2f} GB)")
            else:
                if self.partial.exists():  # a partial without its journal: never trusted
                    shutil.rmtree(self.partial)
                self.partial.mkdir(parents=True)
                self._check_space(check_space, overwrite)
                self._create(init_times, n_lead, step_hours, lat, lon, attrs)
            self._journal = {"key": resume_key, "info": dict(resume_info or {}), "done": sorted(self.done)}
            if self.resumable and not self.done:
                _write_json_atomic(self.journal_path, self._journal)
        except BaseException as e:
            if not self.done:  # nothing committed yet: no partial output worth keeping
                shutil.rmtree(self.partial, ignore_errors=True)
            self.abort(e)
            raise

    # ------------------------------------------------------------------ setup
    def _note_other_partials(self, info: Mapping) -> None:
        for other in partial_outputs(self.path):
            if other == self.partial:
                continue
            try:
                theirs = json.loads((other / "journal.json").read_text()).get("info", {})
            except (OSError, ValueError):
                theirs = {}
            diff = [f"{k} {theirs.get(k)!r} -> {info.get(k)!r}" for k in sorted(set(info) | set(theirs))
                    if theirs.get(k) != info.get(k)]
            self.notes.append(f"note: {other} ({_dir_bytes(other) / 1e9:.2f} GB) is another command's partial "
                              f"output and is not reused" + (f" (it differs in {'; '.join(diff[:6])})" if diff else "")
                              + f"; remove it with: rm -r '{other}'")

    def _check_space(self, check: bool, overwrite: bool) -> None:
        need = self.nbytes * (1 if self.zarr else 2)  # .nc: the staging store and the file
        free = shutil.disk_usage(self.partial).free
        self.notes.insert(0, f"output {self.path}: {' x '.join(map(str, self.shape))} x {len(self.channels)} "
                             f"channels, {self.nbytes / 1e9:.2f} GB uncompressed; {free / 1e9:.1f} GB free")
        if check and free < need:
            raise ForecastError(f"--out {self.path}: the forecast needs up to {need / 1e9:.2f} GB "
                                f"({'the staging store and the .nc file' if not self.zarr else 'uncompressed'}) but "
                                f"{self.path.parent} has {free / 1e9:.2f} GB free; free space, or write fewer "
                                f"members/steps/ICs")

    def _create(self, init_times, n_lead, step_hours, lat, lon, attrs) -> None:
        import dask.array as da

        ds = _skeleton(init_times, n_lead, step_hours, lat, lon, self.members, attrs)
        chunks = (1, 1) + ((1,) if self.members else ()) + self.shape[-2:]
        for c in self.channels:
            ds[c] = (self.dims, da.full(self.shape, np.nan, dtype=np.float32, chunks=chunks), self.var_attrs[c])
        enc = {c: {"dtype": "float32"} for c in self.channels}
        enc.update(_TIME_ENCODING)
        ds.to_zarr(self.staging, mode="w", compute=False, encoding=enc, consolidated=True)

    # ---------------------------------------------------------------- writing
    @staticmethod
    def chunk_id(init_index: int, member_start: int = 0) -> str:
        """The journal's name of a chunk: its first init index and first member."""
        return f"i{int(init_index)}m{int(member_start)}"

    def is_done(self, init_index: int, member_start: int = 0) -> bool:
        """Whether the chunk was committed by an earlier run of the same command."""
        return self.chunk_id(init_index, member_start) in self.done

    def commit(self, init_index: int, member_start: int = 0) -> None:
        """Record a chunk as complete (after all its :meth:`write` calls): a rerun skips it."""
        self.done.add(self.chunk_id(init_index, member_start))
        if self.resumable:
            self._journal["done"] = sorted(self.done)
            _write_json_atomic(self.journal_path, self._journal)

    def write(self, data, init_index: int | slice, member_start: int = 0, lead_start: int = 0) -> None:
        """Write ``data [n_init, lead, (member chunk), lat, lon, channel]`` (physical units, NumPy).

        ``init_index``: the first init index (or a slice) of the chunk;
        ``member_start``: the first member of the chunk (ensembles);
        ``lead_start``: the first lead of the chunk.
        """
        import xarray as xr

        data = np.asarray(data, np.float32)
        if data.ndim != len(self.dims) + 1 or data.shape[-1] != len(self.channels):
            raise ForecastError(f"{self.path}: chunk of shape {data.shape} does not fit dims {self.dims} + channel"
                                f" ({len(self.channels)} channels)")
        i0 = init_index.start if isinstance(init_index, slice) else int(init_index)
        if lead_start < 0 or lead_start + data.shape[1] > self.shape[1]:
            raise ForecastError(f"{self.path}: leads {lead_start}..{lead_start + data.shape[1] - 1} do not fit the "
                                f"file's {self.shape[1]} leads")
        region = [slice(i0, i0 + data.shape[0]), slice(lead_start, lead_start + data.shape[1])]
        if self.members:
            region.append(slice(member_start, member_start + data.shape[2]))
        ds = xr.Dataset({c: (self.dims, data[..., k]) for k, c in enumerate(self.channels)})
        ds.to_zarr(self.staging, region=dict(zip(self.dims, region + [slice(None), slice(None)])))

    # -------------------------------------------------------------- finishing
    def close(self) -> Path:
        """Turn the staging store into the file at ``path`` (replacing an old one only now); returns ``path``."""
        import zarr

        zarr.consolidate_metadata(str(self.staging))
        if self.zarr:
            with atomic_path(self.path, directory=True) as tmp:
                os.replace(self.staging, tmp)
        else:
            import xarray as xr

            chunks = [1, 1] + ([1] if self.members else []) + list(self.shape[-2:])
            enc = {c: {"zlib": True, "complevel": 1, "chunksizes": chunks, "_FillValue": np.float32(np.nan),
                       "dtype": "float32"} for c in self.channels}
            enc.update(_TIME_ENCODING)
            with xr.open_zarr(self.staging, decode_timedelta=True) as ds, atomic_path(self.path) as tmp:
                ds[self.channels].to_netcdf(tmp, engine="netcdf4", encoding=enc)  # the channels in their order
        shutil.rmtree(self.partial, ignore_errors=True)
        return self.path

    def abort(self, exc: BaseException | None = None) -> None:
        """An error: a resumable partial output stays (the same command continues it); any other goes."""
        if not self.resumable:
            shutil.rmtree(self.partial, ignore_errors=True)

    def __enter__(self):
        return self

    def __exit__(self, et, ev, tb):
        if et is None:
            self.close()
        else:
            self.abort(ev)
        return False


# --------------------------------------------------------------------------- #
# Whole-array convenience
# --------------------------------------------------------------------------- #


def forecast_to_dataset(forecast, *, init_times, lat, lon, channels: Sequence[str], mean=None, std=None,
                        step_hours: float = 6.0, attrs: Mapping | None = None):
    """A CF ``xarray.Dataset`` in the forecast-file layout from an in-memory forecast.

    ``forecast``: :func:`fcn_jax.inference.rollout.rollout` output ``[init, lead, lat,
    lon, channel]`` or an ensemble ``[init, lead, member, lat, lon, channel]``
    (told apart by rank). ``mean``/``std`` ``[channel]``: given, the fields are
    de-normalised; omit both for physical fields.
    """
    import jax

    from fcn_jax.normalize import denormalize

    f = np.asarray(jax.device_get(forecast), dtype=np.float32)
    if f.ndim not in (5, 6):
        raise ForecastError(f"forecast must be [init, lead, lat, lon, channel] or [init, lead, member, lat, lon, "
                            f"channel], got shape {f.shape}")
    channels = list(channels)
    if f.shape[-1] != len(channels):
        raise ForecastError(f"forecast has {f.shape[-1]} channels, {len(channels)} names given")
    if (mean is None) != (std is None):
        raise ForecastError("give both mean and std, or neither")
    if std is not None:
        f = denormalize(f, mean, std)
    init = np.asarray(init_times, dtype="datetime64[ns]").reshape(-1)
    if init.size != f.shape[0]:
        raise ForecastError(f"{init.size} init_times for {f.shape[0]} initial conditions")
    ds = _skeleton(init, f.shape[1], step_hours, lat, lon, f.shape[2] if f.ndim == 6 else 0, attrs)
    dims = ("init_time", "lead_time") + (("member",) if f.ndim == 6 else ()) + ("lat", "lon")
    for k, c in enumerate(channels):
        ds[c] = (dims, f[..., k], channel_attrs(c))
    return ds


def write_forecast(path, forecast, **kwargs) -> Path:
    """Write :func:`forecast_to_dataset` ``(forecast, **kwargs)`` to ``path`` (.nc / .zarr) atomically."""
    _check_suffix(path)
    ds = forecast_to_dataset(forecast, **kwargs)
    init = ds["init_time"].values
    shape = dict(ds.sizes)
    members = shape.get("member")
    with ForecastWriter(path, init_times=init, n_lead=shape["lead_time"],
                        step_hours=float(ds["lead_time"].values[1] / np.timedelta64(1, "h"))
                        if shape["lead_time"] > 1 else kwargs.get("step_hours", 6.0),
                        lat=ds["lat"].values, lon=ds["lon"].values, channels=list(ds.data_vars), members=members,
                        attrs=ds.attrs) as w:
        w.write(np.stack([ds[c].values for c in ds.data_vars], axis=-1), 0)
    return Path(path)


# --------------------------------------------------------------------------- #
# Reading
# --------------------------------------------------------------------------- #


def read_forecast(path: str | os.PathLike):
    """Open a forecast file lazily and check its layout; returns an ``xarray.Dataset``.

    Accepts files made elsewhere: dims may come in any order (transposed to
    ``(init_time, lead_time, [member], lat, lon)``), and ``valid_time`` is
    derived from ``init_time + lead_time`` when absent. Errors name the file
    and what is wrong.
    """
    import xarray as xr

    p = Path(path)
    if not p.exists():
        raise ForecastError(f"{path}: forecast file not found")
    try:
        if _is_zarr(p) or p.is_dir():
            ds = xr.open_zarr(p, decode_timedelta=True)
        else:
            ds = xr.open_dataset(p, decode_timedelta=True, chunks={})
    except Exception as e:
        raise ForecastError(f"{path}: cannot open as NetCDF or zarr ({type(e).__name__}: {e})") from e
    for d in ("init_time", "lead_time", "lat", "lon"):
        if d not in ds.dims:
            raise ForecastError(f"{path}: no '{d}' dimension; a forecast needs dims (init_time, lead_time, "
                                f"[member], lat, lon), it has {tuple(ds.dims)}")
    if not np.issubdtype(ds["init_time"].dtype, np.datetime64):
        raise ForecastError(f"{path}: init_time must be datetime64, got {ds['init_time'].dtype}")
    if not np.issubdtype(ds["lead_time"].dtype, np.timedelta64):
        raise ForecastError(f"{path}: lead_time must be a timedelta (CF units 'hours'), got {ds['lead_time'].dtype}")
    extra = set(ds.dims) - {"init_time", "lead_time", "member", "lat", "lon"}
    if extra:
        raise ForecastError(f"{path}: unexpected dimensions {sorted(extra)}; allowed: init_time, lead_time, "
                            f"member, lat, lon")
    if "valid_time" not in ds.coords:
        ds = ds.assign_coords(valid_time=ds["init_time"] + ds["lead_time"])
    order = ("init_time", "lead_time") + (("member",) if "member" in ds.dims else ()) + ("lat", "lon")
    ds = ds.transpose(*order)
    if not forecast_channels(ds):
        raise ForecastError(f"{path}: no data variable with dims {order}")
    return ds


def forecast_channels(ds) -> list[str]:
    """Names of the data variables that are forecast fields (all forecast dims)."""
    dims = set(ds["init_time"].dims + ds["lead_time"].dims + ds["lat"].dims + ds["lon"].dims)
    return [str(v) for v in ds.data_vars if dims <= set(ds[v].dims)]
