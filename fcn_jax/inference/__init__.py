"""Inference: the model as forecasts use it.

* :mod:`.rollout` -- the one autoregressive rollout (training's multi-step
  loss and validation use it too), deterministic and ensemble;
* :mod:`.forecaster` -- wrappers around the model: normalisation, the
  precipitation diagnosis, lead segments and member chunks in physical units;
* :mod:`.files` -- the forecast file layer: the layout, incremental writing,
  checked reading.
"""
