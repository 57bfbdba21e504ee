"""grain pipeline: windows, exact resume, global batch layout on an 8-device mesh."""

import grain
import jax
import numpy as np
import pytest
from jax.sharding import AxisType

from fcn_jax.data import synthetic as S
from fcn_jax.data.errors import DataError
from fcn_jax.data.pipeline import (
    Normalizer,
    WindowSource,
    _LocalBlockReader,
    make_train_iterator,
    read_plan,
)  # fmt: skip
from fcn_jax.data.store import store_stats
from fcn_jax.parallel.axes import MESH_AXES, WINDOW_SPEC

CH = ["z500", "t850", "u10"]


def _mesh(shape):
    return jax.make_mesh(shape, MESH_AXES, axis_types=(AxisType.Auto,) * 4)


@pytest.fixture(scope="module")
def store(synthetic_store):
    """8 x 16 grid, 3 channels; 2000-12-30 .. 2001-01-06 with a gap (6 steps missing) on 2001-01-02."""
    times = np.delete(S.six_hourly("2000-12-30T00", 32), np.arange(14, 20))
    path = synthetic_store(times, CH, allow_gaps=True, doy_climatology=False)
    return path, times, S.truth(times, CH, *S.grid(8, 16, poles=False))


def test_windows_never_cross_gaps(store):
    path, times, x = store
    src = WindowSource(path, rollout_steps=2)
    step = np.timedelta64(6, "h")
    assert len(src) == 26 - 2 * 2  # two contiguous runs (14 and 12 steps): 12 + 10 windows
    for i in range(len(src)):
        t = src.window_times(i)
        assert np.all(np.diff(t) == step)
        t0 = int(src.starts[i])
        np.testing.assert_array_equal(src[i], np.transpose(x[t0:t0 + 3], (0, 2, 3, 1)))  # [k+1, lat, lon, C]
    # year selection: windows stay inside the kept years
    s00 = WindowSource(path, rollout_steps=1, years=[2000])
    assert len(s00) == 7 and all(str(s00.window_times(i)[-1])[:4] == "2000" for i in range(len(s00)))
    # channel subset, in the order asked
    sub = WindowSource(path, channels=["u10", "z500"], rollout_steps=0)
    np.testing.assert_array_equal(sub[0][0], np.transpose(x[0, [2, 0]], (1, 2, 0)))
    # stride 2 (12 h steps on 6-hourly data): steps present 12 h apart, also across no gap
    s2 = WindowSource(path, rollout_steps=2, stride=2)
    assert len(s2) == 10 + 8
    for i in range(len(s2)):
        t = s2.window_times(i)
        assert np.all(np.diff(t) == 2 * step)
        ti = [int(np.nonzero(times == tt)[0][0]) for tt in t]
        np.testing.assert_array_equal(s2[i], np.transpose(x[ti], (0, 2, 3, 1)))
    with pytest.raises(DataError, match="no time steps in years"):
        WindowSource(path, years=[1999])
    with pytest.raises(DataError, match=r"channels \['r850'\] not in the store"):
        WindowSource(path, channels=["r850"])


def test_global_batch_layout_and_tiles(store):
    path, times, x = store
    mesh = _mesh((2, 1, 2, 2))
    it = make_train_iterator(path, mesh=mesh, batch_size=4, rollout_steps=1, seed=7, normalize=False)
    batch = next(it)
    assert batch.shape == (4, 2, 8, 16, 3)
    assert batch.sharding.spec == WINDOW_SPEC and batch.sharding.mesh.shape == mesh.shape
    # the expected batch: the same seeded shuffle, read directly
    src = it.source
    idx = grain.MapDataset.range(len(src)).seed(7).shuffle().repeat(None).batch(4)[0]
    want = np.stack([src[int(i)] for i in idx])
    np.testing.assert_array_equal(np.asarray(batch), want)
    assert len(batch.addressable_shards) == 8
    for shard in batch.addressable_shards:
        assert shard.data.shape == (2, 2, 4, 8, 3)  # [batch/2, k+1, lat/2, lon/2, C]
        np.testing.assert_array_equal(np.asarray(shard.data), want[shard.index])
    it.close()


def test_normalisation_on_device(store):
    path, _, _ = store
    mesh = _mesh((2, 1, 2, 2))
    raw = make_train_iterator(path, mesh=mesh, batch_size=4, seed=3, normalize=False)
    nrm = make_train_iterator(path, mesh=mesh, batch_size=4, seed=3)
    a, b = next(raw), next(nrm)
    mean, std = store_stats(path)
    np.testing.assert_array_equal(nrm.mean, mean)
    np.testing.assert_allclose(np.asarray(b), (np.asarray(a) - mean) / std, rtol=1e-6, atol=1e-6)
    assert b.sharding == a.sharding
    n = Normalizer(mean, std)
    np.testing.assert_allclose(np.asarray(jax.jit(n.denormalize)(b)), np.asarray(a), rtol=1e-5)
    raw.close()
    nrm.close()


