#!/usr/bin/env python
"""Time and memory of a 7-day forecast with the published FourCastNet, from an ERA5 GRIB analysis, on this CPU.

What the README's walkthrough "Forecasting with the published FourCastNet" does, measured
end to end, each command in its own process (wall clock and that process's peak RSS,
from ``os.wait4``):

1. ``python -m fcn_jax.convert backbone.ckpt --experiment afno_backbone --stats stats --out model``
   -- a release-style package: ``backbone.ckpt`` in the original PyTorch format
   (:func:`fcn_jax.convert.save_torch_checkpoint`) and ``stats/global_means.npy``,
   ``global_stds.npy`` (1, 21, 1, 1), ``time_means.npy`` (1, 21, 721, 1440);
2. ``python -m fcn_jax.forecast model --ic-file era5_pl.grib era5_sfc.grib --init 2018-01-01T00
   --steps 28 --out fc7d.nc`` -- from an ERA5-like 0.25-degree analysis written as the
   Copernicus store delivers it (GRIB 2, regular_ll 1440 x 721, 16-bit simple packing,
   ERA5 paramIds, pressure levels and single levels in two files);
3. the same with ``--steps 1`` (start-up, reading, compiling and writing: the per-step
   cost is the difference) and a 2-member, 2-step ensemble (the per-member-step cost,
   extrapolated -- not run -- to a 100-member 7-day ensemble);
4. ``python -m fcn_jax.perf --experiment afno_backbone --hardware h100 --mesh 1,1,1,1``
   (and ``--hardware cpu``): the performance model's prediction for one GPU and this CPU.

The published weights are not needed: the model has the published architecture
(720 x 1440, patch 8, 20 channels, embed 768, depth 12, 8 AFNO blocks) with random
weights of the original's initial scale (std 0.02). A forward pass does the same dense
work (matmuls, FFTs, no data-dependent branches) whatever the values, so it costs the
same time and memory; the small scale keeps the 28-step rollout finite (checked).

    JAX_PLATFORMS=cpu python bench/bench_published.py [--steps 28] [--workdir DIR] [--keep]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_model import format_table  # noqa: E402

from fcn_jax import cli  # noqa: E402

GB = 1e9
NJ, NI = 721, 1440  # ERA5 0.25 degree, pole to pole
INIT = "2018-01-01T00"
LEVELS = (50, 500, 850, 1000)
PL_PARAMS = {"u": 131, "v": 132, "t": 130, "z": 129, "r": 157}
SFC_PARAMS = {"u10": 165, "v10": 166, "t2m": 167, "sp": 134, "msl": 151, "tcwv": 137}
#: ERA5-like (mean, std) of every field written: pressure-level (var, hPa), single-level name
CLIMATE = {
    ("t", 50): (210, 8), ("t", 500): (252, 13), ("t", 850): (275, 15), ("t", 1000): (283, 17),
    ("z", 50): (200000, 3000), ("z", 500): (55000, 3300), ("z", 850): (14000, 1300), ("z", 1000): (800, 1000),
    ("u", 50): (3, 15), ("u", 500): (6, 11.5), ("u", 850): (1, 8), ("u", 1000): (0.2, 6),
    ("v", 50): (0, 6), ("v", 500): (-0.1, 9), ("v", 850): (0.2, 6.3), ("v", 1000): (0.1, 5.1),
    ("r", 50): (5, 5), ("r", 500): (48, 32), ("r", 850): (70, 27), ("r", 1000): (78, 18),
    "u10": (0.5, 5.5), "v10": (-0.3, 4.7), "t2m": (278, 21), "sp": (96500, 9500), "msl": (101200, 1100),
    "tcwv": (18, 16),
}  # fmt: skip
MEMBERS, MEMBER_STEPS = 2, 2  # the small ensemble that is run
BIG_MEMBERS, BIG_STEPS = 100, 28  # the ensemble extrapolated to


# --------------------------------------------------------------------------- #
# The release-style package and the analysis
# --------------------------------------------------------------------------- #


def era5_like(name, lat, lon, offset: float = 0.0) -> np.ndarray:
    """A smooth [721, 1440] float32 field of the variable ``name`` with about ERA5's mean and std."""
    mean, std = CLIMATE[name]
    var = name[0] if isinstance(name, tuple) else name
    ph = (sum(map(ord, str(name))) % 17) / 3.0 + offset
    wave = np.cos(lat) * np.sin(3 * lon + 2 * np.sin(lat) + ph) + 0.3 * np.cos(2 * lat) * np.sin(5 * lon - ph)
    if var in ("u", "u10"):  # westerly jets, easterly trades
        p = np.sin(2 * lat) ** 2 - 0.4 * np.cos(lat) ** 2 + 0.3 * wave
    elif var in ("v", "v10"):
        p = wave
    elif var == "sp":  # msl-like, low over the Tibetan plateau and Antarctica
        p = 0.3 * wave - 3 * np.exp(-((lat - 0.55) ** 2 + (lon - 1.5) ** 2) / 0.03) - 2 * (lat < -1.2)
    else:  # warm / high / moist tropics
        p = np.cos(lat) ** 2 + 0.3 * wave
    p = (p - p.mean()) / p.std()
    x = mean + std * p
    if var in ("r", "tcwv"):
        x = np.clip(x, 0, 100 if var == "r" else None)
    return x.astype(np.float32)


