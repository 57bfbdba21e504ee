"""The model wrapped for forecasting: physical units in, physical units (and precipitation) out.

Wrappers in the style of graphcast's ``normalization``/``casting``: each adds
one concern around the network and keeps the rest of the interface.

* :class:`PrecipDiagnosis` -- PrecipNet applied to every normalised backbone
  state, its ``log1p(tp / eps)`` output turned into ``tp`` in metres
  (bounded at ``y_max`` when given);
* :class:`Forecaster` -- the backbone with its normalisation: it takes
  initial conditions in physical units ``[n, lat, lon, channel]``, rolls out in
  normalised space on the device mesh (:mod:`fcn_jax.inference.rollout`), and
  hands back physical trajectories ``[n, lead, (member), lat, lon, channel
  (+tp)]`` in lead segments, so a long forecast or a large ensemble never has
  to sit in memory whole.

The segments are what a writer consumes: :meth:`Forecaster.deterministic`
and :meth:`Forecaster.ensemble` yield ``(lead_start, member_start, fields)``,
and :mod:`fcn_jax.forecast` writes each one as it comes
(:class:`fcn_jax.inference.files.ForecastWriter`).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Callable, Iterator

import jax
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding

from fcn_jax.inference.perturbations import KINDS, SphericalBasis
from fcn_jax.inference.rollout import bred_chunk, ensemble_chunk, ensemble_continue, rollout
from fcn_jax.normalize import Normalizer, precip_to_metres
from fcn_jax.parallel.axes import IMAGE_SPEC

__all__ = ["Forecaster", "PrecipDiagnosis", "lead_segments", "round_up", "to_host"]


def round_up(n: int, k: int) -> int:
    """``n`` rounded up to a multiple of ``k`` (at least ``k``)."""
    return int(math.ceil(max(int(n), 1) / k) * k)


def lead_segments(steps: int, lead_chunk: int | None) -> list[tuple[int, int]]:
    """``(first step, steps)`` of equal segments of at most ``lead_chunk`` steps (None or 0: one segment).

    Equal lengths (the last may be shorter only when ``steps`` does not divide) keep it to one or two compiles.
    """
    if not lead_chunk or lead_chunk >= steps:
        return [(0, steps)]
    n_seg = math.ceil(steps / lead_chunk)
    size = math.ceil(steps / n_seg)
    return [(l0, min(size, steps - l0)) for l0 in range(0, steps, size)]


def to_host(x) -> np.ndarray:
    """A device array on the host; across processes, gathered (every process gets the whole array)."""
    if getattr(x, "is_fully_addressable", True):
        return np.asarray(jax.device_get(x))
    from jax.experimental import multihost_utils

    return np.asarray(multihost_utils.process_allgather(x, tiled=True))


def _apply_impl(graphdef, state, x):
    return nnx.merge(graphdef, state)(x)


_apply = jax.jit(_apply_impl, static_argnums=0)


@dataclasses.dataclass
class PrecipDiagnosis:
    """Total precipitation diagnosed from backbone states: ``eps * expm1(clip(PrecipNet(x), 0, y_max))``.

    ``model``: the PrecipNet (sharded on the mesh); ``eps``: its log
    transform's scale; ``y_max``: the log-space bound (None: only clipped at 0,
    as the original).
    """

    model: nnx.Module
    eps: float
    y_max: float | None = None

    def __call__(self, states_n, sharding: NamedSharding) -> np.ndarray:
        """``tp`` in metres, ``states_n.shape[:-1]``, from normalised states ``[..., lat, lon, channel]``."""
        shape = states_n.shape
        flat = to_host(states_n).reshape((-1,) + shape[-3:])  # [N, lat, lon, ch]: leads and members folded
        n, n_data = flat.shape[0], int(sharding.mesh.shape["data"])
        pad = round_up(n, n_data) - n  # the batch must divide over 'data'
        flat = np.concatenate([flat, np.repeat(flat[-1:], pad, axis=0)]) if pad else flat
        gd, st = nnx.split(self.model)
        y = to_host(_apply(gd, st, jax.device_put(flat, sharding)))[:n, ..., 0]  # [N, lat, lon] log1p(tp / eps)
        return np.asarray(precip_to_metres(y, self.eps, self.y_max), np.float32).reshape(shape[:-1])


@dataclasses.dataclass
class Forecaster:
    """A backbone with its normalisation (and optionally precipitation), run on ``mesh`` in lead segments.

    ``model``: the backbone, sharded on ``mesh``; ``norm``: the statistics it
    was trained with. Inputs and outputs are physical; the rollout itself is in
    normalised units, as the model was trained.
    """

    model: nnx.Module
    norm: Normalizer
    mesh: jax.sharding.Mesh
    precip: PrecipDiagnosis | None = None

    @property
    def sharding(self) -> NamedSharding:
        return NamedSharding(self.mesh, IMAGE_SPEC)  # x: [batch, lat, lon, channel]

    @property
    def data_size(self) -> int:
        return int(self.mesh.shape["data"])

    def physical(self, traj_n, tp0: np.ndarray | None = None) -> np.ndarray:
        """Physical ``[..., channel (+tp)]`` from a normalised trajectory ``[n, lead, (m), lat, lon, channel]``.

        With precipitation, ``tp`` is appended; ``tp0`` (``[n, lat, lon]``, the
        analysis's ``tp``) replaces lead 0's when the segment starts at the IC.
        """
        phys = self.norm.denormalize(to_host(traj_n))
        if self.precip is None:
            return phys
        tp = self.precip(traj_n, self.sharding)  # [n, lead, (m), lat, lon]
        if tp0 is not None:  # lead 0 is the analysis: its tp, not PrecipNet's
            tp[:, 0] = tp0[:, None] if tp.ndim == 5 else tp0
        return np.concatenate([phys, tp[..., None]], axis=-1)

    def deterministic(self, ics: np.ndarray, steps: int, *, lead_chunk: int | None = None,
                      tp0: Callable[[], np.ndarray] | None = None) -> Iterator[tuple[int, np.ndarray]]:
        """``(lead_start, fields [n, leads, lat, lon, ch])`` segments of one rollout from ``ics`` (physical).

        The batch is padded to a multiple of the ``data`` axis (the padding is
        computed, then dropped). Lead 0 is the IC itself.
        """
        n = ics.shape[0]
        bs = round_up(n, self.data_size)
        x = self.norm.normalize(ics)
        x = np.concatenate([x, np.repeat(x[-1:], bs - n, axis=0)])  # pad to a shape the mesh divides
        state = jax.device_put(x, self.sharding)
        for l0, k in lead_segments(steps, lead_chunk):
            traj = rollout(self.model, state, k)  # [bs, k + 1, ...]: leads l0 .. l0 + k
            state = traj[:, -1]
            seg = traj[:n] if l0 == 0 else traj[:n, 1:]
            yield (0 if l0 == 0 else l0 + 1), self.physical(seg, tp0() if (l0 == 0 and tp0) else None)

    def ensemble(self, ic: np.ndarray, steps: int, *, members: int, member_chunk: int, perturbation_std: float,
                 key, lead_chunk: int | None = None, tp0: Callable[[], np.ndarray] | None = None,
                 skip: Callable[[int], bool] | None = None, perturbation: str = "gaussian",
                 basis: SphericalBasis | None = None, history: np.ndarray | None = None, lat=None
                 ) -> Iterator[tuple[int, int, np.ndarray]]:
        """``(member_start, lead_start, fields [1, leads, members, lat, lon, ch])`` of one IC's ensemble.

        Members are drawn from ``fold_in(key, member)`` (:func:`~fcn_jax.inference.rollout.perturb`), so the
        chunking never changes them; each chunk of ``member_chunk`` (rounded to the ``data`` axis) is rolled
        out in lead segments, the spare members of the last chunk dropped. ``skip(member_start)``: chunks
        not to compute (already written by an interrupted run: the others' members do not depend on them).

        ``perturbation``: ``gaussian`` (white), ``spherical`` (``basis``) or ``bred`` (``basis`` or white
        noise grown over ``history [cycles, lat, lon, ch]``, the physical analyses every step before ``ic``;
        ``lat`` for the area weights) -- :mod:`fcn_jax.inference.perturbations`.
        """
        if perturbation not in KINDS:
            raise ValueError(f"perturbation must be one of {KINDS}, got {perturbation!r}")
        chunk = round_up(min(member_chunk, members), self.data_size)
        split = nnx.split(self.model)
        x = self.norm.normalize(ic)
        if perturbation == "bred":
            window = self.norm.normalize(np.concatenate([history, ic]))  # [cycles + 1, lat, lon, ch]
        for m0 in range(0, members, chunk):
            if skip is not None and skip(m0):
                continue
            ids = np.arange(m0, m0 + chunk)
            keep = min(chunk, members - m0)
            for l0, k in lead_segments(steps, lead_chunk):
                if l0 == 0 and perturbation == "bred":
                    ens = bred_chunk(split, window, perturbation_std, key, ids, k, basis, lat)
                    seg = ens[:, :, :keep]
                elif l0 == 0:
                    ens = ensemble_chunk(split, x, perturbation_std, key, ids, k,
                                         basis if perturbation == "spherical" else None)
                    seg = ens[:, :, :keep]
                else:
                    ens = ensemble_continue(split, ens, k)
                    seg = ens[:, 1:, :keep]
                yield m0, (0 if l0 == 0 else l0 + 1), self.physical(seg, tp0() if (l0 == 0 and tp0) else None)