def test_exact_resume_and_epochs(store):
    path, _, _ = store
    mesh = _mesh((1, 1, 1, 1))
    kw = dict(mesh=mesh, batch_size=2, rollout_steps=1, seed=11, normalize=False)
    it = make_train_iterator(path, **kw)
    for _ in range(5):
        next(it)
    state = it.get_state()
    want = [np.asarray(next(it)) for _ in range(4)]
    it2 = make_train_iterator(path, **kw)
    it2.set_state(state)
    got = [np.asarray(next(it2)) for _ in range(4)]
    for a, b in zip(want, got):
        np.testing.assert_array_equal(a, b)
    # an epoch is a permutation of all windows; the next epoch is reshuffled
    src = it.source
    n = len(src)
    order = grain.MapDataset.range(n).seed(11).shuffle().repeat(None)
    e0, e1 = [order[i] for i in range(n)], [order[n + i] for i in range(n)]
    assert sorted(e0) == list(range(n)) and sorted(e1) == list(range(n)) and e0 != e1
    it.close()
    it2.close()


def test_resume_with_worker_processes_and_orbax(store, tmp_path):
    import orbax.checkpoint as ocp

    path, _, _ = store
    mesh = _mesh((2, 1, 1, 1))
    kw = dict(mesh=mesh, batch_size=2, rollout_steps=2, seed=5, normalize=False, num_workers=1, prefetch=2)
    it = make_train_iterator(path, **kw)
    for _ in range(3):
        next(it)
    with ocp.CheckpointManager(tmp_path / "ckpt") as mngr:
        mngr.save(3, args=ocp.args.Composite(data=grain.checkpoint.CheckpointSave(it)))
        mngr.wait_until_finished()
        want = [np.asarray(next(it)) for _ in range(3)]
        it2 = make_train_iterator(path, **kw)
        mngr.restore(3, args=ocp.args.Composite(data=grain.checkpoint.CheckpointRestore(it2)))
    got = [np.asarray(next(it2)) for _ in range(3)]
    for a, b in zip(want, got):
        np.testing.assert_array_equal(a, b)
    it.close()
    it2.close()


def test_read_plan_for_simulated_processes(store):
    """Each process reads only its rows and tiles (devices subset = one host)."""
    path, _, _ = store
    src = WindowSource(path, rollout_steps=1)
    shape = (4, 2, 8, 16, 3)
    # data over hosts: mesh (2,1,2,2), host 0 holds data index 0 -> rows 0..1, whole field
    mesh = _mesh((2, 1, 2, 2))
    sh = jax.sharding.NamedSharding(mesh, WINDOW_SPEC)
    host0 = list(mesh.devices[0].flat)
    plan = read_plan(sh, shape, devices=host0)
    assert plan.rows.tolist() == [0, 1] and plan.lat == slice(0, 8) and plan.lon == slice(0, 16)
    # domain decomposition over hosts: mesh (1,1,2,4), host 1 holds the southern half
    mesh2 = _mesh((1, 1, 2, 4))
    sh2 = jax.sharding.NamedSharding(mesh2, WINDOW_SPEC)
    south = list(mesh2.devices[0, 0, 1].flat)
    plan2 = read_plan(sh2, shape, devices=south)
    assert plan2.rows.tolist() == [0, 1, 2, 3] and plan2.lat == slice(4, 8) and plan2.lon == slice(0, 16)
    block = _LocalBlockReader(src, plan2.rows, plan2.lat, plan2.lon)(np.array([3, 0, 5, 1]))
    assert block.shape == (4, 2, 4, 16, 3)
    np.testing.assert_array_equal(block[2], src[5][:, 4:8])
    for d, idx in plan2.device_index.items():  # each device's tile inside the local block
        gidx = sh2.devices_indices_map(shape)[d]
        assert idx[2] == slice(gidx[2].start - 4, gidx[2].stop - 4) and idx[3] == gidx[3]


def test_bad_mesh_fits(store, synthetic_store):
    path, _, _ = store
    with pytest.raises(DataError, match="batch size 3 is not divisible by the mesh's 'data' axis"):
        make_train_iterator(path, mesh=_mesh((2, 1, 2, 2)), batch_size=3)
    small = synthetic_store(S.six_hourly("2000-01-01", 6), ["t850"], (6, 8), doy_climatology=False)
    with pytest.raises(DataError, match="lat size 6 is not divisible by the mesh's 'height' axis"):
        make_train_iterator(small, mesh=_mesh((1, 1, 4, 2)), batch_size=2)
    with pytest.raises(DataError, match="only 5 windows for a global batch of 8"):
        make_train_iterator(small, mesh=_mesh((1, 1, 1, 1)), batch_size=8)
