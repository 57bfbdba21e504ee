"""AFNONet (FourCastNet backbone) and PrecipNet."""

from fcn_jax.model.afnonet import AFNONet, PrecipNet, build_model, count_params, shard_model

__all__ = ["AFNONet", "PrecipNet", "build_model", "count_params", "shard_model"]
