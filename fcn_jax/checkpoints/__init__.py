"""Checkpoints and model packages: the one home of everything fcn_jax saves of a model.

* :mod:`.integrity` -- manifests of sizes and CRC32C per file, written last and
  checked before anything saved is trusted;
* :mod:`.train_state` -- Orbax training checkpoints (model, optimiser, data
  iterator): atomic, verified on restore, damaged steps set aside, restored onto
  any mesh;
* :mod:`.package` -- model packages (``model.json``: channels, statistics,
  grid, time step, precipitation settings, provenance; ``climatology.nc``;
  the weights): what a forecast needs and nothing else.

Command line: ``python -m fcn_jax.checkpoint {verify,seal,show}``.
"""
