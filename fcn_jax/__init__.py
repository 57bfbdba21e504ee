"""fcn_jax: FourCastNet (AFNO) in JAX / Flax NNX on a (data, channel, height, width) device mesh.

Entry points: ``python -m fcn_jax.train``, ``python -m fcn_jax.data``, ``python -m fcn_jax.convert``,
``python -m fcn_jax.check``, ``python -m fcn_jax.demo``.
"""

__version__ = "0.1.0"
