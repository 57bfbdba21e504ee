"""Reader for GRIB (editions 1 and 2): ERA5 from the Copernicus store, IFS open data, GFS.

GRIB is the Copernicus store's default ERA5 format and the format of every
real-time analysis. Files are decoded by cfgrib on ecCodes (the ``grib``
extra: ``pip install 'fcn_jax[grib]'``, binary wheels, no system library).

One file holds many *hypercubes*: a variable on one kind of level
(``typeOfLevel``: ``isobaricInhPa``, ``surface``, ``heightAboveGround``,
``meanSea``, ``entireAtmosphere`` ...). Each file is scanned **once** (ecCodes
reads every message header; the index stays in memory, no ``.idx`` file is
written next to the data) and split into one hypercube per (typeOfLevel,
paramId), split further on any key that still conflicts (``stepType``,
``dataType`` ...), as cfgrib's own ``open_datasets`` does -- but from the one
index, where that function rescans the file per variable. Each hypercube
becomes a lazy xarray dataset through cfgrib's data store (values are decoded
only when a time range is read) with ``valid_time`` as its time axis, so
analyses, forecasts and accumulations all line up; a file with one time still
has a time dimension of length 1. Hypercubes that cannot be used (another grid
type, a dimension a channel cannot have) are set aside and only named if a
requested channel is then missing, so the many unrelated hypercubes of a GFS
file do not get in the way.

Names are cfgrib's (``u10``, ``v10``, ``t2m``, ``sp``, ``msl``, ``tcwv``,
``tp``, ``z``, ``t``, ``u``, ``v``, ``r`` ...). Geopotential height ``gh``
(units ``gpm``; IFS open data, GFS) becomes geopotential, × 9.80665, recorded in
``unit_conversions``; GFS ``prmsl`` and ``pwat`` stand for ``msl`` and ``tcwv``.
Hourly ERA5 ``tp`` (the hour ending at each valid time) is summed into 6 h
accumulations like the netCDF reader's.

Ensembles: a hypercube with a ``number`` dimension of more than one member (or
a file whose hypercubes hold different members, e.g. IFS control ``cf`` and
perturbed ``pf`` forecasts) is refused unless ``member=N`` picks one.

ecCodes is not thread-safe: every call into it goes through :func:`grib_lock`,
cfgrib's own process-wide lock. cfgrib takes it around each read of values;
this module takes it around the scan and the building of the hypercubes (which
cfgrib does not lock), and never around a read (it is not re-entrant).
"""

from __future__ import annotations

import functools
import os
from typing import Sequence

import numpy as np
import xarray as xr

from fcn_jax.data.channels import Channel
from fcn_jax.data.errors import DataError
from fcn_jax.data.readers.accumulate import to_six_hourly
from fcn_jax.data.readers.cds import provenance_attrs
from fcn_jax.data.readers.grid import standardize
from fcn_jax.data.readers.pieces import collect_pieces
from fcn_jax.data.readers.source import CanonicalSource, assemble

#: File name endings taken for GRIB (any file starting with ``GRIB`` is, too).
GRIB_EXTENSIONS = (".grib", ".grb", ".grib1", ".grb1", ".grib2", ".grb2")
GRIB_MAGIC = b"GRIB"
#: cfgrib's time axis: the valid time, whatever the reference time and step.
TIME_DIMS = ("valid_time",)
#: Dimensions a hypercube keeps; any other of length 1 (``surface``,
#: ``heightAboveGround`` = 2 ...) is squeezed away.
_KEEP_DIMS = ("valid_time", "number", "isobaricInhPa", "latitude", "longitude")


def is_grib_file(path: str) -> bool:
    """True when ``path`` is a regular file whose first 4 bytes are ``GRIB``."""
    try:
        if not os.path.isfile(path):
            return False
        with open(path, "rb") as f:
            return f.read(4) == GRIB_MAGIC
    except OSError:
        return False


def _cfgrib():
    """cfgrib's modules, or a DataError saying how to install them."""
    try:
        from cfgrib import dataset, messages, xarray_plugin
    except Exception as e:  # ImportError, or RuntimeError when no ecCodes library is found
        raise DataError(f"reading GRIB needs cfgrib and ecCodes ({type(e).__name__}: {e}); "
                        "install them with: pip install 'fcn_jax[grib]'") from e
    return dataset, messages, xarray_plugin


def grib_lock():
    """The process-wide lock serialising ecCodes calls (cfgrib's ``ECCODES_LOCK``).

    cfgrib takes it around every read of values; take it around any other
    ecCodes call, never around a read (it is not re-entrant).
    """
    return _cfgrib()[2].ECCODES_LOCK


