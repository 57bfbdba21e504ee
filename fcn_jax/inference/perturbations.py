"""Initial-condition perturbations of an ensemble: white, spherical-harmonic (spatially correlated), bred.

All work in normalised units (the model's), ``x: [batch, lat, lon, channel]``,
and every member's draw comes from ``fold_in(key, member)``: chunking an
ensemble never changes a member.

* ``gaussian`` -- i.i.d. ``std * N(0, 1)`` at every grid point and channel
  (the original FourCastNet's perturbation experiment);
* ``spherical`` -- an isotropic Gaussian random field on the sphere per member
  and channel, unit variance at every point, with a Gaussian angular power
  spectrum ``C_l ~ exp(-(l (l+1)) (L / R)^2 / 2)`` of correlation length ``L``
  (``scale_km``): the noise has the size of weather systems rather than of grid
  cells, so the model does not simply smooth it away. Built from fully
  normalised associated Legendre functions (float64 recurrence, tabulated once
  per grid) and an inverse FFT along longitude -- O(lat x l_max^2) work per
  field, so it runs at 0.25 deg as on the world;
* ``bred`` -- bred vectors (Toth and Kalnay 1993): each member's spherical
  noise is added ``cycles`` steps before the initial time, the model advances
  the perturbed and the control states one step, their difference is scaled
  back to the amplitude (per member and channel, area-weighted RMS) and added to
  the next analysis; after the last cycle the grown perturbation is the
  member's. The perturbations then point along the directions the model's
  errors grow in.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np

from fcn_jax.errors import InputError

__all__ = ["KINDS", "SphericalBasis", "spherical_basis", "noise", "rescale", "EARTH_RADIUS_KM"]

KINDS = ("gaussian", "spherical", "bred")
EARTH_RADIUS_KM = 6371.0


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class SphericalBasis:
    """What a spherical random field needs on one grid: ``legendre [lat, l, m]`` scaled by ``sqrt(C_l)``.

    ``phase [m]``: ``exp(i m lon_0)`` for a grid whose first longitude is ``lon_0``; ``n_lon`` the
    longitudes (equally spaced, the full circle).
    """

    legendre: jax.Array  # [lat, l_max+1, m_max+1] float32
    phase: jax.Array  # [m_max+1] complex64
    n_lon: int = dataclasses.field(metadata=dict(static=True))


def _normalised_legendre(colat: np.ndarray, l_max: int) -> np.ndarray:
    """Fully normalised associated Legendre functions ``[lat, l, m]`` (orthonormal spherical harmonics' P)."""
    x, s = np.cos(colat), np.sin(colat)
    p = np.zeros((colat.size, l_max + 1, l_max + 1))
    p[:, 0, 0] = 1.0 / math.sqrt(4.0 * math.pi)
    for m in range(1, l_max + 1):
        p[:, m, m] = -math.sqrt((2.0 * m + 1.0) / (2.0 * m)) * s * p[:, m - 1, m - 1]
    for m in range(0, l_max):
        p[:, m + 1, m] = math.sqrt(2.0 * m + 3.0) * x * p[:, m, m]
    for m in range(0, l_max + 1):
        for ell in range(m + 2, l_max + 1):
            a = math.sqrt((4.0 * ell * ell - 1.0) / (ell * ell - m * m))
            b = math.sqrt(((ell - 1.0) ** 2 - m * m) / (4.0 * (ell - 1.0) ** 2 - 1.0))
            p[:, ell, m] = a * (x * p[:, ell - 1, m] - b * p[:, ell - 2, m])
    return p


def spherical_basis(lat, lon, scale_km: float = 500.0, l_max: int | None = None) -> SphericalBasis:
    """The basis for unit-variance random fields of correlation length ``scale_km`` on a ``lat x lon`` grid.

    ``l_max`` defaults to what the grid resolves and the spectrum needs: ``min(lat - 1, lon / 2 - 1,
    4 R / scale)``. The angular power is normalised so that the pointwise variance is exactly 1
    (addition theorem: ``sum_l C_l (2 l + 1) / 4 pi = 1``).
    """
    if not scale_km > 0:
        raise InputError(f"--perturbation-scale-km must be > 0 for spatially correlated noise, got {scale_km}")
    lat, lon = np.asarray(lat, np.float64), np.asarray(lon, np.float64)
    if lon.size < 4 or not np.allclose(np.diff(lon), (lon[1] - lon[0])) or \
            not math.isclose((lon[1] - lon[0]) * lon.size, 360.0, rel_tol=1e-6):
        raise InputError(f"spherical noise needs equally spaced longitudes around the circle; got {lon.size} "
                         f"from {lon[0]} step {lon[1] - lon[0]}")
    ratio = EARTH_RADIUS_KM / float(scale_km)
    if l_max is None:
        l_max = int(min(lat.size - 1, lon.size // 2 - 1, math.ceil(4 * ratio)))
    ell = np.arange(l_max + 1, dtype=np.float64)
    c = np.exp(-0.5 * ell * (ell + 1) / ratio**2)
    c /= np.sum(c * (2 * ell + 1) / (4 * math.pi))
    p = _normalised_legendre(np.deg2rad(90.0 - lat), l_max) * np.sqrt(c)[None, :, None]
    phase = np.exp(1j * np.arange(l_max + 1) * np.deg2rad(lon[0]))
    return SphericalBasis(jnp.asarray(p, jnp.float32), jnp.asarray(phase, jnp.complex64), int(lon.size))


def _spherical_field(key, basis: SphericalBasis, n_fields: int) -> jax.Array:
    """``[n_fields, lat, lon]`` independent unit-variance fields."""
    _, n_l, n_m = basis.legendre.shape
    kr, ki = jax.random.split(key)
    re = jax.random.normal(kr, (n_fields, n_l, n_m), jnp.float32)
    im = jax.random.normal(ki, (n_fields, n_l, n_m), jnp.float32)
    m0 = (jnp.arange(n_m) == 0)
    # a_l0 real with variance C_l; a_lm (m >= 1) complex with E|a|^2 = C_l, entering as 2 Re(a Y): var C_l each
    a = jnp.where(m0, re, (re + 1j * im) / jnp.sqrt(2.0)) * jnp.tril(jnp.ones((n_l, n_m)))  # l >= m only
    g = jnp.einsum("flm,tlm->ftm", a, basis.legendre.astype(jnp.complex64)) * basis.phase  # [f, lat, m]
    spec = jnp.zeros(g.shape[:-1] + (basis.n_lon // 2 + 1,), jnp.complex64).at[..., :n_m].set(g)
    return jnp.fft.irfft(spec, n=basis.n_lon, axis=-1) * basis.n_lon  # sum over m, 2 Re for m >= 1


def noise(key, shape, basis: SphericalBasis | None = None) -> jax.Array:
    """Unit-variance noise of ``shape [..., lat, lon, channel]``: white, or spherical when ``basis`` is given."""
    if basis is None:
        return jax.random.normal(key, shape, jnp.float32)
    lead = int(np.prod(shape[:-3])) * shape[-1]
    f = _spherical_field(key, basis, lead)  # [lead, lat, lon]
    f = f.reshape(tuple(shape[:-3]) + (shape[-1],) + tuple(shape[-3:-1]))  # [..., channel, lat, lon]
    return jnp.moveaxis(f, -3, -1)  # [..., lat, lon, channel]


def rescale(d, std, weights) -> jax.Array:
    """``d [..., lat, lon, channel]`` scaled so each field's area-weighted RMS is ``std`` (bred-vector cycling)."""
    w = weights[:, None, None] / jnp.mean(weights)  # [lat, 1, 1]
    rms = jnp.sqrt(jnp.mean(d * d * w, axis=(-3, -2), keepdims=True))
    return d * (std / jnp.maximum(rms, 1e-12))
