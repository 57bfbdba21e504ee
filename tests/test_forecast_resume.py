"""Forecasts that survive: a killed ensemble continues from its journal, outputs are never replaced silently."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import xarray as xr

from fcn_jax import forecast
from fcn_jax.checkpoints import package as model_ckpt
from fcn_jax.config import ModelConfig
from fcn_jax.data import synthetic as S
from fcn_jax.inference.files import ForecastWriter, partial_outputs, read_forecast
from tests.helpers import random_model

REPO = Path(__file__).resolve().parent.parent
CFG = ModelConfig(img_size=(16, 32), patch_size=(4, 4), in_channels=3, out_channels=3, embed_dim=16, depth=1,
                  num_blocks=2)
CHANNELS = ["z500", "t850", "t2m"]


@pytest.fixture(scope="module")
def store(synthetic_store):
    times = S.six_hourly("2001-01-01T00", 24)
    return synthetic_store(times, CHANNELS, (16, 32), noise=0.3, doy_climatology=False), times


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory, store):
    path = tmp_path_factory.mktemp("m") / "model"
    package, clim = model_ckpt.package_from_store(store[0], CHANNELS)
    model_ckpt.save_model(path, random_model(CFG, scale=0.1), package=package, climatology=clim)
    return str(path)


def _args(model_dir, store, out, *extra):
    path, times = store
    return [model_dir, "--store", path, "--init", f"{times[0]},{times[4]}", "--steps", "6", "--members", "12",
            "--member-chunk", "2", "--mesh", "1,1,1,1", "--out", str(out), *extra]


def _same_file(a, b):
    da, db = read_forecast(a), read_forecast(b)
    assert list(da.data_vars) == list(db.data_vars)
    for v in da.data_vars:
        np.testing.assert_array_equal(da[v].values, db[v].values, err_msg=v)
    for c in ("init_time", "lead_time", "member", "lat", "lon"):
        np.testing.assert_array_equal(da[c].values, db[c].values)


@pytest.mark.parametrize("suffix", [".zarr", ".nc"])
def test_an_interrupted_ensemble_continues_to_the_same_file(model_dir, store, tmp_path, monkeypatch, capsys, suffix):
    clean = tmp_path / f"clean{suffix}"
    assert forecast.main(_args(model_dir, store, clean)) == 0
    out = tmp_path / f"ens{suffix}"
    calls = {"n": 0}
    write = ForecastWriter.write

    def dying_write(self, *a, **k):  # the 7th chunk's write is interrupted (as a kill would)
        calls["n"] += 1
        if calls["n"] == 7:
            raise KeyboardInterrupt
        return write(self, *a, **k)

    monkeypatch.setattr(ForecastWriter, "write", dying_write)
    assert forecast.main(_args(model_dir, store, out)) == 130
    monkeypatch.setattr(ForecastWriter, "write", write)
    assert not out.exists()
    (partial,) = partial_outputs(out)
    assert len(json.loads((partial / "journal.json").read_text())["done"]) == 6  # 6 of 12 chunks committed
    capsys.readouterr()
    seen = {"n": 0}

    def counting_write(self, *a, **k):
        seen["n"] += 1
        return write(self, *a, **k)

    monkeypatch.setattr(ForecastWriter, "write", counting_write)
    assert forecast.main(_args(model_dir, store, out)) == 0  # the same command again
    assert seen["n"] == 6  # only the chunks not committed
    assert "resuming" in capsys.readouterr().err
    _same_file(out, clean)
    assert partial_outputs(out) == [] and not list(tmp_path.glob(".*.tmp"))  # nothing left behind


def test_an_existing_output_needs_overwrite(model_dir, store, tmp_path, capsys):
    out = tmp_path / "ens.zarr"
    assert forecast.main(_args(model_dir, store, out)) == 0
    before = sorted(p.name for p in out.rglob("*"))
    assert forecast.main(_args(model_dir, store, out, "--seed", "3")) == 2
    assert "exists; pass --overwrite" in capsys.readouterr().err
    assert sorted(p.name for p in out.rglob("*")) == before and partial_outputs(out) == []
    assert forecast.main(_args(model_dir, store, out, "--seed", "3", "--overwrite")) == 0
    assert read_forecast(out).attrs["seed"] == 3 and partial_outputs(out) == []


def test_another_command_never_reuses_a_partial_output_and_names_the_difference(model_dir, store, tmp_path,
                                                                                monkeypatch, capsys):
    out = tmp_path / "ens.zarr"
    write = ForecastWriter.write

    def dying_write(self, *a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(ForecastWriter, "write", dying_write)
    assert forecast.main(_args(model_dir, store, out)) == 130
    monkeypatch.setattr(ForecastWriter, "write", write)
    (stale,) = partial_outputs(out)
    capsys.readouterr()
    assert forecast.main(_args(model_dir, store, out, "--seed", "5")) == 0  # another command: from zero
    err = capsys.readouterr().err
    assert f"{stale}" in err and "is not reused" in err and "seed 0 -> 5" in err and f"rm -r '{stale}'" in err
    assert "resuming" not in err and "GB" in err
    assert partial_outputs(out) == [stale]  # the other's partial is left alone (reported, not deleted)
    assert read_forecast(out).attrs["seed"] == 5


def test_output_size_is_printed_and_space_checked(model_dir, store, tmp_path, monkeypatch, capsys):
    import shutil
    from collections import namedtuple

    out = tmp_path / "ens.nc"
    Usage = namedtuple("Usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda p: Usage(10**9, 10**9 - 1000, 1000))
    assert forecast.main(_args(model_dir, store, out)) == 2
    err = capsys.readouterr().err
    assert "the forecast needs up to" in err and "free" in err and not out.exists()
    assert partial_outputs(out) == []  # nothing written: the check comes first


def test_sigkill_mid_ensemble_then_the_same_command_finishes_it(model_dir, store, tmp_path):
    """The real thing: SIGKILL once a third of the chunks are committed; the rerun writes only the rest."""
    path, times = store
    args = [model_dir, "--store", path, "--init", f"{times[0]},{times[4]}", "--steps", "6", "--members", "48",
            "--member-chunk", "2", "--mesh", "1,1,1,1"]
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONPATH": str(REPO)}
    clean = tmp_path / "clean.zarr"
    subprocess.run([sys.executable, "-m", "fcn_jax.forecast", *args, "--out", str(clean)], check=True, cwd=REPO,
                   env=env, capture_output=True)
    out = tmp_path / "ens.zarr"
    proc = subprocess.Popen([sys.executable, "-m", "fcn_jax.forecast", *args, "--out", str(out)], cwd=REPO, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    t0 = time.monotonic()
    done = 0
    while done < 16 and proc.poll() is None and time.monotonic() - t0 < 300:  # 48 chunks in all
        journals = [p / "journal.json" for p in partial_outputs(out)]
        if journals and journals[0].is_file():
            try:
                done = len(json.loads(journals[0].read_text())["done"])
            except ValueError:
                pass
        time.sleep(0.02)
    assert proc.poll() is None, "finished before it could be killed"
    proc.send_signal(signal.SIGKILL)
    proc.communicate()
    rerun = subprocess.run([sys.executable, "-m", "fcn_jax.forecast", *args, "--out", str(out)], cwd=REPO, env=env,
                           capture_output=True, text=True)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert "resuming" in rerun.stderr
    _same_file(out, clean)
    assert partial_outputs(out) == [] and not list(tmp_path.glob(".*.tmp"))
    with xr.open_zarr(out) as ds:
        assert int(ds.sizes["member"]) == 48