@functools.lru_cache(maxsize=None)
def _store_class():
    xarray_plugin = _cfgrib()[2]

    class _IndexStore(xarray_plugin.CfGribDataStore):
        """cfgrib's xarray data store over an already built cfgrib dataset (no file rescan)."""

        def __init__(self, cfds, lock):  # noqa: D107 - deliberately not calling super().__init__
            self.ds = cfds
            self.lock = lock

    return _IndexStore


def _listing(items: list[str], limit: int = 8) -> str:
    shown = "; ".join(items[:limit])
    return f"[{shown}; ... and {len(items) - limit} more]" if len(items) > limit else f"[{shown}]"


def _label(path: str, keys: dict) -> str:
    inner = ", ".join(f"{k}={v}" for k, v in keys.items() if k != "paramId")
    return f"{path} [{inner}]" if inner else path


def _scan(path: str):
    """The file's message index (one pass over the file). Call under the lock."""
    dataset, messages, _ = _cfgrib()
    try:
        stream = messages.FileStream(path, errors="raise")
        keys = dataset.compute_index_keys(time_dims=TIME_DIMS)
        return dataset.open_fileindex(stream, indexpath="", index_keys=keys)
    except Exception as e:  # EOFError (no message), ecCodes errors: premature end of file, bad sections ...
        what = f"{type(e).__name__}: {e}"
        if not is_grib_file(path):
            raise DataError(f"{path}: not a GRIB file (it does not start with 'GRIB' and ecCodes found no "
                            f"readable message: {what}); expected GRIB edition 1 or 2") from e
        raise DataError(f"{path}: cannot read as GRIB ({what}); expected complete GRIB messages "
                        "(truncated download?)") from e


def _build_cubes(path: str, index) -> tuple[list[tuple[str, object]], list[str]]:
    """cfgrib datasets, one per hypercube, and the hypercubes that could not be built.

    Call under the lock: building reads the first message of each hypercube.
    """
    dataset = _cfgrib()[0]
    cubes: list[tuple[str, object]] = []
    unusable: list[str] = []

    def build(sub, keys: dict, depth: int = 0) -> None:
        label = _label(path, keys)
        try:
            cfds = dataset.open_from_index(sub, time_dims=TIME_DIMS, squeeze=False, errors="raise")
        except dataset.DatasetBuildError as e:
            key = e.args[1] if len(e.args) > 1 else None
            values = list(sub[key]) if isinstance(key, str) and key in sub.index_keys else []
            if depth < 4 and len(values) > 1:
                for v in values:
                    build(sub.subindex({key: v}), {**keys, key: v}, depth + 1)
                return
            unusable.append(f"{label} paramId={keys.get('paramId')}: {e.args[0] if e.args else e}")
            return
        except Exception as e:  # noqa: BLE001 - an odd hypercube must not stop the others
            unusable.append(f"{label} paramId={keys.get('paramId')}: {type(e).__name__}: {e}")
            return
        dup = _duplicates(sub, cfds, label)
        if dup:
            unusable.append(dup)
        else:
            cubes.append((label, cfds))

    for tol in index["typeOfLevel"]:
        by_level = index.subindex(typeOfLevel=tol)
        for pid in by_level.get("paramId", []):
            build(by_level.subindex(paramId=pid), {"typeOfLevel": tol, "paramId": pid})
    return cubes, unusable


def _duplicates(sub, cfds, label: str) -> str:
    """Two messages for one field (cfgrib would silently keep one of them): what is wrong, or ''."""
    n_messages = sum(len(ids) for _, ids in sub.iter_index())
    for name, var in cfds.variables.items():
        positions = getattr(var.data, "field_id_index", None)
        if positions is not None and n_messages > len(positions):
            return (f"{label} variable {name!r}: {n_messages} GRIB messages for {len(positions)} distinct "
                    "(valid time, level, member) fields; expected each field once (the same field twice, e.g. "
                    "concatenated downloads, or forecasts of several runs valid at the same time)")
    return ""


def _to_xarray(label: str, cfds, lock) -> xr.Dataset:
    """A lazy xarray dataset over a cfgrib dataset (xarray's 'store' engine: CF decoding, no read)."""
    store = _store_class()(cfds, lock)
    try:
        return xr.open_dataset(store, engine="store", chunks=None, cache=False, mask_and_scale=True,
                               decode_times=True, decode_timedelta=False)
    except Exception as e:
        raise DataError(f"{label}: cannot decode the hypercube ({type(e).__name__}: {e})") from e


