"""Test configuration: emulate 8 CPU devices before any JAX backend starts; fixtures shared by several files."""

import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402

jax.config.update("jax_num_cpu_devices", 8)
# Reference comparisons are done in float32 at full precision.
jax.config.update("jax_default_matmul_precision", "highest")

try:  # grain reads absl flags outside absl.app.run (google/grain#1355)
    from absl import flags

    flags.FLAGS.mark_as_parsed()
except Exception:  # pragma: no cover - absl always present with grain
    pass

import pytest  # noqa: E402


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: takes more than ~20 s on 2 cores")


@pytest.fixture(scope="session")
def devices():
    devs = jax.devices()
    assert len(devs) == 8, f"expected 8 emulated CPU devices, got {len(devs)}"
    return devs


@pytest.fixture(scope="session")
def data_mesh(devices):
    """The 8 devices on the ``data`` axis: mesh (8, 1, 1, 1)."""
    from fcn_jax.parallel.mesh import make_mesh

    return make_mesh((8, 1, 1, 1), devices=devices)


@pytest.fixture(scope="session")
def world_store(tmp_path_factory):
    """The small world store (path): 40 days of the Held-Suarez atmosphere after a 10-day spin-up, seed 0.

    Built once a session (~20 s on 2 cores) under ``root/store.zarr`` with the CDS files it was prepared from in
    ``root/netcdf``. Tests read it; one that damages it works on a copy.
    """
    from fcn_jax.data.catalog import world_store as build
    from fcn_jax.data.world import WorldSpec

    root = tmp_path_factory.mktemp("world")
    return str(build(root, spec=WorldSpec(seed=0, days=40, spinup_days=10), progress=False))


@pytest.fixture(scope="session")
def synthetic_store(tmp_path_factory):
    """``make(times, channels, shape=(8, 16), noise=None, **prepare_kw) -> path``: a small store of analytic fields.

    The values are :func:`fcn_jax.data.synthetic.truth` on a ``shape`` grid without the poles. With
    ``noise=None`` they go through CDS netCDF files (``write_cds``, the reader's path; the store holds
    ``truth`` exactly); with a float, through the in-memory ``synthetic_source`` with that much noise.
    ``prepare_kw`` go to ``prepare`` (its ``channels`` default to the ones asked for). One store per
    distinct call, made once a session; tests must not write to it.
    """
    import numpy as np

    from fcn_jax.data import synthetic as S
    from fcn_jax.data.prepare import prepare

    made = {}

    def make(times, channels, shape=(8, 16), noise=None, **prepare_kw):
        prepare_kw.setdefault("channels", list(channels))
        key = (tuple(np.asarray(times).astype("datetime64[s]").astype(str)), tuple(channels), tuple(shape), noise,
               repr(sorted(prepare_kw.items())))
        if key not in made:
            d = tmp_path_factory.mktemp("store")
            lat, lon = S.grid(*shape, poles=False)
            src = (S.write_cds(d / "src", times, channels, lat, lon) if noise is None
                   else S.synthetic_source(times, channels, lat, lon, noise=noise))
            made[key] = str(prepare(src, d / "s.zarr", progress=False, **prepare_kw))
        return made[key]

    return make
