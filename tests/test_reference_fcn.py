"""Self-tests of the NumPy reference (tests/reference_fcn.py).

The JAX model is validated against the reference, so the reference itself
must be checked against things that do not depend on it: published counts,
hand-written loops, and two independent inverse-FFT formulations.
"""

import dataclasses

import numpy as np
import pytest

from tests import reference_fcn as R

TINY = R.RefConfig(img_size=(32, 64), patch_size=(8, 8), in_chans=3, out_chans=2,
                   embed_dim=32, depth=2, mlp_ratio=4.0, num_blocks=4)


def _x(cfg, batch=2, seed=1):
    return np.random.default_rng(seed).standard_normal((batch, cfg.in_chans, *cfg.img_size))


# ----------------------------------------------------------------- shapes

def test_published_counts_from_shapes_only():
    assert R.reference_param_count(R.PUBLISHED, "backbone") == (150, 74_691_840)
    assert R.reference_param_count(R.PUBLISHED_PRECIP, "precip") == (152, 73_757_962)
    ks = R.state_dict_keys_and_shapes(R.PUBLISHED)
    assert ks[:3] == [("pos_embed", (1, 16200, 768)),
                      ("patch_embed.proj.weight", (768, 20, 8, 8)),
                      ("patch_embed.proj.bias", (768,))]
    assert ks[1][1][1] == 20  # ECMWF's loader checks the second key's shape[1]
    assert [k for k, _ in ks[3:15]] == [
        "blocks.0." + s for s in (
            "norm1.weight", "norm1.bias", "filter.w1", "filter.b1", "filter.w2", "filter.b2",
            "norm2.weight", "norm2.bias", "mlp.fc1.weight", "mlp.fc1.bias",
            "mlp.fc2.weight", "mlp.fc2.bias")]
    d = dict(ks)
    assert d["blocks.11.filter.w1"] == (2, 8, 96, 96)
    assert d["blocks.11.filter.b2"] == (2, 8, 96)
    assert d["blocks.0.mlp.fc1.weight"] == (3072, 768)
    assert d["blocks.0.mlp.fc2.weight"] == (768, 3072)
    assert ks[-3:] == [("norm.weight", (768,)), ("norm.bias", (768,)), ("head.weight", (1280, 768))]
    block = sum(np.prod(s) for k, s in ks if k.startswith("blocks.0."))
    assert block == 5_023_488
    kp = R.state_dict_keys_and_shapes(R.PUBLISHED_PRECIP, "precip")
    assert kp[0][0] == "backbone.pos_embed"
    assert kp[-3:] == [("backbone.head.weight", (64, 768)), ("conv.weight", (1, 1, 3, 3)),
                       ("conv.bias", (1,))]


def test_random_state_dict_matches_layout():
    for kind, cfg in (("backbone", TINY), ("precip", dataclasses.replace(TINY, out_chans=1))):
        sd = R.random_state_dict(cfg, kind, seed=0)
        ks = R.state_dict_keys_and_shapes(cfg, kind)
        assert list(sd) == [k for k, _ in ks]
        for k, s in ks:
            assert sd[k].shape == s and sd[k].dtype == np.float32, k
    a = R.random_state_dict(TINY, seed=0)
    b = R.random_state_dict(TINY, seed=0)
    c = R.random_state_dict(TINY, seed=1)
    assert all(np.array_equal(a[k], b[k]) for k in a)
    assert not np.array_equal(a["head.weight"], c["head.weight"])


# ----------------------------------------------------------------- FFT

