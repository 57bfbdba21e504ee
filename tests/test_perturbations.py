"""Ensemble perturbations: spherical-harmonic noise and bred vectors."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from fcn_jax.config import ModelConfig
from fcn_jax.inference import perturbations as P
from fcn_jax.inference.rollout import bred_chunk, perturb
from fcn_jax.model.afnonet import shard_model
from fcn_jax.parallel.mesh import make_mesh
from tests.helpers import random_model

LAT = np.linspace(87.1875, -87.1875, 32)
LON = np.arange(64) * 5.625
CFG = ModelConfig(img_size=(32, 64), patch_size=(4, 4), in_channels=3, out_channels=3, embed_dim=16, depth=1,
                  num_blocks=2)


def test_legendre_functions_are_orthonormal():
    """Unsold's theorem at any colatitude, and orthonormality on a fine quadrature."""
    colat = np.linspace(0.01, math.pi - 0.01, 9)
    p = P._normalised_legendre(colat, 40)
    for ell in range(41):
        s = p[:, ell, 0] ** 2 + 2 * np.sum(p[:, ell, 1:ell + 1] ** 2, axis=1)
        np.testing.assert_allclose(s, (2 * ell + 1) / (4 * math.pi), rtol=1e-10)
    x, w = np.polynomial.legendre.leggauss(64)
    q = P._normalised_legendre(np.arccos(x), 10)
    for m in (0, 3):
        gram = 2 * math.pi * np.einsum("t,tl,tk->lk", w, q[:, m:, m], q[:, m:, m])
        np.testing.assert_allclose(gram, np.eye(11 - m), atol=1e-10)


def test_spherical_noise_has_unit_variance_and_the_requested_scale():
    key = jax.random.key(0)
    fine = np.asarray(P.noise(key, (400, 32, 64, 1), P.spherical_basis(LAT, LON, 1500.0)))[..., 0]
    coarse = np.asarray(P.noise(key, (400, 32, 64, 1), P.spherical_basis(LAT, LON, 3000.0)))[..., 0]
    for f in (fine, coarse):
        assert abs(f.var() - 1) < 0.08 and abs(f.mean()) < 0.05
        assert np.all(np.abs(f.var(axis=(0, 2)) - 1) < 0.2)  # every latitude, poles included
    # correlation at ~1,100 km along the equator (2 cells of 5.6 deg): larger for the larger scale
    corr = [np.mean(f[:, 16] * np.roll(f[:, 16], 2, axis=1)) / f[:, 16].var() for f in (fine, coarse)]
    assert 0.3 < corr[0] < corr[1] < 0.98
    white = np.asarray(P.noise(key, (50, 32, 64, 1)))[..., 0]
    assert abs(np.mean(white[:, 16] * np.roll(white[:, 16], 2, axis=1))) < 0.05


def test_spherical_members_do_not_depend_on_the_chunking():
    basis = P.spherical_basis(LAT, LON, 1000.0)
    x0 = jnp.zeros((1, 32, 64, 3))
    key = jax.random.key(3)
    whole = perturb(x0, 0.5, key, 6, basis)
    parts = jnp.concatenate([perturb(x0, 0.5, key, [0, 1, 2], basis), perturb(x0, 0.5, key, [3, 4, 5], basis)],
                            axis=1)
    # the same draws; the transform of a batch of 3 or 6 may round differently in the last bit
    np.testing.assert_allclose(np.asarray(whole), np.asarray(parts), rtol=0, atol=1e-6)
    assert 0.35 < float(jnp.std(whole)) < 0.65


def test_bred_vectors_have_the_amplitude_and_grow_along_the_model():
    model = random_model(CFG, scale=0.3)
    split = nnx.split(model)
    window = jax.random.normal(jax.random.key(1), (3, 32, 64, 3), jnp.float32)  # 2 cycles + the IC
    basis = P.spherical_basis(LAT, LON, 1500.0)
    ens = bred_chunk(split, window, 0.2, jax.random.key(2), np.arange(4), 2, basis, LAT)  # [1, 3, 4, ...]
    assert ens.shape == (1, 3, 4, 32, 64, 3)
    d = np.asarray(ens[0, 0] - window[-1])  # the bred perturbations at the IC, [member, lat, lon, ch]
    w = np.cos(np.deg2rad(LAT))[:, None, None] / np.cos(np.deg2rad(LAT)).mean()
    rms = np.sqrt(np.mean(d * d * w, axis=(1, 2)))
    np.testing.assert_allclose(rms, 0.2, rtol=1e-4)  # every member and channel at the amplitude
    raw = np.asarray(perturb(jnp.zeros((1, 32, 64, 3)), 0.2, jax.random.key(2), 4, basis))[0]
    corr = np.sum(d * raw) / np.sqrt(np.sum(d * d) * np.sum(raw * raw))
    assert corr < 0.9  # grown by the model, not the noise rescaled
    # the same members whatever the chunking, and the same on a mesh as on one device
    again = bred_chunk(split, window, 0.2, jax.random.key(2), np.arange(2, 4), 2, basis, LAT)
    np.testing.assert_allclose(np.asarray(again), np.asarray(ens[:, :, 2:]), rtol=1e-5, atol=1e-5)
    mesh = make_mesh((4, 1, 1, 1))
    with jax.set_mesh(mesh):
        sharded = bred_chunk(nnx.split(shard_model(random_model(CFG, scale=0.3), mesh)), window, 0.2,
                             jax.random.key(2), np.arange(4), 2, basis, LAT)
    np.testing.assert_allclose(np.asarray(sharded), np.asarray(ens), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("kind", ["spherical", "bred"])
def test_forecast_command_takes_a_perturbation(kind, synthetic_store, tmp_path):
    from fcn_jax import forecast
    from fcn_jax.checkpoints import package as model_ckpt
    from fcn_jax.data import synthetic as S
    from fcn_jax.inference.files import read_forecast

    channels = ["z500", "t850", "t2m"]
    times = S.six_hourly("2001-01-01T00", 12)
    store = synthetic_store(times, channels, (32, 64), noise=0.3, doy_climatology=False)
    model_dir = tmp_path / "model"
    package, clim = model_ckpt.package_from_store(store, channels)
    model_ckpt.save_model(model_dir, random_model(CFG, scale=0.1), package=package, climatology=clim)
    out = tmp_path / f"{kind}.nc"
    assert forecast.main([str(model_dir), "--store", store, "--init", str(times[5]), "--steps", "2", "--members",
                          "4", "--perturbation", kind, "--perturbation-scale-km", "1500", "--breeding-cycles", "2",
                          "--mesh", "1,1,1,1", "--out", str(out)]) == 0
    fc = read_forecast(out)
    assert fc.sizes["member"] == 4 and kind in fc.attrs["perturbation"]
    spread = float(fc["z500"].isel(lead_time=0).std("member").mean())
    assert spread > 0
    if kind == "bred":  # needs the analyses before the IC: the first time has none
        assert forecast.main([str(model_dir), "--store", store, "--init", str(times[0]), "--steps", "2",
                              "--members", "4", "--perturbation", kind, "--mesh", "1,1,1,1",
                              "--out", str(tmp_path / "early.nc")]) == 2


def test_bad_perturbation_settings_are_clear_errors():
    from fcn_jax.errors import InputError

    with pytest.raises(InputError, match="perturbation-scale-km must be > 0"):
        P.spherical_basis(LAT, LON, 0.0)
    with pytest.raises(InputError, match="equally spaced longitudes"):
        P.spherical_basis(LAT, np.r_[0.0, 10.0, 15.0, 40.0], 500.0)
