"""Two real JAX processes on localhost: each reads only its rows / tiles."""

import json
import os
import subprocess
import sys
import textwrap

import pytest

from fcn_jax.data import synthetic as S
from tests.multiproc import free_port

_WORKER = textwrap.dedent("""
    import json, os, sys
    os.environ["JAX_PLATFORMS"] = "cpu"
    import jax
    jax.config.update("jax_num_cpu_devices", 4)
    jax.distributed.initialize(coordinator_address=sys.argv[1], num_processes=2, process_id=int(sys.argv[2]))
    import grain
    import numpy as np
    from fcn_jax.data.pipeline import make_train_iterator
    from fcn_jax.parallel.axes import MESH_AXES

    out = {}
    for name, shape in (("data", (2, 1, 2, 2)), ("domain", (1, 1, 4, 2))):
        mesh = jax.make_mesh(shape, MESH_AXES, axis_types=(jax.sharding.AxisType.Auto,) * 4)
        it = make_train_iterator(sys.argv[3], mesh=mesh, batch_size=4, rollout_steps=1, seed=7, normalize=False)
        x = next(it)
        src = it.source
        idx = grain.MapDataset.range(len(src)).seed(7).shuffle().repeat(None).batch(4)[0]
        want = np.stack([src[int(i)] for i in idx])
        ok = all(np.array_equal(np.asarray(s.data), want[s.index]) for s in x.addressable_shards)
        out[name] = {"rows": it.plan.rows.tolist(), "lat": [it.plan.lat.start, it.plan.lat.stop],
                     "lon": [it.plan.lon.start, it.plan.lon.stop], "ok": ok, "shape": list(x.shape)}
        it.close()
    print("RESULT" + json.dumps(out), flush=True)
""")


@pytest.mark.slow
def test_two_processes_read_disjoint_parts(synthetic_store):
    store = synthetic_store(S.six_hourly("2000-01-01", 20), ["z500", "u10"], doy_climatology=False)
    port = free_port()
    env = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", "JAX_NUM_CPU_DEVICES")}
    env["PYTHONPATH"] = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    procs = [subprocess.Popen([sys.executable, "-c", _WORKER, f"127.0.0.1:{port}", str(i), str(store)],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
             for i in range(2)]
    res = []
    for p in procs:
        out, err = p.communicate(timeout=240)
        assert p.returncode == 0, err[-3000:]
        res.append(json.loads(out.split("RESULT", 1)[1]))
    for r in res:
        assert r["data"]["ok"] and r["domain"]["ok"]
        assert r["data"]["shape"] == [4, 2, 8, 16, 2]
    # data axis across processes: disjoint rows, each the whole field
    assert sorted(res[0]["data"]["rows"] + res[1]["data"]["rows"]) == [0, 1, 2, 3]
    assert all(r["data"]["lat"] == [0, 8] for r in res)
    # height split across processes: same rows (same samples), disjoint latitude bands
    assert all(r["domain"]["rows"] == [0, 1, 2, 3] for r in res)
    bands = sorted(tuple(r["domain"]["lat"]) for r in res)
    assert bands == [(0, 4), (4, 8)]
