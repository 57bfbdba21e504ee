"""The AFNO spectral filter: distributed FFT + block-diagonal complex MLP.

This is the one function of the model that runs FFTs. It is written for the
local shards of a fully manual ``jax.shard_map`` over ``(data, channel, height,
width)`` and uses the *channel-block* layout (parallelism spec §3.1): two
all-to-alls per transform trade the spatial split for a channel split, so each
device transforms whole planes for its slice of whole AFNO blocks. On a single
device all collectives vanish and this is exactly the original's filter.

Semantics follow the original FourCastNet ``AFNO2D`` (model spec §4):
float32 ortho rfft2 over (lat, lon); ``total = H_tokens // 2 + 1``,
``kept = int(total * hard_thresholding_fraction)``; only latitude-frequency
rows ``[total - kept, total + kept)`` and longitude bins ``[0, kept)`` are
processed, everything else of the filtered spectrum is exactly zero; layer 1
is a complex block matmul with ReLU on real and imaginary parts separately,
layer 2 has no activation; softshrink on real and imaginary parts; the
inverse is ifft(lat) -> drop Im of the longitude DC (and Nyquist) bin ->
irfft(lon), which is what CPU backends do with the non-Hermitian spectrum
and is backend independent; the filter returns ``spectral + input``.
"""

from __future__ import annotations

import jax.numpy as jnp
from jax import lax

from fcn_jax.parallel.axes import HEIGHT, WIDTH
from fcn_jax.parallel.mesh import MeshSizes
from fcn_jax.parallel.ops import all_to_all


def kept_ranges(lat_tokens: int, lon_tokens: int, fraction: float) -> tuple[tuple[int, int], int]:
    """((row_start, row_stop), lon_bins) processed by the original's hidden truncation."""
    total = lat_tokens // 2 + 1
    kept = int(total * fraction)
    rows = (max(total - kept, 0), min(total + kept, lat_tokens))
    bins = min(kept, lon_tokens // 2 + 1)
    return rows, bins


def softshrink(v, lam: float):
    return jnp.where(v > lam, v - lam, jnp.where(v < -lam, v + lam, jnp.zeros_like(v)))


def _block_mlp(xr, xi, w1, b1, w2, b2, lam: float):
    """Two-layer complex MLP per block. x*: [..., blocks, d]; w*: [2, blocks, d, d]; b*: [2, blocks, d]."""
    hp = lax.Precision.HIGHEST  # float32 throughout, as the original's FFT path

    def mm(a, w):
        return jnp.einsum("...bi,bio->...bo", a, w, precision=hp)

    o1r = jax_relu(mm(xr, w1[0]) - mm(xi, w1[1]) + b1[0])
    o1i = jax_relu(mm(xi, w1[0]) + mm(xr, w1[1]) + b1[1])
    o2r = mm(o1r, w2[0]) - mm(o1i, w2[1]) + b2[0]
    o2i = mm(o1i, w2[0]) + mm(o1r, w2[1]) + b2[1]
    return softshrink(o2r, lam), softshrink(o2i, lam)


def jax_relu(v):
    return jnp.maximum(v, 0)


def afno_filter(z, w1, b1, w2, b2, *, lat_tokens: int, lon_tokens: int, block_size: int,
                sparsity_threshold: float, hard_thresholding_fraction: float, sizes: MeshSizes):
    """AFNO2D on local shards; returns ``spectral(z) + z``.

    z:  [batch, lat/Ph, lon/Pw, embed/Pc]  (any float dtype; FFT path is float32)
    w1, w2: [2, blocks_local, d, d]; b1, b2: [2, blocks_local, d], where
    blocks_local = num_blocks / (Pc*Pw*Ph) and the block dimension is sharded
    (channel, width, height) major-to-minor -- the order in which the
    all-to-alls below subdivide the channel slice.
    """
    dtype = z.dtype
    x = z.astype(jnp.float32)
    (r0, r1), bins = kept_ranges(lat_tokens, lon_tokens, hard_thresholding_fraction)

    # 1. whole longitude circles for a 1/Pw slice of this device's channels
    x = all_to_all(x, WIDTH, split_axis=3, concat_axis=2, sizes=sizes)
    # x: [b, lat/Ph, lon, ch/(Pc*Pw)]
    xf = jnp.fft.rfft(x, axis=2, norm="ortho")[:, :, :bins]  # truncate before moving data
    # xf: [b, lat/Ph, bins, ch/(Pc*Pw)] complex64
    # 2. whole latitude columns for a further 1/Ph slice of channels
    xf = all_to_all(xf, HEIGHT, split_axis=3, concat_axis=1, sizes=sizes)
    # xf: [b, lat, bins, ch_local] with ch_local = embed/(Pc*Pw*Ph): whole blocks
    xf = jnp.fft.fft(xf, axis=1, norm="ortho")

    b, _, _, ch = xf.shape
    sel = xf[:, r0:r1].reshape(b, r1 - r0, bins, ch // block_size, block_size)
    yr, yi = _block_mlp(jnp.real(sel), jnp.imag(sel), w1, b1, w2, b2, sparsity_threshold)
    y = lax.complex(yr, yi).reshape(b, r1 - r0, bins, ch)
    # rows outside [r0, r1) are exactly zero
    y = jnp.pad(y, ((0, 0), (r0, lat_tokens - r1), (0, 0), (0, 0)))
    y = jnp.fft.ifft(y, axis=1, norm="ortho")

    # 3. back to latitude tiles
    y = all_to_all(y, HEIGHT, split_axis=1, concat_axis=3, sizes=sizes)
    # y: [b, lat/Ph, bins, ch/(Pc*Pw)]
    n_half = lon_tokens // 2 + 1
    y = jnp.pad(y, ((0, 0), (0, 0), (0, n_half - bins), (0, 0)))
    # irfft of a non-Hermitian half-spectrum: define it as CPU FFTs do, dropping
    # Im of the DC bin (and of the Nyquist bin for even lengths).
    imag = jnp.imag(y).at[:, :, 0].set(0.0)
    if lon_tokens % 2 == 0:
        imag = imag.at[:, :, -1].set(0.0)
    y = lax.complex(jnp.real(y), imag)
    out = jnp.fft.irfft(y, n=lon_tokens, axis=2, norm="ortho")
    # out: [b, lat/Ph, lon, ch/(Pc*Pw)]
    # 4. back to longitude tiles, channels re-joined
    out = all_to_all(out, WIDTH, split_axis=2, concat_axis=3, sizes=sizes)
    # out: [b, lat/Ph, lon/Pw, embed/Pc]
    return out.astype(dtype) + z