def write_grib(path: Path, messages) -> None:
    """messages: (sample, keys, values [721, 1440] north -> south), 16-bit simple packing, as ERA5 from the CDS."""
    import eccodes

    grid = dict(gridType="regular_ll", Ni=NI, Nj=NJ, latitudeOfFirstGridPointInDegrees=90.0,
                latitudeOfLastGridPointInDegrees=-90.0, longitudeOfFirstGridPointInDegrees=0.0,
                longitudeOfLastGridPointInDegrees=359.75, iDirectionIncrementInDegrees=0.25,
                jDirectionIncrementInDegrees=0.25)
    date = dict(dataDate=int(INIT[:10].replace("-", "")), dataTime=int(INIT[11:13]) * 100)
    with open(path, "wb") as f:
        for sample, keys, values in messages:
            h = eccodes.codes_grib_new_from_samples(sample)
            try:
                for k, v in {**grid, **date, **keys}.items():
                    eccodes.codes_set(h, k, v)
                eccodes.codes_set(h, "packingType", "grid_simple")
                eccodes.codes_set(h, "bitsPerValue", 16)
                eccodes.codes_set_values(h, values.astype(np.float64).ravel())
                eccodes.codes_write(h, f)
            finally:
                eccodes.codes_release(h)


def make_release(d: Path) -> None:
    """backbone.ckpt (published architecture, random weights) and stats/ in the release's layout."""
    import jax
    import jax.numpy as jnp
    from flax import nnx

    from fcn_jax.config import load_experiment
    from fcn_jax.convert import save_torch_checkpoint
    from fcn_jax.data.channels import FCN_20
    from fcn_jax.model.afnonet import build_model

    cfg = load_experiment("afno_backbone").model
    graphdef, state = nnx.split(nnx.eval_shape(lambda: build_model(cfg, seed=0)))  # nothing allocated
    r = np.random.default_rng(0)
    state = jax.tree.map(lambda a: jnp.asarray(0.02 * r.standard_normal(a.shape, np.float32)), state)
    save_torch_checkpoint(nnx.merge(graphdef, state), d / "backbone.ckpt")
    del state

    lat = np.deg2rad(np.linspace(90, -90, NJ))[:, None]
    lon = np.deg2rad(np.arange(NI) * 0.25)[None, :]
    names = [c if c in CLIMATE else (c[0], int(c[1:])) for c in FCN_20]  # release order + an unused 21st
    (d / "stats").mkdir(exist_ok=True)
    means = np.array([CLIMATE[n][0] for n in names] + [290.0], np.float32).reshape(1, 21, 1, 1)
    stds = np.array([CLIMATE[n][1] for n in names] + [10.0], np.float32).reshape(1, 21, 1, 1)
    np.save(d / "stats" / "global_means.npy", means)
    np.save(d / "stats" / "global_stds.npy", stds)
    tm = np.full((1, 21, NJ, NI), 290.0, np.float32)
    for i, n in enumerate(names):
        tm[0, i] = era5_like(n, lat, lon, offset=0.2)
    np.save(d / "stats" / "time_means.npy", tm)


