"""Input pipeline: training windows from a store to global ``jax.Array`` batches.

Flow (grain ``MapDataset`` API, spec/jax-notes.md §9)::

    range(n_windows) -> shuffle(seed, reshuffled every epoch) -> repeat
      -> batch(global_batch)                 # window indices of each global batch
      -> map(_LocalBlockReader)              # this process's rows and tiles only
      -> to_iter_dataset(threads, prefetch) [-> mp_prefetch(worker processes)]
      -> TrainIterator: device_put per device -> global jax.Array -> normalise on device

* A *window* is ``k + 1`` time steps (``k = rollout_steps``) spaced ``stride``
  store steps apart (stride 2 on 6-hourly data = a 12 h model step); windows
  never span a gap (between selected years, or a gap the store has). One
  sample: ``[k + 1, lat, lon, channel]``.
* Every process builds the same shuffled stream of global batches (same seed),
  so no coordination is needed; each process then reads only the batch rows
  that its devices hold and, under domain decomposition, only the lat/lon
  box its devices cover (:func:`read_plan`). Processes that share rows (a
  ``height``/``width`` split across hosts) read the same samples, different
  tiles. With the data axis laid over processes this is exactly grain's
  ``[process_index::process_count]`` sharding, derived from the mesh instead
  of assumed.
* Batches arrive as one global array ``[batch@data, k+1, lat@height, lon@width,
  channel]`` (:data:`fcn_jax.parallel.axes.WINDOW_SPEC`), built with
  ``jax.make_array_from_single_device_arrays``.
* Normalisation (``(x - mean) / std`` per channel, store statistics) runs on the
  device inside ``jit`` (:class:`Normalizer`); the host only moves raw float32.
* :class:`TrainIterator` is a grain ``DatasetIterator``: ``get_state`` /
  ``set_state`` resume exactly, and ``grain.checkpoint.CheckpointSave(it)`` /
  ``CheckpointRestore(it)`` work with Orbax.

Reads come from the zarr store (thread- and process-safe). Worker processes are
*spawned*: keep the call under ``if __name__ == "__main__":`` in scripts.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any, Sequence

import grain
import jax
import numpy as np
from jax.sharding import NamedSharding

from fcn_jax.data.errors import DataError
from fcn_jax.normalize import Normalizer  # the one normaliser; re-exported for the pipeline's users
from fcn_jax.parallel.axes import DATA, HEIGHT, WIDTH, WINDOW_SPEC


# ----------------------------------------------------------------- the source
class WindowSource:
    """Random-access source of windows of ``rollout_steps + 1`` time steps.

    Implements grain's ``RandomAccessDataSource`` protocol (``__len__``,
    ``__getitem__``); picklable (the zarr array is opened lazily per process).

    Args:
      store: path of a prepared store.
      channels: channel names / set name, in the order wanted (default: the
        store's channels in store order).
      rollout_steps: k; each window holds k + 1 steps (input + k targets).
      years: keep only these years (list or ``'2000-2001'``).
      stride: store time steps between consecutive window steps (the model's
        time step in units of the store's; 1 = 6 h on 6-hourly data).
      time_range: ``(start, end)`` datetimes (inclusive) to keep, alone or with ``years``.

    ``source[i]`` is x: [k + 1, lat, lon, channel] float32 in physical units.
    """

    def __init__(self, store: str | os.PathLike, channels=None, rollout_steps: int = 1, years=None,
                 time_range: tuple[Any, Any] | None = None, stride: int = 1, info=None):
        from fcn_jax.data.store import StoreInfo, parse_years

        self.store = str(store)
        # one description of the store (pass ``info`` to share it; else read here)
        self.info = info if info is not None else StoreInfo.read(self.store)
        names = list(self.info.channels)
        self.channel_index = self.info.index_of(channels)
        want = [names[i] for i in self.channel_index]
        if rollout_steps < 0:
            raise DataError(f"rollout_steps must be >= 0, got {rollout_steps}")
        self.channels = want
        if stride < 1:
            raise DataError(f"stride must be >= 1, got {stride}")
        self.rollout_steps = int(rollout_steps)
        self.stride = int(stride)
        self._all_channels = bool(np.array_equal(self.channel_index, np.arange(len(names))))
        times = self.info.times
        self.lat = np.asarray(self.info.lat)
        self.lon = np.asarray(self.info.lon)
        self.shape = (len(self.lat), len(self.lon), len(want))  # one step: [lat, lon, channel]
        step = np.timedelta64(int(round(self.info.time_step_hours * 3600)), "s")
        keep = np.ones(times.size, bool)
        yl = parse_years(years)
        if yl is not None:
            keep &= np.isin(times.astype("datetime64[Y]").astype(np.int64) + 1970, yl)
        if time_range is not None:
            a, b = (np.datetime64(t, "ns") for t in time_range)
            keep &= (times >= a) & (times <= b)
        if not keep.any():
            have = sorted(set((times.astype("datetime64[Y]").astype(np.int64) + 1970).tolist()))
            raise DataError(f"{self.store}: no time steps in years={yl} time_range={time_range}; "
                            f"the store has years {have}")
        k = self.rollout_steps
        # Window at start i: the steps at times t_i + j * stride * step, j = 0..k,
        # must all be present in the store and kept by the selection.
        dt = (step * self.stride).astype("timedelta64[ns]")
        want = times[:, None] + np.arange(k + 1)[None, :] * dt  # [n, k+1]
        pos = np.searchsorted(times, want)
        found = pos < times.size
        found[found] = times[pos[found]] == want[found]
        pos = np.where(found, pos, 0)
        valid = found.all(axis=1) & keep[pos].all(axis=1)
        self.starts = np.nonzero(valid)[0].astype(np.int64)
        self._index = pos[valid]  # [n_windows, k+1] store time indices
        self._contiguous = self.stride == 1  # then windows are plain slices
        if self.starts.size == 0:
            raise DataError(f"{self.store}: no window of {k + 1} steps {self.stride} apart in the selection "
                            f"(years={yl}, time_range={time_range})")
        self.times = times
        self._arr = None

    # grain needs a stable repr for checkpoint checks.
    def __repr__(self) -> str:
        return (f"WindowSource(store={self.store!r}, channels={self.channels}, "
                f"rollout_steps={self.rollout_steps}, stride={self.stride}, n={len(self)})")

    def __getstate__(self):
        d = dict(self.__dict__)
        d["_arr"] = None  # reopened lazily in each worker process
        return d

    def __len__(self) -> int:
        return int(self.starts.size)

    def _array(self):
        if self._arr is None:
            import zarr

            self._arr = zarr.open_array(os.path.join(self.store, "fields"), mode="r")
        return self._arr

    def window_times(self, i: int) -> np.ndarray:
        return self.times[self._index[i]]

    def read(self, i: int, lat: slice = slice(None), lon: slice = slice(None)) -> np.ndarray:
        """Window ``i`` restricted to a lat/lon box: x: [k + 1, lat, lon, channel] float32."""
        if not 0 <= i < len(self):
            raise IndexError(f"window {i} out of range [0, {len(self)})")
        try:
            if self._contiguous:
                t0 = int(self.starts[i])
                x = self._array()[t0: t0 + self.rollout_steps + 1, :, lat, lon]  # [k+1, C_store, h, w]
            else:
                x = self._array().get_orthogonal_selection((self._index[i], slice(None), lat, lon))
        except Exception as e:  # noqa: BLE001 - a chunk that does not decode: say which one
            raise _undecodable(self, self._index[i], lat, lon, e) from e
        if not self._all_channels:
            x = x[:, self.channel_index]
        return np.ascontiguousarray(np.transpose(x, (0, 2, 3, 1)), dtype=np.float32)

    def __getitem__(self, i: int) -> np.ndarray:
        return self.read(int(i))


def _undecodable(src: WindowSource, time_indices, lat: slice, lon: slice, error: Exception) -> DataError:
    """A DataError naming the variable, time and chunk of ``src`` that fails to decode (found by re-reading)."""
    arr = src._array()
    chunks = arr.chunks  # (time, channel, lat, lon) chunk shape

    def blocks(sl: slice, n: int, c: int) -> range:  # chunk indices a slice of a length-n axis touches
        a, b, _ = sl.indices(n)
        return range(a // c, max(a, b - 1) // c + 1)

    for t in time_indices:
        for kc in blocks(slice(None), arr.shape[1], chunks[1]):
            for kla in blocks(lat, arr.shape[2], chunks[2]):
                for klo in blocks(lon, arr.shape[3], chunks[3]):
                    try:  # one element decodes its whole chunk
                        arr[int(t), kc * chunks[1], kla * chunks[2], klo * chunks[3]]
                    except Exception as e:  # noqa: BLE001
                        key = arr.metadata.encode_chunk_key((int(t) // chunks[0], kc, kla, klo))  # zarr v2 or v3
                        when = np.datetime_as_string(src.times[int(t)], unit="m")
                        return DataError(
                            f"{src.store}: variable 'fields' cannot be decoded at time {when} (time index {int(t)}), "
                            f"chunk {os.path.join(src.store, 'fields', key)}: {e}. The store was damaged after it "
                            "was prepared; prepare it again from the sources (python -m fcn_jax.prepare ...)")
    return DataError(f"{src.store}: variable 'fields' could not be read at time indices {list(map(int, time_indices))} "
                     f"(lat {lat}, lon {lon}): {error}")


# ---------------------------------------------------------- per-process plan
@dataclasses.dataclass(frozen=True)
class ReadPlan:
    """What one process reads of a global batch, and where each piece goes.

    Attributes:
      rows: global batch rows this process reads (sorted).
      lat, lon: the lat/lon box (bounding box of its devices' tiles).
      device_index: device -> index into the local block [rows, k+1, lat box, lon box, C].
    """

    rows: np.ndarray
    lat: slice
    lon: slice
    device_index: dict


def read_plan(sharding: NamedSharding, global_shape: Sequence[int], devices: Sequence | None = None) -> ReadPlan:
    """Plan the reads of one process (``devices``: default this process's devices).

    ``global_shape`` is [batch, k+1, lat, lon, channel]. Passing a subset of
    devices lets tests plan for a simulated process of a multi-host mesh.
    """
    idx_map = sharding.devices_indices_map(tuple(global_shape))
    if devices is None:
        devices = [d for d in idx_map if d.process_index == jax.process_index()]
    devices = list(devices)
    if not devices:
        raise DataError(f"process {jax.process_index()} holds no device of the mesh {sharding.mesh.shape}; "
                        "expected a mesh over all processes' devices")
    norm = {d: tuple(slice(*s.indices(n)) for s, n in zip(idx_map[d], global_shape)) for d in devices}
    rows = sorted({r for d in devices for r in range(norm[d][0].start, norm[d][0].stop)})
    rows_a = np.asarray(rows, np.int64)
    lat0 = min(norm[d][2].start for d in devices)
    lat1 = max(norm[d][2].stop for d in devices)
    lon0 = min(norm[d][3].start for d in devices)
    lon1 = max(norm[d][3].stop for d in devices)
    dev_index = {}
    for d in devices:
        b, t, la, lo, c = norm[d]
        pos = np.searchsorted(rows_a, np.arange(b.start, b.stop))
        bsel = slice(int(pos[0]), int(pos[-1]) + 1) if np.all(np.diff(pos) == 1) else pos
        dev_index[d] = (bsel, t, slice(la.start - lat0, la.stop - lat0), slice(lo.start - lon0, lo.stop - lon0), c)
    return ReadPlan(rows_a, slice(lat0, lat1), slice(lon0, lon1), dev_index)


class _LocalBlockReader:
    """grain map: global batch of window indices -> this process's block.

    x: [len(rows), k+1, lat box, lon box, channel] float32. Picklable.
    """

    def __init__(self, source: WindowSource, rows: np.ndarray, lat: slice, lon: slice):
        self.source, self.rows, self.lat, self.lon = source, rows, lat, lon

    def __call__(self, indices: np.ndarray) -> np.ndarray:
        k1 = self.source.rollout_steps + 1
        h = len(range(*self.lat.indices(self.source.shape[0])))
        w = len(range(*self.lon.indices(self.source.shape[1])))
        out = np.empty((len(self.rows), k1, h, w, self.source.shape[2]), np.float32)
        for j, r in enumerate(self.rows):
            out[j] = self.source.read(int(indices[r]), self.lat, self.lon)
        return out


# ------------------------------------------------------------------ iterator
class TrainIterator(grain.DatasetIterator):
    """Yields global batches x: [batch@data, k+1, lat@height, lon@width, channel].

    A grain ``DatasetIterator``: ``get_state()``/``set_state()`` resume exactly,
    and it can be passed to ``grain.checkpoint.CheckpointSave/CheckpointRestore``.

    Attributes: ``source`` (the :class:`WindowSource`), ``normalizer``,
    ``sharding``, ``global_shape``, ``plan`` (this process's :class:`ReadPlan`).
    """

    def __init__(self, parent: grain.DatasetIterator, *, source: WindowSource, sharding: NamedSharding,
                 global_shape: tuple[int, ...], plan: ReadPlan, normalizer: Normalizer, normalize: bool):
        super().__init__(parent)
        self.source = source
        self.sharding = sharding
        self.global_shape = global_shape
        self.plan = plan
        self.normalizer = normalizer
        self.normalize = normalize
        self._norm = jax.jit(normalizer.normalize)

    def __next__(self) -> jax.Array:
        block = next(self._parent)  # [rows, k+1, lat box, lon box, C] host float32
        arrays = [jax.device_put(np.ascontiguousarray(block[idx]), d) for d, idx in self.plan.device_index.items()]
        x = jax.make_array_from_single_device_arrays(self.global_shape, self.sharding, arrays)
        return self._norm(x) if self.normalize else x

    def get_state(self) -> dict[str, Any]:
        return self._parent.get_state()

    def set_state(self, state: dict[str, Any]) -> None:
        self._parent.set_state(state)

    @property
    def mean(self) -> np.ndarray:
        return self.normalizer.mean

    @property
    def std(self) -> np.ndarray:
        return self.normalizer.std


def _ensure_absl_flags_parsed() -> None:
    # grain 0.2.18 reads an absl flag when starting worker processes and fails
    # outside absl.app.run (google/grain#1355): mark the flags parsed.
    try:
        from absl import flags

        if not flags.FLAGS.is_parsed():
            flags.FLAGS.mark_as_parsed()
    except Exception:  # pragma: no cover
        pass


def make_train_iterator(store: str | os.PathLike, *, mesh: jax.sharding.Mesh, batch_size: int, channels=None,
                        rollout_steps: int = 1, stride: int = 1, seed: int = 0, years=None, time_range=None,
                        shuffle: bool = True, num_epochs: int | None = None, num_workers: int = 0,
                        prefetch: int = 2, num_threads: int = 4, normalize: bool = True,
                        source: WindowSource | None = None, info=None) -> TrainIterator:
    """Build the training iterator for ``mesh``.

    Args:
      store: prepared store path.
      mesh: device mesh with axes ('data', 'channel', 'height', 'width').
      batch_size: the *global* batch size; divisible by the ``data`` axis size.
      channels: channel names / set name (default: all of the store's, in order).
      rollout_steps: k; windows hold k + 1 steps.
      stride: store steps between window steps (see :class:`WindowSource`).
      seed: shuffle seed (the same on every process).
      years / time_range: time selection (see :class:`WindowSource`).
      shuffle: False gives windows in time order (evaluation).
      num_epochs: None repeats forever (reshuffled every epoch).
      num_workers: worker processes (0 = read in threads of this process).
      prefetch: batches buffered per worker (or by the thread reader).
      num_threads: reader threads per process / worker.
      normalize: apply the store's per-channel z-score on device.
      source: an existing :class:`WindowSource` to use instead of building one.
      info: the store's :class:`~fcn_jax.data.store.StoreInfo`, if already read.
    """
    src = source or WindowSource(store, channels, rollout_steps, years, time_range, stride, info=info)
    k1 = src.rollout_steps + 1
    n_lat, n_lon, n_ch = src.shape
    sizes = dict(zip(mesh.axis_names, mesh.devices.shape))
    for dim, n, ax in (("batch", batch_size, DATA), ("lat", n_lat, HEIGHT), ("lon", n_lon, WIDTH)):
        if n % sizes.get(ax, 1):
            raise DataError(f"{dim} size {n} is not divisible by the mesh's {ax!r} axis ({sizes.get(ax, 1)}); "
                            f"choose a {dim} size that is a multiple of it")
    if len(src) < batch_size:
        raise DataError(f"{src}: only {len(src)} windows for a global batch of {batch_size}")
    sharding = NamedSharding(mesh, WINDOW_SPEC)
    global_shape = (batch_size, k1, n_lat, n_lon, n_ch)
    plan = read_plan(sharding, global_shape)
    normalizer = src.info.normalizer(src.channels)

    ds = grain.MapDataset.range(len(src))
    if shuffle:
        ds = ds.seed(seed).shuffle()  # per-epoch reseeded permutation
    ds = ds.repeat(num_epochs)
    ds = ds.batch(batch_size, drop_remainder=True)
    ds = ds.map(_LocalBlockReader(src, plan.rows, plan.lat, plan.lon))
    # grain wants prefetch_buffer_size >= num_threads (else threads sit idle).
    it_ds = ds.to_iter_dataset(grain.ReadOptions(num_threads=num_threads,
                                                 prefetch_buffer_size=max(1, prefetch, num_threads)))
    if num_workers > 0:
        _ensure_absl_flags_parsed()
        it_ds = it_ds.mp_prefetch(grain.MultiprocessingOptions(num_workers=num_workers,
                                                               per_worker_buffer_size=max(1, prefetch)))
    return TrainIterator(iter(it_ds), source=src, sharding=sharding, global_shape=global_shape, plan=plan,
                         normalizer=normalizer, normalize=normalize)
