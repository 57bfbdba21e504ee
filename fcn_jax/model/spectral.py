"""The AFNO spectral filter: distributed FFT + block-diagonal complex MLP.

This is the one function of the model that runs FFTs. It is written for the
local shards of a fully manual ``jax.shard_map`` over ``(data, channel, height,
width)`` and has two layouts (parallelism spec §3), chosen by
``sizes.spectral_layout``:

* *channel-block* (§3.1): two all-to-alls per transform trade the spatial split
  for a channel split, so each device transforms whole planes for its slice of
  whole AFNO blocks. Needs ``channel*height*width`` to divide the blocks.
* *pencil* (§3.2): four all-to-alls per transform; the spectrum ends up split
  over (height, width) by latitude rows and longitude bins ("spectral pencils")
  while every device keeps its whole ``channel`` slice of blocks. Needs only
  ``channel`` to divide the blocks; the mode counts are zero-padded to the split.

On a single device all collectives vanish and both are exactly the original's filter.

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

import jax
import jax.numpy as jnp
from jax import lax

from fcn_jax.parallel.axes import HEIGHT, PENCIL, WIDTH
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
    """Two-layer complex MLP per block, blocks-major.

    x*: [blocks, modes, d]; w*: [2, blocks, d, d]; b*: [2, blocks, d]. Each product is a
    batched matmul with the block axis leading on both operands, the layout XLA's dot
    wants, so neither the forward nor the backward moves data between the products;
    the masks of ReLU and softshrink apply in the same layout.
    """
    hp = lax.Precision.HIGHEST  # float32 throughout, as the original's FFT path

    def mm(a, w):  # [blocks, modes, i] @ [blocks, i, o] -> [blocks, modes, o]
        return lax.dot_general(a, w, (((2,), (1,)), ((0,), (0,))), precision=hp)

    def bias(b):  # [blocks, o] -> [blocks, 1, o]
        return b[:, None, :]

    o1r = relu(mm(xr, w1[0]) - mm(xi, w1[1]) + bias(b1[0]))
    o1i = relu(mm(xi, w1[0]) + mm(xr, w1[1]) + bias(b1[1]))
    o2r = mm(o1r, w2[0]) - mm(o1i, w2[1]) + bias(b2[0])
    o2i = mm(o1i, w2[0]) + mm(o1r, w2[1]) + bias(b2[1])
    return softshrink(o2r, lam), softshrink(o2i, lam)


def relu(v):
    """max(v, 0) with PyTorch's derivative (0 at v == 0): a select on the mask, no ties."""
    return jax.nn.relu(v)


def afno_filter(z, w1, b1, w2, b2, *, lat_tokens: int, lon_tokens: int, block_size: int,
                sparsity_threshold: float, hard_thresholding_fraction: float, sizes: MeshSizes):
    """AFNO2D on local shards; returns ``spectral(z) + z``.

    z:  [batch, lat/Ph, lon/Pw, embed/Pc]  (any float dtype; FFT path is float32)
    w1, w2: [2, blocks_local, d, d]; b1, b2: [2, blocks_local, d], where
    blocks_local = num_blocks / (Pc*Pw*Ph) for the channel-block layout, block
    dimension sharded (channel, width, height) major-to-minor -- the order in
    which its all-to-alls subdivide the channel slice -- and num_blocks / Pc for
    the pencil layout (sharded over channel, replicated over height and width).
    """
    kw = dict(lat_tokens=lat_tokens, lon_tokens=lon_tokens, block_size=block_size,
              sparsity_threshold=sparsity_threshold, hard_thresholding_fraction=hard_thresholding_fraction,
              sizes=sizes)
    if sizes.spectral_layout == PENCIL:
        out = _pencil_filter(z.astype(jnp.float32), w1, b1, w2, b2, **kw)
    else:
        out = _channel_block_filter(z.astype(jnp.float32), w1, b1, w2, b2, **kw)
    return out.astype(z.dtype) + z


def _filter_modes(sel, w1, b1, w2, b2, block_size: int, lam: float):
    """Block-diagonal complex MLP on kept modes. sel: [..., ch] complex, ch = whole blocks."""
    lead, ch = sel.shape[:-1], sel.shape[-1]
    nb = ch // block_size
    # [..., ch] -> [blocks, modes, d]: one transpose in (and one out) instead of one per product
    sel = sel.reshape(-1, nb, block_size).transpose(1, 0, 2)
    yr, yi = _block_mlp(jnp.real(sel), jnp.imag(sel), w1, b1, w2, b2, lam)
    y = lax.complex(yr, yi)  # [blocks, modes, d]
    return y.transpose(1, 0, 2).reshape(*lead, ch)


def _irfft_lon(y, bins: int, lon_tokens: int):
    """Zero-fill bins >= ``bins``, drop Im of DC (and Nyquist), irfft along axis 2 (n = lon)."""
    n_half = lon_tokens // 2 + 1
    y = jnp.pad(y, ((0, 0), (0, 0), (0, n_half - bins), (0, 0)))
    # irfft of a non-Hermitian half-spectrum: define it as CPU FFTs do, dropping
    # Im of the DC bin (and of the Nyquist bin for even lengths).
    imag = jnp.imag(y).at[:, :, 0].set(0.0)
    if lon_tokens % 2 == 0:
        imag = imag.at[:, :, -1].set(0.0)
    y = lax.complex(jnp.real(y), imag)
    return jnp.fft.irfft(y, n=lon_tokens, axis=2, norm="ortho")