def make_analysis(d: Path) -> list[Path]:
    """era5_pl.grib (u v t z r on 50/500/850/1000 hPa) and era5_sfc.grib (10u 10v 2t sp msl tcwv) at INIT."""
    lat = np.deg2rad(np.linspace(90, -90, NJ))[:, None]
    lon = np.deg2rad(np.arange(NI) * 0.25)[None, :]
    pl = [("regular_ll_pl_grib2", dict(paramId=pid, typeOfLevel="isobaricInhPa", level=lev),
           era5_like((v, lev), lat, lon)) for v, pid in PL_PARAMS.items() for lev in LEVELS]
    sfc = [("regular_ll_sfc_grib2", dict(paramId=pid), era5_like(n, lat, lon)) for n, pid in SFC_PARAMS.items()]
    files = [d / "era5_pl.grib", d / "era5_sfc.grib"]
    write_grib(files[0], pl)
    write_grib(files[1], sfc)
    return files


def check_analysis(files) -> str:
    """The GRIB reader reads the 20 channels at the right values (16-bit packing aside)."""
    from fcn_jax.data.channels import FCN_20
    from fcn_jax.data.readers import open_source

    src = open_source([str(f) for f in files], "fcn20")
    x = src.read(0, 1)[0]
    lat = np.deg2rad(np.linspace(90, -90, NJ))[:, None]
    lon = np.deg2rad(np.arange(NI) * 0.25)[None, :]
    err = max(float(np.abs(x[i] - era5_like(n if n in CLIMATE else (n[0], int(n[1:])), lat, lon)).max())
              / CLIMATE[n if n in CLIMATE else (n[0], int(n[1:]))][1] for i, n in enumerate(FCN_20))
    if src.channel_names != list(FCN_20) or x.shape != (20, NJ, NI) or err > 0.01:
        raise SystemExit(f"GRIB analysis read back wrong: channels {src.channel_names}, shape {x.shape}, "
                         f"max error {err:.3g} std")
    return f"open_source(GRIB, 'fcn20'): {src.shape}, max |error| {err:.1e} std (16-bit packing)"


# --------------------------------------------------------------------------- #
# Measuring
# --------------------------------------------------------------------------- #


def run(name: str, args: list[str], d: Path) -> dict:
    """Run ``python -m ARGS`` in ``d``; wall seconds, the process's peak RSS (bytes), exit code, log."""
    log = d / "logs" / f"{name}.log"
    cmd = [sys.executable, "-m", *args]
    print(f"$ {' '.join(args)}", flush=True)
    t0 = time.perf_counter()
    with open(log, "w") as f:
        p = subprocess.Popen(cmd, cwd=d, stdout=f, stderr=subprocess.STDOUT)
        _, status, ru = os.wait4(p.pid, 0)
    p.returncode = rc = os.waitstatus_to_exitcode(status)
    wall = time.perf_counter() - t0
    # CPU time / wall: 2 cores busy = 200 %; much less means other jobs took the cores
    res = {"wall": wall, "rss": ru.ru_maxrss * 1024, "cpu": (ru.ru_utime + ru.ru_stime) / wall, "rc": rc, "log": log}
    tail = log.read_text().strip().splitlines()[-1:]
    print(f"  {wall:.1f} s, CPU {100 * res['cpu']:.0f} %, peak RSS {res['rss'] / GB:.2f} GB, rc {rc}, "
          f"load average {os.getloadavg()[0]:.1f}" + "".join(f"\n  | {t}" for t in tail), flush=True)
    if rc:
        print(f"FAILED (rc {rc}): python -m {' '.join(args)}  (cwd {d}); log {log}:\n{log.read_text()[-4000:]}",
              flush=True)
    return res


def perf(hardware: str) -> dict | None:
    args = ["fcn_jax.perf", "--experiment", "afno_backbone", "--hardware", hardware, "--mesh", "1,1,1,1", "--json"]
    p = subprocess.run([sys.executable, "-m", *args], capture_output=True, text=True)
    if p.returncode:
        print(f"FAILED (rc {p.returncode}): python -m {' '.join(args)}\n{p.stderr[-2000:]}")
        return None
    return json.loads(p.stdout)


