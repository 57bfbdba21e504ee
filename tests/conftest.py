"""Test configuration: emulate 8 CPU devices before any JAX backend starts."""

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