def _tidy(ds: xr.Dataset, label: str) -> xr.Dataset:
    """Squeeze length-1 vertical dimensions, put valid_time in increasing order, name odd grids."""
    for name in ds.data_vars:
        grid = ds[name].attrs.get("GRIB_gridType")
        if grid is not None and ("latitude" not in ds.dims or "longitude" not in ds.dims):
            raise DataError(f"{label} variable {name!r}: grid type {grid!r} is not a regular latitude-longitude "
                            "grid; expected regular_ll (regrid first, e.g. the CDS 'grid' option)")
    squeeze = {d: 0 for d, n in ds.sizes.items() if d not in _KEEP_DIMS and n == 1}
    if squeeze:
        ds = ds.isel(squeeze)
    if "valid_time" in ds.dims:
        t = np.asarray(ds["valid_time"].values)
        if t.size > 1 and np.issubdtype(t.dtype, np.datetime64) and np.any(np.diff(t) <= np.timedelta64(0, "ns")):
            ds = ds.isel(valid_time=np.argsort(t, kind="stable"))
    return ds


def _members(ds: xr.Dataset) -> list[int]:
    if "number" not in ds.variables:
        return []
    return [int(v) for v in np.atleast_1d(np.asarray(ds["number"].values))]


def _select_member(path: str, cubes: list[tuple[str, xr.Dataset]], member: int | None) -> list[tuple[str, xr.Dataset]]:
    """Keep one ensemble member; more than one without ``member`` is an error naming ``number``."""
    present = sorted({m for _, ds in cubes for m in _members(ds)})
    if member is None:
        if len(present) > 1:
            shown = present if len(present) <= 12 else present[:6] + ["..."] + present[-3:]
            raise DataError(
                f"{path}: ensemble dimension 'number' has {len(present)} members {shown}; expected a single "
                "(deterministic) member: pick one with member=N (--member N)")
        out = []
        for label, ds in cubes:
            out.append((label, ds.isel(number=0) if "number" in ds.dims else ds))
        return out
    if not present:
        raise DataError(f"{path}: member {member} requested but the file has no ensemble dimension 'number'")
    if member not in present:
        raise DataError(f"{path}: member {member} not found; ensemble dimension 'number' holds members {present}")
    out = []
    for label, ds in cubes:
        ms = _members(ds)
        if not ms:
            out.append((label, ds))  # no member information: a field shared by all members
        elif member in ms:
            out.append((label, ds.isel(number=ms.index(member)) if "number" in ds.dims else ds))
    return out


def open_grib_file(path: str, *, member: int | None = None) -> tuple[list[tuple[str, xr.Dataset]], list[str]]:
    """One GRIB file -> its usable hypercubes as standardised lazy datasets.

    Returns:
      ([(label, dataset)], [description of each hypercube set aside]); a label
      is the path followed by the hypercube's keys, e.g. ``f.grib [typeOfLevel=surface]``.

    Raises:
      DataError: the file is missing, not GRIB or truncated; an ensemble
        without ``member``; a wrong ``member``.
    """
    if not os.path.exists(path):
        raise DataError(f"{path}: file not found")
    if os.path.isdir(path):
        raise DataError(f"{path}: is a directory; expected a GRIB file")
    lock = grib_lock()
    with lock:
        index = _scan(path)
        built, unusable = _build_cubes(path, index)
    cubes: list[tuple[str, xr.Dataset]] = []
    for label, cfds in built:
        try:
            cubes.append((label, _tidy(_to_xarray(label, cfds, lock), label)))
        except DataError as e:
            unusable.append(str(e))
    if not cubes:
        raise DataError(f"{path}: no usable GRIB hypercube" + (f": {_listing(unusable)}" if unusable else ""))
    cubes = _select_member(path, cubes, member)
    out = []
    for label, ds in cubes:
        try:
            out.append((label, standardize(ds, label)))
        except DataError as e:
            unusable.append(str(e))
    return out, unusable


def open_grib(paths: Sequence[str], channels: Sequence[Channel], *, allow_gaps: bool = False,
              member: int | None = None) -> CanonicalSource:
    """Open GRIB files as one :class:`CanonicalSource` with ``channels``.

    Args:
      paths: GRIB files; variables may be split across them (pressure-level and
        single-level downloads) and time too (one file per month ...).
      channels: channels wanted, in order.
      allow_gaps: accept gaps in time.
      member: the ensemble member (GRIB key ``number``) to read from ensemble files.
    """
    datasets: list[tuple[str, xr.Dataset]] = []
    unusable: list[str] = []
    for p in map(str, paths):
        cubes, bad = open_grib_file(p, member=member)
        datasets.extend(cubes)
        unusable.extend(bad)
    try:
        pieces = collect_pieces(datasets, channels, prefer="cds")
    except DataError as e:
        if unusable:
            raise DataError(f"{e}; GRIB hypercubes set aside: {_listing(unusable)}") from e
        raise
    pieces, note = to_six_hourly(pieces)  # hourly tp -> 6 h sums (no-op for 6-hourly sources)
    return assemble(channels, pieces, source_kind="grib", files=[str(p) for p in paths],
                    allow_gaps=allow_gaps, extra_attrs=provenance_attrs(note, member))
