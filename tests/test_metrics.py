"""fcn_jax.metrics against independent implementations (xarray, NumPy, scoringrules)."""

import jax
import numpy as np
import pytest
import scoringrules as sr
import xarray as xr
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from fcn_jax import metrics
from fcn_jax.parallel.mesh import make_mesh

RNG = np.random.default_rng(12345)  # distinct from _fields() seeds
N_LAT, N_LON, N_CH = 16, 32, 3
LAT = np.linspace(87.1875, -87.1875, N_LAT)  # equiangular, north first, no poles


def _fields(shape=(4, N_LAT, N_LON, N_CH), seed=0):
    rng = np.random.default_rng(seed)
    truth = rng.normal(size=shape).astype(np.float32)
    pred = (truth + 0.5 * rng.normal(size=shape) + 0.1).astype(np.float32)
    return pred, truth


# --------------------------------------------------------------------------- #
# weights
# --------------------------------------------------------------------------- #


def test_fcn_weights_quirk_720():
    w = metrics.lat_weights(None, 720, scheme="fcn")
    assert w.shape == (720,) and w.dtype == np.float32
    assert w[0] == 0.0 and w[-1] == 0.0  # both end rows are taken as the poles
    assert abs(float(w.astype(np.float64).mean()) - 1.0) < 1e-6
    np.testing.assert_allclose(w, w[::-1], atol=1e-7)  # symmetric: spans 90 .. -90
    # the original's formula written out
    j = np.arange(720)
    c = np.cos(np.pi / 180.0 * (90.0 - j * 180.0 / 719.0))
    np.testing.assert_allclose(w, 720 * c / c.sum(), atol=1e-6)
    # against the true grid (90 .. -89.75) the largest error is ~0.0069 at the southern edge
    w_true = metrics.lat_weights(90.0 - 0.25 * j, scheme="cos")
    err = np.abs(w - w_true)
    assert int(err.argmax()) == 719 and 0.0065 < err.max() < 0.0072


def test_cos_weights_mean_one_and_order_independent():
    w = metrics.lat_weights(LAT, scheme="cos")
    np.testing.assert_allclose(w, np.cos(np.deg2rad(LAT)) / np.cos(np.deg2rad(LAT)).mean(), rtol=1e-6)
    np.testing.assert_allclose(metrics.lat_weights(LAT[::-1], scheme="cos"), w[::-1])
    with pytest.raises(ValueError):
        metrics.lat_weights(None, 16, scheme="cos")


# --------------------------------------------------------------------------- #
# deterministic scores vs xarray / NumPy
# --------------------------------------------------------------------------- #


