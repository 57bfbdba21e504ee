"""prepare at scale: the plan and disk refusal, climatology choice, resume after SIGKILL."""

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest

from fcn_jax.data import synthetic as S
from fcn_jax.data.climatology import DOY_HOUR_MIN_YEARS, linear_regrid, smooth_band
from fcn_jax.data.errors import DataError
from fcn_jax.data.plan import PreparePlan
from fcn_jax.data.prepare import prepare
from fcn_jax.data.store import open_store

CH = ["t850", "u10"]
LAT, LON = S.grid(4, 6, poles=False)


@pytest.fixture(scope="module")
def one_year(tmp_path_factory):
    d = tmp_path_factory.mktemp("one_year")
    times = S.six_hourly("2003-01-01T00", 4 * 365)
    x = S.truth(times, CH, LAT, LON)
    x = x + np.random.default_rng(1).normal(size=x.shape).astype(np.float32)
    return S.write_cds(d / "src", times, CH, LAT, LON, values=x), times


def test_plan_dry_run_and_auto_climatology(one_year, tmp_path):
    files, times = one_year
    lines = []
    plan = prepare(files, tmp_path / "s.zarr", channels=CH, dry_run=True, log=lines.append)
    assert isinstance(plan, PreparePlan) and not (tmp_path / "s.zarr").exists()
    assert plan.shape == (len(times), 2, 4, 6) and plan.fields_bytes == len(times) * 2 * 4 * 6 * 4
    # one year < DOY_HOUR_MIN_YEARS: auto falls back to the time mean and says why
    assert plan.climatology == "time-mean" and "too few" in plan.climatology_reason
    assert plan.clim_bytes == 0 and plan.clim_scratch_bytes == 0
    text = "\n".join(lines)
    assert "fields" in text and "estimated time" in text and "time-mean" in text
    forced = prepare(files, tmp_path / "s.zarr", channels=CH, climatology="doy-hour", dry_run=True,
                     log=lambda s: None)
    assert forced.clim_bytes == 366 * 4 * 2 * 4 * 6 * 4
    assert forced.clim_scratch_bytes == forced.clim_bytes + 366 * 4 * 16  # scratch = output (+ headers)
    out = prepare(files, tmp_path / "s.zarr", channels=CH, progress=False)
    ds = open_store(out)
    assert ds.attrs["climatology"] == "time-mean" and "clim_doy_hour" not in ds
    assert DOY_HOUR_MIN_YEARS == 3.0


def test_auto_builds_doy_hour_from_enough_years(tmp_path):
    times = S.six_hourly("2001-01-01T00", 4 * (365 * 3 + 1))  # 2001..2003 + 1 day of 2004
    files = S.write_cds(tmp_path / "src", times, ["t850"], LAT, LON)
    plan = prepare(files, tmp_path / "s.zarr", channels=["t850"], dry_run=True, log=lambda s: None)
    assert plan.climatology == "doy-hour" and "auto" in plan.climatology_reason


def test_refuses_when_disk_too_small(one_year, tmp_path, monkeypatch):
    import shutil

    files, _ = one_year
    real = shutil.disk_usage

    def tiny(path):
        return real(path)._replace(free=1000)

    monkeypatch.setattr("fcn_jax.data.plan.shutil.disk_usage", tiny)
    lines = []
    with pytest.raises(DataError, match="not enough disk space.*--climatology time-mean"):
        prepare(files, tmp_path / "s.zarr", channels=CH, climatology="doy-hour", log=lines.append)
    assert "plan for" in "\n".join(lines)  # the plan is shown with the refusal
    assert list(tmp_path.iterdir()) == []


def test_smooth_band_matches_direct_sum():
    rng = np.random.default_rng(0)
    means = rng.normal(size=(366, 2, 1, 2, 3)).astype(np.float32)
    counts = rng.integers(0, 3, size=(366, 2))
    counts[100:200] = 0
    fb = np.full((1, 2, 3), 7.0)
    got = smooth_band(means, counts, 41, fb)
    m = 20
    want = np.empty_like(got)
    for d in range(366):
        s = np.zeros((2, 1, 2, 3))
        n = np.zeros(2)
        for k in range(-m, m + 1):
            w = m + 1 - abs(k)
            s += w * counts[(d + k) % 366][:, None, None, None] * means[(d + k) % 366]
            n += w * counts[(d + k) % 366]
        for h in range(2):
            want[d, h] = s[h] / n[h] if n[h] else fb
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
    assert np.all(got[150] == 7.0)  # no sample within 20 days: the fallback


def test_linear_regrid():
    lat, lon = np.array([60.0, 0.0, -60.0]), np.arange(4) * 90.0
    x = (lat[:, None] * 0 + lon[None, :]).astype(np.float64)  # x = lon
    y = linear_regrid(x, lat, lon, np.array([30.0]), np.array([45.0, 315.0]))
    np.testing.assert_allclose(y, [[45.0, 135.0]])  # 315 between 270 and 360 (= 0): periodic
    z = linear_regrid(lat[:, None] + 0 * lon[None, :], lat, lon, np.array([90.0, 30.0, -90.0]), lon)
    np.testing.assert_allclose(z[:, 0], [60.0, 30.0, -60.0])  # clamped beyond the source rows


