"""Independent NumPy reference of the FourCastNet (AFNO v0) forward pass.

Written only from the spec (`/work/shared/spec/fourcastnet-model.md`, §2-§4,
§6, §9) and deliberately *not* from ``fcn_jax.model``: the tests compare the
JAX model against this file, so a shared misreading would go unnoticed if the
two shared code.  Everything is computed in float64 with plain NumPy (plus
``scipy.special.erf`` for the exact GELU), in the PyTorch layout (NCHW images,
PyTorch ``state_dict`` keys and shapes), so the only layout conversion under
test is the one the JAX side performs.

Public API
----------
``RefConfig``                      hyper-parameters (small dataclass)
``state_dict_keys_and_shapes``     keys/shapes in PyTorch ``state_dict()`` order
``reference_param_count``          (#tensors, #parameters) from shapes only
``random_state_dict``              float32 random weights with test-friendly scales
``afnonet_forward``                AFNONet forward, NCHW -> NCHW, float64
``precipnet_forward``              PrecipNet forward, NCHW -> (B, 1, H, W), float64

Building blocks (exposed for finer-grained tests): ``layer_norm``,
``gelu_erf``, ``gelu_tanh``, ``softshrink``, ``patch_embed``, ``unpatchify``,
``afno_filter``, ``afno_modes``, ``irfft2_explicit``, ``periodic_pad``,
``conv2d_3x3``.
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np
from scipy.special import erf

LN_EPS = 1e-6  # spec §3: LayerNorm eps is 1e-6, not PyTorch's 1e-5 default.


# --------------------------------------------------------------------------
# Configuration and parameter layout
# --------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class RefConfig:
    """AFNONet hyper-parameters (spec §1); defaults are a tiny test model."""

    img_size: tuple[int, int] = (32, 64)  # (H, W) pixels: (lat, lon)
    patch_size: tuple[int, int] = (8, 8)
    in_chans: int = 3
    out_chans: int = 2
    embed_dim: int = 32
    depth: int = 2
    mlp_ratio: float = 4.0
    num_blocks: int = 4
    sparsity_threshold: float = 0.01
    hard_thresholding_fraction: float = 1.0

    def __post_init__(self):
        H, W = self.img_size
        ph, pw = self.patch_size
        if H % ph or W % pw:
            raise ValueError(f"img_size {self.img_size} not divisible by patch {self.patch_size}")
        if self.embed_dim % self.num_blocks:
            raise ValueError("embed_dim must be divisible by num_blocks")

    @property
    def grid(self) -> tuple[int, int]:
        """Token grid (Ht, Wt) = (lat patches, lon patches)."""
        return (self.img_size[0] // self.patch_size[0], self.img_size[1] // self.patch_size[1])

    @property
    def num_tokens(self) -> int:
        return self.grid[0] * self.grid[1]

    @property
    def block_size(self) -> int:
        return self.embed_dim // self.num_blocks

    @property
    def mlp_hidden(self) -> int:
        # timm/FourCastNet: int(dim * mlp_ratio)
        return int(self.embed_dim * self.mlp_ratio)


PUBLISHED = RefConfig(
    img_size=(720, 1440), patch_size=(8, 8), in_chans=20, out_chans=20,
    embed_dim=768, depth=12, mlp_ratio=4.0, num_blocks=8,
)
PUBLISHED_PRECIP = dataclasses.replace(PUBLISHED, out_chans=1)


def _backbone_keys(cfg: RefConfig) -> list[tuple[str, tuple[int, ...]]]:
    E, nb, d, hid = cfg.embed_dim, cfg.num_blocks, cfg.block_size, cfg.mlp_hidden
    ph, pw = cfg.patch_size
    out = [
        # Module's own parameter first, then sub-modules in registration order (spec §9).
        ("pos_embed", (1, cfg.num_tokens, E)),
        ("patch_embed.proj.weight", (E, cfg.in_chans, ph, pw)),
        ("patch_embed.proj.bias", (E,)),
    ]
    for i in range(cfg.depth):
        b = f"blocks.{i}."
        out += [
            (b + "norm1.weight", (E,)),
            (b + "norm1.bias", (E,)),
            (b + "filter.w1", (2, nb, d, d)),
            (b + "filter.b1", (2, nb, d)),
            (b + "filter.w2", (2, nb, d, d)),
            (b + "filter.b2", (2, nb, d)),
            (b + "norm2.weight", (E,)),
            (b + "norm2.bias", (E,)),
            (b + "mlp.fc1.weight", (hid, E)),
            (b + "mlp.fc1.bias", (hid,)),
            (b + "mlp.fc2.weight", (E, hid)),
            (b + "mlp.fc2.bias", (E,)),
        ]
    out += [
        ("norm.weight", (E,)),  # present in the checkpoint, never used by forward
        ("norm.bias", (E,)),
        ("head.weight", (cfg.out_chans * ph * pw, E)),  # no bias
    ]
    return out


def state_dict_keys_and_shapes(cfg: RefConfig, kind: str = "backbone") -> list[tuple[str, tuple[int, ...]]]:
    """Keys and shapes in exactly the PyTorch ``state_dict()`` order, no ``module.`` prefix.

    ``kind="precip"``: ``backbone.`` + the backbone keys of ``cfg`` (whose
    ``out_chans`` is used as given, normally 1), then ``conv.weight``/``conv.bias``.
    """
    if kind == "backbone":
        return _backbone_keys(cfg)
    if kind == "precip":
        return [("backbone." + k, s) for k, s in _backbone_keys(cfg)] + [
            ("conv.weight", (1, 1, 3, 3)),
            ("conv.bias", (1,)),
        ]
    raise ValueError(f"unknown kind {kind!r}")


def reference_param_count(cfg: RefConfig, kind: str = "backbone") -> tuple[int, int]:
    """(number of tensors, number of scalar parameters), from shapes only."""
    shapes = [s for _, s in state_dict_keys_and_shapes(cfg, kind)]
    return len(shapes), sum(math.prod(s) for s in shapes)


# --------------------------------------------------------------------------
# Random weights
# --------------------------------------------------------------------------


def random_state_dict(cfg: RefConfig, kind: str = "backbone", seed: int = 0) -> dict[str, np.ndarray]:
    """Random float32 state dict whose scales make every parameter matter.

    The trained-from-scratch init (spec §5: zero biases, unit LayerNorms,
    0.02-std weights) would let bugs hide (a swapped LN weight/bias, a missing
    bias, tanh-GELU, a wrong spectral truncation would all be invisible or
    below float32 noise).  Scales, for an input x ~ N(0, 1):

    * ``pos_embed`` 0.3·N: visible next to the ~unit patch features, not dominant.
    * ``patch_embed.proj.weight`` N(0, 1/fan_in), fan_in = C·p·p -> unit token
      features; bias 0.1·N.
    * LayerNorm weight 1 + 0.1·N, bias 0.1·N (also for the unused final
      ``norm``, so applying it by mistake is caught).
    * ``filter.w1`` N(0,1)/sqrt(2d) (d = block size): layer-1 pre-activations of
      the ~unit ortho spectrum are ~unit, so ReLU on Re/Im cuts about half;
      ``b1`` 0.3·N shifts that cut.  ``filter.w2`` 0.07·N(0,1)/sqrt(2d) and
      ``b2`` 0.02·N: layer-2 outputs have std ~0.03-0.05, so softshrink(0.01)
      zeroes a sizeable fraction (~15-30 %) but not all, and its ±λ shift is
      ~25 % of a typical value.  The spectral branch then adds ~0.03-0.05 per
      pixel, far above float32 rounding (~1e-6).
    * ``mlp.fc1.weight`` 2·N(0, 1/E), bias 0.5·N: pre-activations std ~2, where
      erf- and tanh-GELU differ by up to ~5e-4 (the difference peaks at
      |x| ~ 2-3); ``mlp.fc2.weight`` N(0, 1/hidden), bias 0.1·N.
    * ``head.weight`` N(0, 1/E): unit-scale outputs.
    * PrecipNet ``conv.weight`` N(0, 1)/3 (PyTorch default range), bias 0.3 so
      that most but not all pixels survive the final ReLU.

    ``tests/test_reference_fcn.py`` checks that perturbing any used tensor
    changes the output well above float32 tolerance.
    """
    rng = np.random.default_rng(seed)
    d = cfg.block_size
    out: dict[str, np.ndarray] = {}
    for key, shape in state_dict_keys_and_shapes(cfg, kind):
        name = key[len("backbone."):] if key.startswith("backbone.") else key
        n = lambda: rng.standard_normal(shape)  # noqa: E731
        if name == "pos_embed":
            v = 0.3 * n()
        elif name == "patch_embed.proj.weight":
            v = n() / math.sqrt(math.prod(shape[1:]))
        elif name.endswith(("norm1.weight", "norm2.weight")) or name == "norm.weight":
            v = 1.0 + 0.1 * n()
        elif name.endswith(("norm1.bias", "norm2.bias")) or name in ("norm.bias", "patch_embed.proj.bias"):
            v = 0.1 * n()
        elif name.endswith("filter.w1"):
            v = n() / math.sqrt(2 * d)
        elif name.endswith("filter.b1"):
            v = 0.3 * n()
        elif name.endswith("filter.w2"):
            v = 0.07 * n() / math.sqrt(2 * d)
        elif name.endswith("filter.b2"):
            v = 0.02 * n()
        elif name.endswith("mlp.fc1.weight"):
            v = 2.0 * n() / math.sqrt(shape[1])
        elif name.endswith("mlp.fc1.bias"):
            v = 0.5 * n()
        elif name.endswith("mlp.fc2.weight"):
            v = n() / math.sqrt(shape[1])
        elif name.endswith("mlp.fc2.bias"):
            v = 0.1 * n()
        elif name == "head.weight":
            v = n() / math.sqrt(shape[1])
        elif name == "conv.weight":
            v = n() / 3.0
        elif name == "conv.bias":
            v = np.full(shape, 0.3)
        else:  # pragma: no cover - every key is listed above
            raise KeyError(key)
        out[key] = np.asarray(v, dtype=np.float32)
    return out


# --------------------------------------------------------------------------
# Building blocks (float64)
# --------------------------------------------------------------------------


def _f64(a) -> np.ndarray:
    return np.asarray(a, dtype=np.float64)


def layer_norm(x: np.ndarray, weight, bias, eps: float = LN_EPS) -> np.ndarray:
    """LayerNorm over the last axis: two-pass biased variance, affine (PyTorch semantics)."""
    mu = x.mean(axis=-1, keepdims=True)
    xc = x - mu
    var = (xc * xc).mean(axis=-1, keepdims=True)
    return xc / np.sqrt(var + eps) * _f64(weight) + _f64(bias)


def gelu_erf(x: np.ndarray) -> np.ndarray:
    """Exact GELU, x·Φ(x) (PyTorch ``nn.GELU()`` default)."""
    return 0.5 * x * (1.0 + erf(x / math.sqrt(2.0)))


def gelu_tanh(x: np.ndarray) -> np.ndarray:
    """tanh approximation (``jax.nn.gelu`` default) - only to show the tests can tell them apart."""
    return 0.5 * x * (1.0 + np.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x**3)))


def softshrink(v: np.ndarray, lam: float) -> np.ndarray:
    """v-λ above λ, v+λ below -λ, 0 in between (applied to real arrays)."""
    return np.where(v > lam, v - lam, np.where(v < -lam, v + lam, 0.0))


def patch_embed(x: np.ndarray, weight, bias, patch: tuple[int, int]) -> np.ndarray:
    """Conv2d(kernel = stride = patch, with bias) on NCHW -> channels-last tokens (B, Ht, Wt, E).

    A stride-p, kernel-p convolution is a matmul on non-overlapping patches
    flattened in (channel, row, col) order - the order of the OIHW weight.
    """
    B, C, H, W = x.shape
    ph, pw = patch
    Ht, Wt = H // ph, W // pw
    pt = x.reshape(B, C, Ht, ph, Wt, pw).transpose(0, 2, 4, 1, 3, 5).reshape(B, Ht, Wt, C * ph * pw)
    w = _f64(weight)
    return pt @ w.reshape(w.shape[0], -1).T + _f64(bias)


def unpatchify(feat: np.ndarray, patch: tuple[int, int], out_chans: int) -> np.ndarray:
    """(B, Ht, Wt, p1·p2·C) -> NCHW (B, C, Ht·p1, Wt·p2); feature index (i·p2 + j)·C + c, c fastest."""
    B, Ht, Wt, _ = feat.shape
    ph, pw = patch
    y = feat.reshape(B, Ht, Wt, ph, pw, out_chans)  # b h w p1 p2 c
    return y.transpose(0, 5, 1, 3, 2, 4).reshape(B, out_chans, Ht * ph, Wt * pw)


def afno_modes(Ht: int, Wt: int, fraction: float) -> tuple[slice, slice]:
    """Processed (lat-row, lon-bin) slices of the rfft2 half-spectrum (spec §4.2 step 3, §4.3).

    ``total_modes = Ht//2 + 1`` comes from the *latitude* token count and is
    used for both axes; latitude rows ``[total-kept, total+kept)`` and
    longitude bins ``[0, kept)``, both clipped to the array (Python slicing).
    """
    total = Ht // 2 + 1
    kept = int(total * fraction)
    lat = slice(max(total - kept, 0), min(total + kept, Ht))
    lon = slice(0, min(kept, Wt // 2 + 1))
    return lat, lon


def irfft2_explicit(spec: np.ndarray, shape: tuple[int, int], axes=(1, 2)) -> np.ndarray:
    """Inverse 2-D real FFT ("ortho") written with explicit DFT sums, no numpy.fft.

    Spec §4.4 formulation: complex inverse DFT along latitude, then along
    longitude synthesise a real signal from the half spectrum, using only the
    real part of bin 0 (and of the Nyquist bin when n is even):

        x[n] = (Re X0 + 2·Σ_{0<k<n/2} Re(X_k e^{2πikn/N}) + [N even] Re X_{N/2} (-1)^n) / sqrt(N)

    Bins beyond N//2 are ignored.  Used to cross-check ``numpy.fft.irfft2``.
    """
    H, W = shape
    a_lat, a_lon = axes
    s = np.moveaxis(np.asarray(spec, dtype=np.complex128), (a_lat, a_lon), (-2, -1))
    # latitude: full complex inverse DFT (input may have more/fewer rows: crop/zero-pad like numpy)
    rows = np.zeros(s.shape[:-2] + (H, s.shape[-1]), dtype=np.complex128)
    m = min(H, s.shape[-2])
    rows[..., :m, :] = s[..., :m, :]
    n = np.arange(H)
    F_lat = np.exp(2j * np.pi * np.outer(n, n) / H) / math.sqrt(H)  # (n_out, k)
    t = np.einsum("nk,...kw->...nw", F_lat, rows)
    # longitude: real synthesis from the half spectrum
    nbins = W // 2 + 1
    half = np.zeros(t.shape[:-1] + (nbins,), dtype=np.complex128)
    mb = min(nbins, t.shape[-1])
    half[..., :mb] = t[..., :mb]
    k = np.arange(nbins)
    coef = np.full(nbins, 2.0)
    coef[0] = 1.0
    if W % 2 == 0:
        coef[-1] = 1.0
    ang = 2.0 * np.pi * np.outer(k, np.arange(W)) / W  # (k, n)
    out = (
        np.einsum("...k,kn->...n", half.real * coef, np.cos(ang))
        - np.einsum("...k,kn->...n", half.imag * coef, np.sin(ang))
    ) / math.sqrt(W)
    # sin(0)=0 and sin(pi n)=0, so Im of bin 0 / Nyquist drop out automatically.
    return np.moveaxis(out, (-2, -1), (a_lat, a_lon))


def afno_filter(z: np.ndarray, w1, b1, w2, b2, num_blocks: int,
                sparsity_threshold: float = 0.01, hard_thresholding_fraction: float = 1.0,
                inverse: str = "numpy") -> np.ndarray:
    """AFNO2D on channels-last z (B, Ht, Wt, E); returns spectral(z) + z (spec §4.2).

    ``inverse``: "numpy" (``numpy.fft.irfft2``) or "explicit" (``irfft2_explicit``).
    """
    B, Ht, Wt, E = z.shape
    nb = num_blocks
    d = E // nb
    w1, b1, w2, b2 = map(_f64, (w1, b1, w2, b2))
    Z = np.fft.rfft2(z, axes=(1, 2), norm="ortho").reshape(B, Ht, Wt // 2 + 1, nb, d)
    lat, lon = afno_modes(Ht, Wt, hard_thresholding_fraction)
    Xr, Xi = Z.real[:, lat, lon], Z.imag[:, lat, lon]
    mm = lambda a, w: np.einsum("...bi,bio->...bo", a, w)  # noqa: E731  row vector @ (in, out)
    o1r = np.maximum(mm(Xr, w1[0]) - mm(Xi, w1[1]) + b1[0], 0.0)
    o1i = np.maximum(mm(Xi, w1[0]) + mm(Xr, w1[1]) + b1[1], 0.0)
    o2r = mm(o1r, w2[0]) - mm(o1i, w2[1]) + b2[0]
    o2i = mm(o1i, w2[0]) + mm(o1r, w2[1]) + b2[1]
    out = np.zeros(Z.shape, dtype=np.complex128)  # exactly zero outside the processed region
    out[:, lat, lon] = softshrink(o2r, sparsity_threshold) + 1j * softshrink(o2i, sparsity_threshold)
    out = out.reshape(B, Ht, Wt // 2 + 1, E)
    if inverse == "numpy":
        spatial = np.fft.irfft2(out, s=(Ht, Wt), axes=(1, 2), norm="ortho")
    elif inverse == "explicit":
        spatial = irfft2_explicit(out, (Ht, Wt), axes=(1, 2))
    else:
        raise ValueError(inverse)
    return spatial + z


def periodic_pad(x: np.ndarray, pad: int = 1) -> np.ndarray:
    """PrecipNet PeriodicPad2d: circular along lon (last axis), then zero rows along lat."""
    x = np.concatenate([x[..., -pad:], x, x[..., :pad]], axis=-1)
    z = np.zeros(x.shape[:-2] + (pad, x.shape[-1]), dtype=x.dtype)
    return np.concatenate([z, x, z], axis=-2)


def conv2d_3x3(xp: np.ndarray, weight, bias) -> np.ndarray:
    """Valid 3x3 cross-correlation, 1 -> 1 channel (PyTorch Conv2d), on (B, 1, H+2, W+2)."""
    w = _f64(weight)[0, 0]
    H, W = xp.shape[-2] - 2, xp.shape[-1] - 2
    out = np.zeros(xp.shape[:-2] + (H, W))
    for a in range(3):
        for b in range(3):
            out += w[a, b] * xp[..., a:a + H, b:b + W]
    return out + _f64(bias)[0]


# --------------------------------------------------------------------------
# Full models
# --------------------------------------------------------------------------


def afnonet_forward(sd: dict, x: np.ndarray, cfg: RefConfig, *, prefix: str = "",
                    gelu=gelu_erf, inverse: str = "numpy") -> np.ndarray:
    """AFNONet forward (spec §2-§4): NCHW (B, C_in, H, W) -> NCHW (B, C_out, H, W), float64.

    ``prefix`` selects keys (``"backbone."`` for PrecipNet); ``gelu`` and
    ``inverse`` exist only so self-tests can show which details matter.
    """
    g = lambda k: _f64(sd[prefix + k])  # noqa: E731
    x = _f64(x)
    B, C, H, W = x.shape
    assert (C, H, W) == (cfg.in_chans, *cfg.img_size), (x.shape, cfg)
    Ht, Wt = cfg.grid
    E = cfg.embed_dim
    h = patch_embed(x, g("patch_embed.proj.weight"), g("patch_embed.proj.bias"), cfg.patch_size)
    # token index h·Wt + w  <=>  row-major reshape of pos_embed to the grid
    h = h + g("pos_embed").reshape(Ht, Wt, E)
    for i in range(cfg.depth):
        b = f"blocks.{i}."
        z = layer_norm(h, g(b + "norm1.weight"), g(b + "norm1.bias"))
        y = afno_filter(z, g(b + "filter.w1"), g(b + "filter.b1"), g(b + "filter.w2"),
                        g(b + "filter.b2"), cfg.num_blocks, cfg.sparsity_threshold,
                        cfg.hard_thresholding_fraction, inverse=inverse)
        x1 = y + h  # double skip: first residual
        u = layer_norm(x1, g(b + "norm2.weight"), g(b + "norm2.bias"))
        u = gelu(u @ g(b + "mlp.fc1.weight").T + g(b + "mlp.fc1.bias"))
        h = x1 + (u @ g(b + "mlp.fc2.weight").T + g(b + "mlp.fc2.bias"))
    # final `norm` deliberately NOT applied (spec §2 step 6)
    feat = h @ g("head.weight").T  # head has no bias
    return unpatchify(feat, cfg.patch_size, cfg.out_chans)


def precipnet_forward(sd: dict, x: np.ndarray, cfg: RefConfig, *, gelu=gelu_erf) -> np.ndarray:
    """PrecipNet (spec §6): backbone -> periodic/zero pad 1 -> 3x3 conv -> ReLU; (B, 1, H, W)."""
    y = afnonet_forward(sd, x, cfg, prefix="backbone.", gelu=gelu)
    assert y.shape[1] == 1, "PrecipNet conv is 1 -> 1; use a cfg with out_chans=1"
    y = conv2d_3x3(periodic_pad(y, 1), sd["conv.weight"], sd["conv.bias"])
    return np.maximum(y, 0.0)