@pytest.mark.parametrize("scheme", ["cos", "fcn"])
def test_weighted_rmse_mse_bias_mae_match_xarray(scheme):
    pred, truth = _fields()
    w = metrics.lat_weights(LAT, scheme=scheme)
    dims = ("ic", "lat", "lon", "channel")
    d = xr.DataArray(pred.astype(np.float64) - truth, dims=dims)
    wx = xr.DataArray(w.astype(np.float64), dims="lat")
    mse_x = (d**2).weighted(wx).mean(["lat", "lon"])
    np.testing.assert_allclose(metrics.weighted_mse(pred, truth, w), mse_x.values, rtol=1e-5)
    np.testing.assert_allclose(metrics.weighted_rmse(pred, truth, w), np.sqrt(mse_x.values), rtol=1e-5)
    np.testing.assert_allclose(metrics.weighted_bias(pred, truth, w), d.weighted(wx).mean(["lat", "lon"]).values,
                               rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(metrics.weighted_mae(pred, truth, w),
                               abs(d).weighted(wx).mean(["lat", "lon"]).values, rtol=1e-5)
    # a [lat, lon] weight map (e.g. a region mask) gives xarray's 2-D weighted mean
    mask = (np.abs(LAT) >= 20)[:, None] * np.ones((1, N_LON))
    w2 = (w[:, None] * mask).astype(np.float32)
    ref = (d**2).weighted(xr.DataArray(w2.astype(np.float64), dims=("lat", "lon"))).mean(["lat", "lon"])
    np.testing.assert_allclose(metrics.weighted_rmse(pred, truth, w2), np.sqrt(ref.values), rtol=1e-5)


def test_rmse_orders():
    pred, truth = _fields()
    w = metrics.lat_weights(LAT, scheme="cos")
    per_ic = np.asarray(metrics.weighted_rmse(pred, truth, w))  # [ic, ch], sqrt per IC (FCN)
    wb2 = np.asarray(metrics.rmse_after_mean(pred, truth, w, sample_axes=(0,)))
    np.testing.assert_allclose(wb2, np.sqrt((per_ic**2).mean(0)), rtol=1e-6)
    assert np.all(per_ic.mean(0) <= wb2 + 1e-7)  # Jensen


def _acc_numpy(pred, truth, clim, w):
    af, ao = pred.astype(np.float64) - clim, truth.astype(np.float64) - clim
    w = w.astype(np.float64)[:, None, None]
    num = (w * af * ao).sum(axis=(-3, -2))
    return num / np.sqrt((w * af**2).sum(axis=(-3, -2)) * (w * ao**2).sum(axis=(-3, -2)))


def test_weighted_acc_matches_numpy_formula():
    pred, truth = _fields()
    clim = RNG.normal(size=(N_LAT, N_LON, N_CH)).astype(np.float32)
    for scheme in ("fcn", "cos"):
        w = metrics.lat_weights(LAT, scheme=scheme)
        np.testing.assert_allclose(metrics.weighted_acc(pred, truth, clim, w), _acc_numpy(pred, truth, clim, w),
                                   rtol=1e-5, atol=1e-6)
    # unweighted ACC (weights None) and no re-centring: a constant shift of the
    # forecast anomaly changes the score (WB1 would remove it)
    ones = np.ones(N_LAT, np.float32)
    np.testing.assert_allclose(metrics.weighted_acc(pred, truth, clim), _acc_numpy(pred, truth, clim, ones), rtol=1e-5)
    shifted = metrics.weighted_acc(pred + 3.0, truth, clim)
    assert np.all(np.abs(np.asarray(shifted) - _acc_numpy(pred, truth, clim, ones)) > 1e-3)


def test_acc_invariant_under_normalisation_and_degenerate_case():
    pred, truth = _fields()
    clim = RNG.normal(size=(N_LAT, N_LON, N_CH)).astype(np.float32)
    mean, std = np.array([5e4, 280.0, 1.0], np.float32), np.array([3e3, 20.0, 0.5], np.float32)
    w = metrics.lat_weights(LAT, scheme="fcn")
    a_norm = metrics.weighted_acc(pred, truth, clim, w)
    a_phys = metrics.weighted_acc(pred * std + mean, truth * std + mean, clim * std + mean, w)
    np.testing.assert_allclose(a_phys, a_norm, atol=2e-4)
    assert np.all(np.isnan(np.asarray(metrics.weighted_acc(clim[None], truth, clim, w))))
    np.testing.assert_allclose(metrics.weighted_acc(truth, truth, clim, w), 1.0, atol=1e-6)


# --------------------------------------------------------------------------- #
# ensemble scores
# --------------------------------------------------------------------------- #


@pytest.mark.parametrize("estimator,sr_names", [("fair", ("fair", "pwm")), ("nrg", ("nrg",))])
def test_crps_matches_scoringrules(estimator, sr_names):
    members = RNG.normal(size=(7, 3, 5, 6, 2)).astype(np.float32)
    truth = RNG.normal(size=(3, 5, 6, 2)).astype(np.float32)
    got = np.asarray(metrics.crps_ensemble(members, truth, axis=0, estimator=estimator))
    for name in sr_names:
        ref = sr.crps_ensemble(truth.astype(np.float64), members.astype(np.float64), m_axis=0,
                               estimator=name, backend="numpy")
        np.testing.assert_allclose(got, ref, rtol=2e-5, atol=2e-6)
    # member axis elsewhere
    got_last = metrics.crps_ensemble(np.moveaxis(members, 0, -1), truth, axis=-1, estimator=estimator)
    np.testing.assert_allclose(got_last, got, rtol=1e-6)


def test_crps_estimator_relation_and_single_member():
    m = 7
    members = RNG.normal(size=(m, 200)).astype(np.float64)
    truth = RNG.normal(size=200)
    fair = np.asarray(metrics.crps_ensemble(members, truth, 0, "fair"), np.float64)
    nrg = np.asarray(metrics.crps_ensemble(members, truth, 0, "nrg"), np.float64)
    pair = np.abs(members[:, None] - members[None]).sum(axis=(0, 1))
    np.testing.assert_allclose(fair - nrg, -(1 / (2 * m * (m - 1)) - 1 / (2 * m * m)) * pair, rtol=1e-4, atol=1e-6)
    one = metrics.crps_ensemble(members[:1], truth, 0, "fair")  # M = 1: spread 0, CRPS = MAE
    np.testing.assert_allclose(one, np.abs(members[0] - truth), rtol=1e-6, atol=1e-6)


def test_fair_crps_gaussian_expectation():
    # truth exchangeable with N(0, s^2) members: E[fair CRPS] = s / sqrt(pi)
    s, m, n = 2.0, 5, 200_000
    rng = np.random.default_rng(1)
    members, truth = s * rng.normal(size=(m, n)), s * rng.normal(size=n)
    got = float(np.mean(np.asarray(metrics.crps_ensemble(members, truth, 0, "fair"))))
    assert abs(got - s / np.sqrt(np.pi)) < 0.01 * s / np.sqrt(np.pi)


def test_spread_skill_reliable_ensemble():
    m = 4
    rng = np.random.default_rng(2)
    members = rng.normal(size=(m, 64, N_LAT, N_LON, 1)).astype(np.float32)
    truth = rng.normal(size=(64, N_LAT, N_LON, 1)).astype(np.float32)
    w = metrics.lat_weights(LAT, scheme="cos")
    plain = metrics.spread_skill(members, truth, w, axis=0, sample_axes=(0,))
    deb = metrics.spread_skill(members, truth, w, axis=0, sample_axes=(0,), debiased=True)
    assert abs(float(plain["ratio"][0]) - np.sqrt(m / (m + 1))) < 0.02
    assert abs(float(deb["ratio"][0]) - 1.0) < 0.02
    assert abs(float(plain["spread"][0]) - 1.0) < 0.02


# --------------------------------------------------------------------------- #
# sharded arrays give the unsharded numbers
# --------------------------------------------------------------------------- #


def test_sharded_equals_unsharded(devices):
    mesh = make_mesh((2, 1, 2, 2))
    field_spec = NamedSharding(mesh, P("data", "height", "width", None))
    pred, truth = _fields((4, N_LAT, N_LON, N_CH), seed=3)
    clim = RNG.normal(size=(N_LAT, N_LON, N_CH)).astype(np.float32)
    members = (truth[None] + RNG.normal(size=(5,) + truth.shape)).astype(np.float32)
    w = metrics.lat_weights(None, N_LAT, scheme="fcn")

    ps, ts = jax.device_put(pred, field_spec), jax.device_put(truth, field_spec)
    cs = jax.device_put(clim, NamedSharding(mesh, P("height", "width", None)))
    ms = jax.device_put(members, NamedSharding(mesh, P(None, "data", "height", "width", None)))
    assert len(ps.sharding.device_set) == 8

    def scores(p, t, c, mem):
        return {
            "mse": metrics.weighted_mse(p, t, w),
            "rmse": metrics.weighted_rmse(p, t, w),
            "acc": metrics.weighted_acc(p, t, c, w),
            "bias": metrics.weighted_bias(p, t, w),
            "crps_fair": metrics.weighted_crps(mem, t, w, axis=0, estimator="fair"),
            "crps_nrg": metrics.weighted_crps(mem, t, w, axis=0, estimator="nrg"),
            "ssr": metrics.spread_skill(mem, t, w, axis=0, sample_axes=(0,))["ratio"],
        }

    plain = scores(pred, truth, clim, members)
    with jax.set_mesh(mesh):
        sharded = scores(ps, ts, cs, ms)
    for k in plain:
        np.testing.assert_allclose(np.asarray(sharded[k]), np.asarray(plain[k]), rtol=2e-6, atol=1e-7, err_msg=k)


# --------------------------------------------------------------------------- #
# WeatherBench 2 weights and rank histograms
# --------------------------------------------------------------------------- #


def test_wb2_cell_area_weights():
    # cell-centred grid (bands tile the sphere, none clipped): proportional to cos(lat), like "cos"
    centred = np.linspace(90 - 5.625, -90 + 5.625, 16)
    np.testing.assert_allclose(metrics.lat_weights(centred, scheme="wb2"), metrics.lat_weights(centred, scheme="cos"),
                               rtol=1e-5)
    # with pole rows (721-like grid): the pole row gets its half-band's area, sin(90) - sin(90 - d/2)
    lat = np.linspace(90, -90, 19)
    w = metrics.lat_weights(lat, scheme="wb2").astype(np.float64)
    h = np.deg2rad(5.0)
    band = np.array([1 - np.sin(np.pi / 2 - h)] + [np.sin(np.deg2rad(l) + h) - np.sin(np.deg2rad(l) - h)
                                                   for l in lat[1:-1]] + [1 - np.sin(np.pi / 2 - h)])
    np.testing.assert_allclose(w, band / band.mean(), rtol=1e-5)
    assert w[0] > 0 and abs(w.mean() - 1) < 1e-6
    with pytest.raises(ValueError, match="equally spaced"):
        metrics.lat_weights(np.array([0.0, 10.0, 30.0]), scheme="wb2")


def test_rank_counts_known_cases():
    members = np.arange(1, 4, dtype=np.float32).reshape(3, 1, 1, 1) * np.ones((3, 2, 2, 1), np.float32)  # 1, 2, 3
    truth = np.array([[0.5, 1.5], [2.5, 9.0]], np.float32)[..., None]  # ranks 0, 1, 2, 3
    np.testing.assert_array_equal(np.asarray(metrics.rank_counts(members, truth, axis=0)), [[1, 1, 1, 1]])
    # exchangeable truth: a flat histogram on average
    rng = np.random.default_rng(4)
    m = rng.normal(size=(4, 50, 16, 32, 1))
    counts = np.asarray(metrics.rank_counts(m, rng.normal(size=(50, 16, 32, 1)), axis=0)).sum(0)  # [ch, M+1]
    assert counts.sum() == 50 * 16 * 32 and np.all(np.abs(counts[0] / counts.sum() - 0.2) < 0.01)
