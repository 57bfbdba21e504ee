"""The training feed reads the store's description once."""

import jax
import numpy as np
import xarray as xr

from fcn_jax.config import load_experiment
from fcn_jax.data import synthetic as S
from fcn_jax.data.channels import WORLD


def test_feed_opens_the_store_description_once(synthetic_store, data_mesh, monkeypatch):
    from fcn_jax.training.data_feed import open_feed

    store = synthetic_store(S.six_hourly("2000-01-01T00", 48), list(WORLD), noise=0.1)
    cfg = load_experiment("world", [f"data.store={store}", "data.train_years=[2000,2000]",
                                    "data.valid_years=[2000,2000]", "mesh.data=-1", "train.batch_size=8"])
    opened = []
    real = xr.open_zarr

    def counting(path, *a, **k):
        opened.append(str(path))
        return real(path, *a, **k)

    monkeypatch.setattr(xr, "open_zarr", counting)
    with jax.set_mesh(data_mesh):
        feed = open_feed(cfg, data_mesh)
        batch = feed.next_train()
        valid = list(feed.valid_batches(1))
        feed.close()
    assert opened == [str(store)]  # one description for training, validation, statistics, climatology
    assert batch["fields"].shape == (8, 2, 8, 16, 16) and len(valid) == 1
    ds = real(store)
    np.testing.assert_allclose(np.asarray(feed.norm[0]), ds["mean"].values, rtol=1e-6)
    np.testing.assert_allclose(np.asarray(feed.climatology), ds["time_mean"].transpose("lat", "lon", "channel").values)