def _pad_axis(x, axis: int, before: int, after: int):
    if before == 0 and after == 0:
        return x
    widths = [(0, 0)] * x.ndim
    widths[axis] = (before, after)
    return jnp.pad(x, widths)


def _channel_block_filter(x, w1, b1, w2, b2, *, lat_tokens, lon_tokens, block_size, sparsity_threshold,
                          hard_thresholding_fraction, sizes):
    """Spectral part (without the skip), channel-block layout. x: [b, lat/Ph, lon/Pw, embed/Pc] float32."""
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

    y = _filter_modes(xf[:, r0:r1], w1, b1, w2, b2, block_size, sparsity_threshold)
    # rows outside [r0, r1) are exactly zero
    y = _pad_axis(y, 1, r0, lat_tokens - r1)
    y = jnp.fft.ifft(y, axis=1, norm="ortho")

    # 3. back to latitude tiles
    y = all_to_all(y, HEIGHT, split_axis=1, concat_axis=3, sizes=sizes)
    # y: [b, lat/Ph, bins, ch/(Pc*Pw)]
    out = _irfft_lon(y, bins, lon_tokens)
    # out: [b, lat/Ph, lon, ch/(Pc*Pw)]
    # 4. back to longitude tiles, channels re-joined: [b, lat/Ph, lon/Pw, embed/Pc]
    return all_to_all(out, WIDTH, split_axis=2, concat_axis=3, sizes=sizes)


def _pencil_filter(x, w1, b1, w2, b2, *, lat_tokens, lon_tokens, block_size, sparsity_threshold,
                   hard_thresholding_fraction, sizes):
    """Spectral part (without the skip), pencil layout. x: [b, lat/Ph, lon/Pw, embed/Pc] float32.

    The kept longitude bins are zero-padded to a multiple of Pw and the kept
    latitude rows to a multiple of Ph so the tiled all-to-alls split evenly;
    padded modes never reach the inverse (they are sliced off before it), so
    the result is exactly the unpadded filter's.
    """
    ph, pw = sizes[HEIGHT], sizes[WIDTH]
    (r0, r1), bins = kept_ranges(lat_tokens, lon_tokens, hard_thresholding_fraction)
    rows = r1 - r0
    bins_p = -(-bins // pw) * pw
    rows_p = -(-rows // ph) * ph

    # -- forward transform -------------------------------------------------------
    # 1. whole longitude circles for a 1/Pw slice of this device's channels
    x = all_to_all(x, WIDTH, split_axis=3, concat_axis=2, sizes=sizes)
    # x: [b, lat/Ph, lon, ch/(Pc*Pw)]
    xf = jnp.fft.rfft(x, axis=2, norm="ortho")[:, :, :bins]
    xf = _pad_axis(xf, 2, 0, bins_p - bins)
    # xf: [b, lat/Ph, bins_p, ch/(Pc*Pw)] complex64
    # 2. longitude bins spread over width, channel slice re-joined
    xf = all_to_all(xf, WIDTH, split_axis=2, concat_axis=3, sizes=sizes)
    # xf: [b, lat/Ph, bins_p/Pw, ch/Pc]
    # 3. whole latitude columns for a 1/Ph slice of the channels
    xf = all_to_all(xf, HEIGHT, split_axis=3, concat_axis=1, sizes=sizes)
    # xf: [b, lat, bins_p/Pw, ch/(Pc*Ph)]
    xf = jnp.fft.fft(xf, axis=1, norm="ortho")[:, r0:r1]
    xf = _pad_axis(xf, 1, 0, rows_p - rows)
    # xf: [b, rows_p, bins_p/Pw, ch/(Pc*Ph)]
    # 4. latitude rows spread over height, channel slice re-joined: spectral pencils
    xf = all_to_all(xf, HEIGHT, split_axis=1, concat_axis=3, sizes=sizes)
    # xf: [b, rows_p/Ph, bins_p/Pw, ch/Pc] -- this channel slice's whole blocks

    y = _filter_modes(xf, w1, b1, w2, b2, block_size, sparsity_threshold)

    # -- inverse transform (mirror image) --------------------------------------------
    y = all_to_all(y, HEIGHT, split_axis=3, concat_axis=1, sizes=sizes)
    # y: [b, rows_p, bins_p/Pw, ch/(Pc*Ph)]; drop padded rows, rows outside [r0, r1) are zero
    y = _pad_axis(y[:, :rows], 1, r0, lat_tokens - r1)
    y = jnp.fft.ifft(y, axis=1, norm="ortho")
    # y: [b, lat, bins_p/Pw, ch/(Pc*Ph)]
    y = all_to_all(y, HEIGHT, split_axis=1, concat_axis=3, sizes=sizes)
    # y: [b, lat/Ph, bins_p/Pw, ch/Pc]
    y = all_to_all(y, WIDTH, split_axis=3, concat_axis=2, sizes=sizes)
    # y: [b, lat/Ph, bins_p, ch/(Pc*Pw)]; drop padded bins
    out = _irfft_lon(y[:, :, :bins], bins, lon_tokens)
    # out: [b, lat/Ph, lon, ch/(Pc*Pw)] -> back to longitude tiles: [b, lat/Ph, lon/Pw, embed/Pc]
    return all_to_all(out, WIDTH, split_axis=2, concat_axis=3, sizes=sizes)