def gpu_forward_memory(batch: int, layout: str) -> float:
    """The perf model's forward working set on one H100 at ``batch`` samples (bytes)."""
    from fcn_jax.config import load_experiment
    from fcn_jax.parallel.mesh import MeshSizes
    from fcn_jax.perfmodel import model as pm
    from fcn_jax.perfmodel.hardware import get_hardware

    cfg = load_experiment("afno_backbone").model
    return pm.forward_memory_per_device(pm.Setting(cfg, MeshSizes(1, 1, 1, 1), batch, get_hardware("h100"), layout))


def gpu_max_chunk(layout: str) -> int:
    from fcn_jax.perfmodel.hardware import get_hardware

    hw = get_hardware("h100")
    limit = hw.mem_bytes * hw.usable_fraction
    return max(b for b in range(1, BIG_MEMBERS + 1) if gpu_forward_memory(b, layout) <= limit)


def finite_last_lead(path: Path) -> bool:
    import xarray as xr

    with xr.open_dataset(path) as ds:
        return all(bool(np.isfinite(ds[v].isel(lead_time=-1).values).all()) for v in ds.data_vars)


def remove(d: Path, names) -> None:
    for name in names:
        p = d / name
        if p.is_dir():
            shutil.rmtree(p)
        elif p.exists():
            p.unlink()


