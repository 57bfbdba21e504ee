"""The one per-channel z-score normaliser of fcn_jax.

Every stage -- the data pipeline, the train step, validation, the forecast and
evaluate CLIs and the demo -- maps physical fields to model space with
``(x - mean_c) / std_c`` and back with ``x * std_c + mean_c`` through this
module (mean/std are the store's global per-channel statistics, model spec
§11). Layout: channels last, ``[..., channel]``; ``mean``/``std`` are
``[channel]``. Works on NumPy and jax arrays, inside or outside ``jit``, and
keeps a jax array's sharding (the statistics broadcast over the last axis).
"""

from __future__ import annotations

import dataclasses

import numpy as np

__all__ = ["Normalizer", "normalize", "denormalize", "precip_to_log", "precip_to_metres"]


def normalize(x, mean, std):
    """``(x - mean) / std`` over the last (channel) axis, in ``x``'s float dtype."""
    dt = x.dtype if np.issubdtype(np.dtype(x.dtype), np.floating) else np.float32
    return (x.astype(dt) - _as(mean, dt, x)) / _as(std, dt, x)


def denormalize(x, mean, std):
    """``x * std + mean`` over the last (channel) axis, in ``x``'s float dtype."""
    dt = x.dtype if np.issubdtype(np.dtype(x.dtype), np.floating) else np.float32
    return x.astype(dt) * _as(std, dt, x) + _as(mean, dt, x)


def _as(v, dt, like):
    if isinstance(v, np.ndarray) or np.isscalar(v) or isinstance(v, (list, tuple)):
        return np.asarray(v, dt)
    return v.astype(dt)  # a jax array (possibly a tracer): stays on the device


@dataclasses.dataclass(frozen=True)
class Normalizer:
    """Per-channel statistics ``mean``/``std`` ``[channel]`` (float32) and the two maps.

    ``normalize``/``denormalize`` broadcast over the last (channel) axis of
    NumPy or jax arrays. A prepared store's statistics come as one from
    :meth:`fcn_jax.data.store.StoreInfo.normalizer`, a model package's from
    :meth:`fcn_jax.checkpoints.package.ModelPackage.normalizer`.
    """

    mean: np.ndarray
    std: np.ndarray

    def __post_init__(self):
        mean = np.asarray(self.mean, np.float32).reshape(-1)
        std = np.asarray(self.std, np.float32).reshape(-1)
        if mean.shape != std.shape:
            raise ValueError(f"mean {mean.shape} and std {std.shape} differ (both [channel])")
        if np.any(~np.isfinite(std)) or np.any(std <= 0):
            raise ValueError(f"std must be finite and > 0 for every channel, got {std}")
        object.__setattr__(self, "mean", mean)
        object.__setattr__(self, "std", std)

    def normalize(self, x):
        return normalize(x, self.mean, self.std)

    def denormalize(self, x):
        return denormalize(x, self.mean, self.std)

    def as_tuple(self):
        """``(mean, std)``: the form jitted functions take as an argument."""
        return self.mean, self.std


# --------------------------------------------------------------------------- #
# Precipitation: the original's log transform (model spec §11.2)
# --------------------------------------------------------------------------- #


def _np_or_jnp(x):
    if isinstance(x, np.ndarray) or np.isscalar(x):
        return np
    import jax.numpy as jnp

    return jnp


def precip_to_log(tp, eps: float):
    """The precipitation model's target ``log1p(tp / eps)`` from ``tp`` in metres (negatives clipped to 0)."""
    xp = _np_or_jnp(tp)
    return xp.log1p(xp.maximum(tp, 0) / eps)


def precip_to_metres(y, eps: float, y_max: float | None = None):
    """``tp`` in metres from the log-space prediction ``y``: ``eps * expm1(clip(y, 0, y_max))``.

    The inverse is exponential, so a log-space error of ``d`` becomes a factor
    ``e^d`` in metres: a few over-confident large predictions dominate an RMSE
    in metres. ``y_max`` (e.g. the log of the largest accumulation in the
    training data) bounds the inverse; ``None`` only clips at 0.
    """
    xp = _np_or_jnp(y)
    y = xp.maximum(y, 0)
    if y_max is not None:
        y = xp.minimum(y, y_max)
    return eps * xp.expm1(y)