_CHILD = textwrap.dedent("""
    import sys, time
    import fcn_jax.data.prepare as P
    real = P._timed_read
    def slow(src, t0, t1):
        time.sleep(0.03)
        return real(src, t0, t1)
    P._timed_read = slow
    files, out = sys.argv[1].split(","), sys.argv[2]
    P.prepare(files, out, channels=["t850", "u10"], climatology="doy-hour", clim_window_days=15,
              block_steps=8, readers=2, progress=False)
""")


def _tree(path: Path) -> dict:
    return {str(p.relative_to(path)): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()}


@pytest.mark.slow
def test_sigkill_then_resume_writes_identical_store(one_year, tmp_path):
    files, times = one_year
    kw = dict(channels=CH, climatology="doy-hour", clim_window_days=15, block_steps=8, readers=2, progress=False)
    clean = prepare(files, tmp_path / "clean" / "s.zarr", **kw)

    out = tmp_path / "killed" / "s.zarr"
    out.parent.mkdir()
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parents[1]), JAX_PLATFORMS="cpu")
    proc = subprocess.Popen([sys.executable, "-c", _CHILD, ",".join(files), str(out)], env=env)
    done_at_kill = 0
    deadline = time.monotonic() + 300
    try:
        while time.monotonic() < deadline and proc.poll() is None:
            js = list(out.parent.glob(".s.zarr.work-*/journal.json"))
            if js:
                try:
                    done_at_kill = json.loads(js[0].read_text()).get("next_t", 0)
                except ValueError:
                    pass
                if done_at_kill >= len(times) // 2:
                    break
            time.sleep(0.05)
        assert proc.poll() is None, "the child finished before it could be killed"
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.wait()
    assert proc.returncode == -signal.SIGKILL and not out.exists()
    (partial,) = out.parent.glob(".s.zarr.partial-*")  # the partial store survives the kill
    # a kill inside zarr's atomic chunk write leaves its temporary file: make sure one is there
    (partial / "fields" / ("0.0.0.0." + "0" * 32 + ".partial")).write_bytes(b"torn")

    lines = []
    prepare(files, out, **dict(kw, progress=True), log=lines.append)
    resumed = [s for s in lines if s.startswith("resuming")]
    assert resumed and int(resumed[0].split(": ")[1].split("/")[0]) >= done_at_kill
    assert sorted(p.name for p in out.parent.iterdir()) == ["s.zarr"]  # scratch removed
    a, b = _tree(clean), _tree(out)
    assert a.keys() == b.keys(), sorted(set(a) ^ set(b))
    diff = [k for k in a if a[k] != b[k]]
    assert not diff, f"files differ after resume: {diff[:5]}"


def test_reader_processes_write_the_same_store(one_year, tmp_path):
    files, _ = one_year
    kw = dict(channels=CH, years="2003", block_steps=64, progress=False)
    a = prepare(files, tmp_path / "threads.zarr", readers=2, **kw)
    b = prepare(files, tmp_path / "procs.zarr", readers=2, reader_processes=True, **kw)
    ta, tb = _tree(a), _tree(b)
    assert ta.keys() == tb.keys() and all(ta[k] == tb[k] for k in ta)


_CHILD_FINALIZE = textwrap.dedent("""
    import os, signal, sys
    import fcn_jax.data.climatology as C
    import fcn_jax.data.prepare as P
    real, calls = C.smooth_band, []
    def dying(*a, **k):
        calls.append(1)
        if len(calls) == 3:  # mid-way through the climatology's bands
            os.kill(os.getpid(), signal.SIGKILL)
        return real(*a, **k)
    C.smooth_band = dying
    files, out = sys.argv[1].split(","), sys.argv[2]
    P.prepare(files, out, channels=["t850", "u10"], climatology="doy-hour", clim_window_days=15,
              block_steps=64, clim_memory_bytes=0, progress=False)
""")


@pytest.mark.slow
def test_sigkill_in_the_climatology_pass_then_resume(one_year, tmp_path):
    files, _ = one_year
    kw = dict(channels=CH, climatology="doy-hour", clim_window_days=15, block_steps=64, clim_memory_bytes=0,
              progress=False)
    clean = prepare(files, tmp_path / "clean" / "s.zarr", **kw)
    out = tmp_path / "killed" / "s.zarr"
    out.parent.mkdir()
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parents[1]), JAX_PLATFORMS="cpu")
    r = subprocess.run([sys.executable, "-c", _CHILD_FINALIZE, ",".join(files), str(out)], env=env, timeout=300)
    assert r.returncode == -signal.SIGKILL and not out.exists()
    (journal,) = out.parent.glob(".s.zarr.work-*/journal.json")
    assert json.loads(journal.read_text())["phase"] == "finalize"
    prepare(files, out, **kw)
    a, b = _tree(clean), _tree(out)
    assert a.keys() == b.keys() and all(a[k] == b[k] for k in a)