@pytest.mark.parametrize("hw", [(4, 8), (5, 9), (6, 7)])
def test_inverse_fft_formulations_agree_on_non_hermitian_input(hw):
    H, W = hw
    rng = np.random.default_rng(0)
    # arbitrary complex half-spectrum: DC and Nyquist columns carry imaginary parts
    spec = rng.standard_normal((2, H, W // 2 + 1, 3)) + 1j * rng.standard_normal((2, H, W // 2 + 1, 3))
    a = np.fft.irfft2(spec, s=(H, W), axes=(1, 2), norm="ortho")
    b = R.irfft2_explicit(spec, (H, W), axes=(1, 2))
    np.testing.assert_allclose(a, b, atol=1e-12)
    # spec §4.4 wording: ifft(lat) -> discard Im of lon bin 0 (and Nyquist) -> irfft(lon)
    t = np.fft.ifft(spec, axis=1, norm="ortho")
    t[:, :, 0] = t[:, :, 0].real
    if W % 2 == 0:
        t[:, :, -1] = t[:, :, -1].real
    c = np.fft.irfft(t, n=W, axis=2, norm="ortho")
    np.testing.assert_allclose(a, c, atol=1e-12)
    # and real input round-trips
    x = rng.standard_normal((2, H, W, 3))
    np.testing.assert_allclose(R.irfft2_explicit(np.fft.rfft2(x, axes=(1, 2), norm="ortho"), (H, W)), x,
                               atol=1e-12)


def test_afno_modes():
    assert R.afno_modes(90, 180, 1.0) == (slice(0, 90), slice(0, 46))
    assert R.afno_modes(4, 8, 1.0) == (slice(0, 4), slice(0, 3))
    assert R.afno_modes(4, 8, 0.5) == (slice(2, 4), slice(0, 1))  # kept = int(3*0.5) = 1
    assert R.afno_modes(4, 2, 1.0) == (slice(0, 4), slice(0, 2))  # lon bins clipped to Wt//2+1


def test_filter_spectrum_confined_and_softshrink_active():
    cfg = TINY
    sd = R.random_state_dict(cfg, seed=0)
    Ht, Wt = cfg.grid
    h = R.patch_embed(_x(cfg), sd["patch_embed.proj.weight"], sd["patch_embed.proj.bias"],
                      cfg.patch_size) + sd["pos_embed"].reshape(Ht, Wt, -1)
    for i in range(cfg.depth):
        z = R.layer_norm(h, sd[f"blocks.{i}.norm1.weight"], sd[f"blocks.{i}.norm1.bias"])
        w = [sd[f"blocks.{i}.filter.{k}"] for k in ("w1", "b1", "w2", "b2")]
        s = R.afno_filter(z, *w, cfg.num_blocks) - z
        S = np.fft.rfft2(s, axes=(1, 2), norm="ortho")
        _, lon = R.afno_modes(Ht, Wt, 1.0)
        assert np.abs(S[:, :, lon.stop:]).max() < 1e-12  # bins >= kept stay zero
        assert np.abs(S[:, :, :lon.stop]).max() > 1e-2
        # numpy irfft2 and the explicit transform give the same filter
        np.testing.assert_allclose(R.afno_filter(z, *w, cfg.num_blocks, inverse="explicit") - z, s,
                                   atol=1e-12)
        # fraction of layer-2 outputs that softshrink(0.01) zeroes: some but not all
        Z = np.fft.rfft2(z, axes=(1, 2), norm="ortho")[:, :, lon].reshape(*S[:, :, lon].shape[:3],
                                                                           cfg.num_blocks, -1)
        w1, b1, w2, b2 = (np.float64(a) for a in w)
        mm = lambda a, m: np.einsum("...bi,bio->...bo", a, m)  # noqa: E731
        o1r = np.maximum(mm(Z.real, w1[0]) - mm(Z.imag, w1[1]) + b1[0], 0)
        o1i = np.maximum(mm(Z.imag, w1[0]) + mm(Z.real, w1[1]) + b1[1], 0)
        o2 = np.concatenate([(mm(o1r, w2[0]) - mm(o1i, w2[1]) + b2[0]).ravel(),
                             (mm(o1i, w2[0]) + mm(o1r, w2[1]) + b2[1]).ravel()])
        frac = np.mean(np.abs(o2) <= cfg.sparsity_threshold)
        assert 0.05 < frac < 0.6, frac
        assert 0.05 < np.mean(o1r == 0) < 0.95  # ReLU active but not saturating


def test_softshrink_and_layer_norm_and_gelu():
    v = np.array([-0.02, -0.01, -0.005, 0.0, 0.005, 0.01, 0.03])
    np.testing.assert_allclose(R.softshrink(v, 0.01), [-0.01, 0, 0, 0, 0, 0, 0.02], atol=1e-15)
    x = np.random.default_rng(0).standard_normal((5, 7)) * 1e-3 + 3.0
    y = R.layer_norm(x, np.ones(7), np.zeros(7))
    var = x.var(axis=-1, keepdims=True)  # biased
    np.testing.assert_allclose(y, (x - x.mean(-1, keepdims=True)) / np.sqrt(var + 1e-6), rtol=1e-12)
    assert abs(R.gelu_erf(np.array([1.0]))[0] - 0.8413447460685429) < 1e-15  # Φ(1)
    t = np.linspace(-4, 4, 801)
    assert np.abs(R.gelu_erf(t) - R.gelu_tanh(t)).max() > 1e-4


# ----------------------------------------------------------------- hand-checkable cases

def test_depth0_matches_explicit_pixel_loop():
    cfg = R.RefConfig(img_size=(8, 12), patch_size=(4, 4), in_chans=2, out_chans=3, embed_dim=5,
                      depth=0, num_blocks=1)
    sd = {k: np.float64(v) for k, v in R.random_state_dict(cfg, seed=2).items()}
    x = _x(cfg, batch=1)
    y = R.afnonet_forward(sd, x, cfg)
    p, C, (Ht, Wt) = 4, cfg.out_chans, cfg.grid
    Wpe, bpe, pos, head = (sd["patch_embed.proj.weight"], sd["patch_embed.proj.bias"],
                           sd["pos_embed"][0], sd["head.weight"])
    ref = np.zeros_like(y)
    for h in range(Ht):
        for w in range(Wt):
            tok = bpe + pos[h * Wt + w]
            for e in range(cfg.embed_dim):
                for ci in range(cfg.in_chans):
                    for a in range(p):
                        for b in range(p):
                            tok[e] += Wpe[e, ci, a, b] * x[0, ci, p * h + a, p * w + b]
            for i in range(p):
                for j in range(p):
                    for c in range(C):
                        ref[0, c, p * h + i, p * w + j] = head[(i * p + j) * C + c] @ tok
    np.testing.assert_allclose(y, ref, rtol=1e-12, atol=1e-12)


def test_unpatchify_order_with_identity_head():
    cfg = R.RefConfig(img_size=(6, 9), patch_size=(3, 3), in_chans=1, out_chans=2,
                      embed_dim=18, depth=0, num_blocks=1)  # E = out·p·p
    Ht, Wt = cfg.grid
    sd = R.random_state_dict(cfg, seed=0)
    sd["patch_embed.proj.weight"][:] = 0
    sd["patch_embed.proj.bias"][:] = 0
    t, f = np.meshgrid(np.arange(cfg.num_tokens), np.arange(18), indexing="ij")
    sd["pos_embed"] = (1000.0 * t + f)[None].astype(np.float32)  # encodes (token, feature)
    sd["head.weight"] = np.eye(18, dtype=np.float32)
    y = R.afnonet_forward(sd, np.zeros((1, 1, 6, 9)), cfg)
    for c in range(2):
        for r in range(6):
            for q in range(9):
                h, i, w, j = r // 3, r % 3, q // 3, q % 3
                assert y[0, c, r, q] == 1000 * (h * Wt + w) + (i * 3 + j) * 2 + c


def test_precip_pad_and_conv_by_hand():
    rng = np.random.default_rng(0)
    y = rng.standard_normal((1, 1, 4, 5))
    yp = R.periodic_pad(y)
    assert yp.shape == (1, 1, 6, 7)
    assert np.all(yp[0, 0, 0] == 0) and np.all(yp[0, 0, -1] == 0)  # zero lat rows, incl. corners
    np.testing.assert_array_equal(yp[0, 0, 1:-1, 0], y[0, 0, :, -1])  # circular lon
    np.testing.assert_array_equal(yp[0, 0, 1:-1, -1], y[0, 0, :, 0])
    w = rng.standard_normal((1, 1, 3, 3))
    out = R.conv2d_3x3(yp, w, np.array([0.5]))
    for r in range(4):
        for q in range(5):
            s = 0.5
            for a in (-1, 0, 1):
                for b in (-1, 0, 1):
                    if 0 <= r + a < 4:
                        s += w[0, 0, a + 1, b + 1] * y[0, 0, r + a, (q + b) % 5]
            assert abs(out[0, 0, r, q] - s) < 1e-12


# ----------------------------------------------------------------- whole models

def test_forward_finite_reasonable_and_sensitive():
    cfg = TINY
    sd = R.random_state_dict(cfg, seed=0)
    x = _x(cfg)
    y = R.afnonet_forward(sd, x, cfg)
    assert y.shape == (2, cfg.out_chans, *cfg.img_size) and y.dtype == np.float64
    assert np.isfinite(y).all()
    assert 0.3 < y.std() < 10 and np.abs(y).max() < 100
    # explicit inverse FFT gives the same model output
    np.testing.assert_allclose(R.afnonet_forward(sd, x, cfg, inverse="explicit"), y, atol=1e-10)
    # erf vs tanh GELU is visible far above float32 rounding
    assert np.abs(R.afnonet_forward(sd, x, cfg, gelu=R.gelu_tanh) - y).max() > 1e-4
    # every used tensor matters (1 % relative perturbation); final norm does not
    for k in sd:
        sd2 = dict(sd)
        sd2[k] = sd[k] * np.float32(1.01)
        diff = np.abs(R.afnonet_forward(sd2, x, cfg) - y).max()
        if k.startswith("norm."):
            assert diff == 0, k
        else:
            assert diff > 5e-4, (k, diff)
    # batch elements are independent
    np.testing.assert_allclose(R.afnonet_forward(sd, x[1:], cfg), y[1:], atol=1e-12)


def test_fraction_below_one_changes_output():
    cfg = dataclasses.replace(TINY, hard_thresholding_fraction=0.5)
    sd = R.random_state_dict(cfg, seed=0)
    x = _x(cfg)
    a = R.afnonet_forward(sd, x, cfg)
    b = R.afnonet_forward(sd, x, TINY)
    assert np.isfinite(a).all() and np.abs(a - b).max() > 1e-3
    np.testing.assert_allclose(R.afnonet_forward(sd, x, cfg, inverse="explicit"), a, atol=1e-10)


def test_precipnet_forward():
    cfg = dataclasses.replace(TINY, out_chans=1)
    sd = R.random_state_dict(cfg, "precip", seed=0)
    x = _x(cfg)
    y = R.precipnet_forward(sd, x, cfg)
    assert y.shape == (2, 1, *cfg.img_size) and np.isfinite(y).all()
    assert y.min() == 0 and 0.2 < np.mean(y > 0) < 0.95  # ReLU active, output not all zero
    bb = {k[len("backbone."):]: v for k, v in sd.items() if k.startswith("backbone.")}
    z = R.afnonet_forward(bb, x, cfg)
    ref = np.maximum(R.conv2d_3x3(R.periodic_pad(z), sd["conv.weight"], sd["conv.bias"]), 0)
    np.testing.assert_allclose(y, ref, atol=1e-12)