def fmt_s(t: float | None) -> str:
    if t is None:
        return "-"
    if t >= 3600:
        return f"{t / 3600:.2f} h"
    return f"{t:.1f} s" if t >= 1 else f"{t * 1e3:.1f} ms"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                 formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    ap.add_argument("--workdir", type=Path, default=Path("/tmp/fcn_published"), help="scratch directory")
    ap.add_argument("--steps", type=int, default=28, help="forecast steps (6 h each; 28 = 7 days)")
    ap.add_argument("--keep", action="store_true", help="keep the checkpoint, package, GRIB and forecast files")
    args = ap.parse_args(argv)
    if args.steps < 2:
        ap.error("--steps must be >= 2 (the per-step cost is a difference with a 1-step forecast)")
    # the CPU (JAX_PLATFORMS=cpu unless set, inherited by the commands it runs), before JAX starts
    cli.start(argparse.Namespace(cpu_devices=1))
    d, n = args.workdir, args.steps
    big = ["backbone.ckpt", "stats", "model", "era5_pl.grib", "era5_sfc.grib", "fc1.nc", "fc7d.nc", "ens.nc"]
    d.mkdir(parents=True, exist_ok=True)
    remove(d, big)  # convert refuses an existing --out
    (d / "logs").mkdir(exist_ok=True)

    t0, load0 = time.perf_counter(), os.getloadavg()[0]
    make_release(d)
    files = make_analysis(d)
    note = check_analysis(files)
    print(f"release package and GRIB analysis written in {time.perf_counter() - t0:.0f} s; {note}", flush=True)

    ics = ["--ic-file", *[f.name for f in files], "--init", INIT]
    conv = run("convert", ["fcn_jax.convert", "backbone.ckpt", "--experiment", "afno_backbone", "--stats", "stats",
                           "--out", "model"], d)
    fc1 = fcn = ens = None
    if not conv["rc"]:
        fc1 = run("forecast_1step", ["fcn_jax.forecast", "model", *ics, "--steps", "1", "--out", "fc1.nc"], d)
        fcn = run("forecast", ["fcn_jax.forecast", "model", *ics, "--steps", str(n), "--out", "fc7d.nc"], d)
        ens = run("ensemble", ["fcn_jax.forecast", "model", *ics, "--steps", str(MEMBER_STEPS), "--members",
                               str(MEMBERS), "--member-chunk", str(MEMBERS), "--out", "ens.nc"], d)
    gpu, cpu = perf("h100"), perf("cpu")

    ok = lambda r: r is not None and not r["rc"]  # noqa: E731
    step = (fcn["wall"] - fc1["wall"]) / (n - 1) if ok(fcn) and ok(fc1) else None
    overhead = fc1["wall"] - step if step is not None else None
    mstep = (ens["wall"] - overhead) / (MEMBERS * MEMBER_STEPS) if ok(ens) and overhead is not None else None
    g = gpu["forward"] if gpu else None
    g_tts = gpu["time_to_solution_s"] if gpu else {}
    fc_size = (d / "fc7d.nc").stat().st_size if ok(fcn) else None
    big_size = BIG_MEMBERS * (BIG_STEPS + 1) * 20 * 720 * 1440 * 4

    def m(r):
        if not ok(r):
            return ("FAILED" if r else "not run", "-", "-")
        return fmt_s(r["wall"]), f"{100 * r['cpu']:.0f} %", f"{r['rss'] / GB:.2f} GB"

    rows = [
        ["convert backbone.ckpt -> model", *m(conv), "-", ""],
        ["forecast, 1 step (start-up, read GRIB, compile, write)", *m(fc1), "-", ""],
        [f"forecast, {n} steps ({n / 4:g} days) -> fc7d.nc", *m(fcn),
         f"{fmt_s(g_tts.get('forecast_7day') * n / 28)}" if gpu else "-",
         f"output {fc_size / GB:.2f} GB" if fc_size else ""],
        ["  one forward step = (T_n - T_1) / (n - 1)", fmt_s(step), "", "-",
         f"{fmt_s(g['time_s']['total'])}, {g['memory_per_device_bytes'] / GB:.2f} GB" if g else "-", ""],
        [f"ensemble {MEMBERS} members x {MEMBER_STEPS} steps, chunk {MEMBERS}", *m(ens), "-", ""],
        ["  one member-step = (T_ens - start-up) / 4", fmt_s(mstep), "", "-", "-", ""],
        [f"{BIG_MEMBERS}-member {BIG_STEPS}-step ensemble, chunk {MEMBERS} (EXTRAPOLATED)",
         fmt_s(overhead + BIG_MEMBERS * BIG_STEPS * mstep) if mstep else "-", "",
         f"~{ens['rss'] / GB:.2f} GB" if mstep else "-",
         fmt_s(7 * g_tts["ensemble_100x24h"]) + " (7 x perf's 24 h)" if gpu else "-",
         f"output {big_size / GB:.0f} GB (not written)"],
    ]
    print()
    print(f"Published FourCastNet (afno_backbone: 720x1440, patch 8, 20 ch, embed 768, depth 12), random weights; "
          f"ERA5-like GRIB analysis {INIT}. Measured on this CPU ({os.cpu_count()} cores, one process at a time, "
          f"load average {load0:.1f} at the start, {os.getloadavg()[0]:.1f} at the end); "
          f"predicted: python -m fcn_jax.perf, {gpu['hardware'] if gpu else 'h100'}, mesh 1,1,1,1, float32.")
    print(format_table(["step", "CPU wall", "CPU use", "peak RSS", "predicted GPU time/memory", "note"], rows,
                       ["l", "r", "r", "r", "r", "l"]))
    if ok(fcn):
        print(f"{n}-step forecast finite at the last lead: {finite_last_lead(d / 'fc7d.nc')}")
    if gpu:
        print(f"GPU ensemble: perf's 100-member time is one batch-100 pass ({fmt_s(g['time_s']['total'] * 100)} "
              f"per step, linear in members); its forward memory at batch 100 is "
              f"{gpu_forward_memory(BIG_MEMBERS, gpu['spectral_layout']) / GB:.0f} GB, so on one "
              f"{gpu['hardware']} members run in chunks of <= {gpu_max_chunk(gpu['spectral_layout'])}")
    if cpu and step:
        pc = cpu["forward"]["time_s"]["total"]
        print(f"perf model for this CPU ({cpu['hardware']}): forward {fmt_s(pc)}; measured / predicted = "
              f"{step / pc:.2f}")
    if not args.keep:
        remove(d, big)
    return 0 if all(ok(r) for r in (conv, fc1, fcn, ens)) and gpu and cpu else 1


if __name__ == "__main__":
    sys.exit(main())
