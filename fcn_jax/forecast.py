"""Autoregressive forecasts, IC-perturbation ensembles and NetCDF output.

Layouts (normalised units unless stated):

* initial conditions ``x0``: ``[batch, lat, lon, channel]`` -- the model's layout;
  batch indexes initial times.
* :func:`rollout` returns ``[steps+1, batch, lat, lon, channel]``; entry 0 is
  ``x0`` itself (lead 0), entry i the state after i model steps (lead
  ``i * dt``, 6 h for FourCastNet). This is the original's ``prediction_length
  = steps + 1`` convention (model spec §15.1).
* :func:`ensemble_rollout` returns ``[steps+1, members, batch, lat, lon,
  channel]`` (or ``[steps+1, batch, ...]`` with ``reduce="mean"``).

Each step feeds the model its own previous output, in normalised space, with
no clipping or re-normalisation, exactly as the original.

The rollout is one ``jax.jit`` of a ``lax.scan`` over the steps: the model is
split into a static graph definition and a state pytree (``nnx.split``) and
rebuilt inside the traced function (``nnx.merge``), so the network is traced
and compiled once however many steps are taken. Under ``jax.set_mesh(mesh)``
the model runs its sharded forward pass (``apply_model`` reads the mesh in
context while tracing); shard ``x0`` as ``P('data', 'height', 'width', None)``
and the model with :func:`fcn_jax.model.afnonet.shard_model`.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Literal, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

__all__ = ["rollout", "ensemble_rollout", "perturb", "forecast_to_dataset", "write_forecast_netcdf"]


# --------------------------------------------------------------------------- #
# Deterministic rollout
# --------------------------------------------------------------------------- #


def rollout(model: nnx.Module, x0, steps: int):
    """Autoregressive forecast ``[steps+1, batch, lat, lon, channel]`` (entry 0 = ``x0``).

    Args:
      model: an ``AFNONet`` (anything with ``model(x)`` mapping ``[batch, lat,
        lon, channel]`` to the same shape).
      x0: initial conditions ``[batch, lat, lon, channel]``, normalised.
      steps: number of model steps (40 = 10 days at 6 h).

    Compiled once per (model structure, shapes, steps, mesh); later calls with
    new parameters or ICs of the same shapes reuse the executable.
    """
    if steps < 0:
        raise ValueError(f"steps must be >= 0, got {steps}")
    graphdef, state = nnx.split(model)
    return _rollout_jit(graphdef, state, jnp.asarray(x0, jnp.float32), int(steps))


def _scan_rollout(graphdef, state, x0, steps):
    model = nnx.merge(graphdef, state)

    def step(x, _):
        y = model(x).astype(jnp.float32)
        return y, y

    if steps == 0:
        return x0[None]
    _, ys = jax.lax.scan(step, x0, None, length=steps)  # [steps, batch, lat, lon, ch]
    return jnp.concatenate([x0[None], ys], axis=0)


_rollout_jit = jax.jit(_scan_rollout, static_argnums=(0, 3))


# --------------------------------------------------------------------------- #
# Ensembles (IC perturbation, the original's inference_ensemble.py)
# --------------------------------------------------------------------------- #


def perturb(x0, std: float, key, members: int | Sequence[int]):
    """Perturbed initial conditions ``[members, batch, lat, lon, channel]``.

    Member ``m`` is ``x0 + std * N(0, 1)`` with i.i.d. noise on every batch
    entry, grid point and channel, drawn from ``fold_in(key, m)``: a member's
    noise depends only on ``(key, m)``, so chunking the ensemble does not change
    it. ``members`` is a count or an explicit list of member indices.
    """
    ids = np.arange(members) if np.ndim(members) == 0 else np.asarray(members)
    return _perturb(jnp.asarray(x0, jnp.float32), jnp.float32(std), key, jnp.asarray(ids, jnp.uint32))


@jax.jit
def _perturb(x0, std, key, ids):
    keys = jax.vmap(lambda i: jax.random.fold_in(key, i))(ids)
    noise = jax.vmap(lambda k: jax.random.normal(k, x0.shape, jnp.float32))(keys)
    return x0[None] + std * noise


def _ensemble_chunk(graphdef, state, x0, std, key, ids, steps):
    xp = _perturb(x0, std, key, ids)  # [m, b, lat, lon, ch]
    m, b = xp.shape[:2]
    # batch-major merge keeps a 'data'-sharded batch axis contiguous in [b*m]
    flat = jnp.swapaxes(xp, 0, 1).reshape((b * m,) + xp.shape[2:])
    out = _scan_rollout(graphdef, state, flat, steps)  # [steps+1, b*m, ...]
    out = out.reshape((steps + 1, b, m) + out.shape[2:])
    return jnp.swapaxes(out, 1, 2)  # [steps+1, m, b, ...]


_ensemble_chunk_jit = jax.jit(_ensemble_chunk, static_argnums=(0, 6))
_member_sum = jax.jit(lambda out: jnp.sum(out, axis=1))


def ensemble_rollout(
    model: nnx.Module,
    x0,
    steps: int,
    members: int,
    std: float = 0.3,
    key=None,
    *,
    member_chunk: int | None = None,
    reduce: Literal[None, "mean"] = None,
):
    """Ensemble forecast from Gaussian-perturbed initial conditions.

    The original's perturbation experiment (model spec §15.2): i.i.d.
    ``std * N(0, 1)`` noise (``n_level``, 0.3 by default) added to every
    channel and grid point of the **normalised** IC -- a physical std of
    ``std * global_std_c`` -- fresh per member, none during the rollout.

    Args:
      model, x0, steps: as :func:`rollout` (``x0 [batch, lat, lon, channel]``).
      members: ensemble size M.
      std: noise std in normalised units.
      key: ``jax.random.key``; the result is a deterministic function of it.
      member_chunk: members run together per compiled call (default: all M).
        Each call rolls out a batch of ``batch * member_chunk``; lower it to
        bound memory. The result does not depend on it.
      reduce: ``None`` returns every member, ``[steps+1, M, batch, lat, lon,
        channel]``; ``"mean"`` returns only the ensemble mean ``[steps+1,
        batch, lat, lon, channel]`` (what the original scores), accumulated
        chunk by chunk so M members never sit in memory at once.
    """
    if members < 1:
        raise ValueError(f"members must be >= 1, got {members}")
    if reduce not in (None, "mean"):
        raise ValueError(f"reduce must be None or 'mean', got {reduce!r}")
    key = jax.random.key(0) if key is None else key
    chunk = members if member_chunk is None else max(1, min(int(member_chunk), members))
    graphdef, state = nnx.split(model)
    x0 = jnp.asarray(x0, jnp.float32)
    parts, total = [], None
    for start in range(0, members, chunk):
        ids = jnp.arange(start, min(start + chunk, members), dtype=jnp.uint32)
        out = _ensemble_chunk_jit(graphdef, state, x0, jnp.float32(std), key, ids, int(steps))
        if reduce == "mean":  # one compiled chunk for both modes; only the member sum is kept
            part = _member_sum(out)
            total = part if total is None else total + part
        else:
            parts.append(out)
    if reduce == "mean":
        return total / members
    return parts[0] if len(parts) == 1 else jnp.concatenate(parts, axis=1)


# --------------------------------------------------------------------------- #
# NetCDF output
# --------------------------------------------------------------------------- #


def _channel_units(names: Sequence[str]) -> list[str]:
    try:
        from fcn_jax.data.channels import get_channel
    except Exception:  # pragma: no cover - catalogue is optional here
        get_channel = None
    units = []
    for n in names:
        try:
            units.append(get_channel(n).units if get_channel else "")
        except Exception:
            units.append("")
    return units


def forecast_to_dataset(
    forecast,
    *,
    init_times,
    lat,
    lon,
    channels: Sequence[str],
    mean=None,
    std=None,
    step_hours: float = 6.0,
    units: Mapping[str, str] | None = None,
    attrs: Mapping[str, str] | None = None,
):
    """A CF-style ``xarray.Dataset`` from a rollout, in physical units.

    Args:
      forecast: :func:`rollout` output ``[lead, init_time, lat, lon, channel]``
        or :func:`ensemble_rollout` output ``[lead, member, init_time, lat,
        lon, channel]`` (told apart by rank).
      init_times: ``[init_time]`` datetimes (anything ``numpy.datetime64``
        accepts).
      lat, lon: coordinates in degrees (``[lat]``, ``[lon]``).
      channels: channel names, one data variable each.
      mean, std: per-channel normalisation ``[channel]``; given, the fields are
        de-normalised ``x * std + mean``. Omit both for fields already physical.
      step_hours: hours per model step (lead i is ``i * step_hours``).
      units: per-channel units overriding the channel catalogue's.
      attrs: global attributes to add.

    Returns:
      Dataset with dims ``(init_time, lead_time, [member,] lat, lon)``;
      ``lead_time`` is a timedelta, ``valid_time = init_time + lead_time`` a
      2-D coordinate; one float32 variable per channel with ``units``.
    """
    import xarray as xr

    f = np.asarray(jax.device_get(forecast), dtype=np.float32)
    if f.ndim not in (5, 6):
        raise ValueError(
            f"forecast must be [lead, init, lat, lon, channel] or [lead, member, init, lat, lon, channel], got {f.shape}"
        )
    channels = list(channels)
    if f.shape[-1] != len(channels):
        raise ValueError(f"forecast has {f.shape[-1]} channels, {len(channels)} names given")
    if (mean is None) != (std is None):
        raise ValueError("give both mean and std, or neither")
    if std is not None:
        f = f * np.asarray(std, np.float32).reshape(-1) + np.asarray(mean, np.float32).reshape(-1)
    ensemble = f.ndim == 6
    # -> [init, lead, (member,) lat, lon, channel]
    f = np.moveaxis(f, 2, 0) if ensemble else np.swapaxes(f, 0, 1)
    init = np.asarray(init_times, dtype="datetime64[ns]").reshape(-1)
    if init.size != f.shape[0]:
        raise ValueError(f"{init.size} init_times for {f.shape[0]} initial conditions")
    n_lead = f.shape[1]
    lead = (np.arange(n_lead) * np.timedelta64(int(round(step_hours * 3600)), "s")).astype("timedelta64[ns]")
    dims = ("init_time", "lead_time") + (("member",) if ensemble else ()) + ("lat", "lon")
    coords = {
        "init_time": ("init_time", init, {"long_name": "forecast initial time"}),
        "lead_time": ("lead_time", lead, {"long_name": "forecast lead time", "standard_name": "forecast_period"}),
        "lat": ("lat", np.asarray(lat, np.float32), {"units": "degrees_north", "standard_name": "latitude"}),
        "lon": ("lon", np.asarray(lon, np.float32), {"units": "degrees_east", "standard_name": "longitude"}),
        "valid_time": (("init_time", "lead_time"), init[:, None] + lead[None, :], {"standard_name": "time"}),
    }
    if ensemble:
        coords["member"] = ("member", np.arange(f.shape[2], dtype=np.int32), {"long_name": "ensemble member"})
    cat_units = _channel_units(channels)
    data_vars = {}
    for i, name in enumerate(channels):
        u = (units or {}).get(name, cat_units[i])
        data_vars[name] = (dims, f[..., i], {"units": u} if u else {})
    ds = xr.Dataset(data_vars, coords=coords)
    ds.attrs.update({"Conventions": "CF-1.8", "source": "fcn_jax AFNO forecast"})
    ds.attrs.update(dict(attrs or {}))
    return ds


def write_forecast_netcdf(path: str | os.PathLike, forecast, **kwargs) -> Path:
    """Write :func:`forecast_to_dataset` ``(forecast, **kwargs)`` to NetCDF atomically.

    The file is written under a temporary name in the target directory and
    renamed into place, so a reader never sees a half-written file. Variables
    are float32, zlib-compressed. Returns the path.
    """
    ds = forecast_to_dataset(forecast, **kwargs)
    encoding = {name: {"dtype": "float32", "zlib": True, "complevel": 1} for name in ds.data_vars}
    # xarray picks hours as the on-disk unit for 6-hourly leads; keep it explicit
    encoding["lead_time"] = {"units": "hours", "dtype": "float64"}
    return _atomic(path, lambda tmp: ds.to_netcdf(tmp, engine="netcdf4", encoding=encoding))


def _atomic(path, write) -> Path:
    """Run ``write(tmp_path)`` then rename the temporary file onto ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        write(tmp)
        # mkstemp makes 0600; use the usual 0644 (reading the umask would mean
        # setting it, which is process-global and racy with other threads)
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
    return path
