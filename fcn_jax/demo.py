"""``make demo``: the whole chain on the embedded world, on a CPU, in minutes.

1. generate the world (Held-Suarez atmosphere, 32 x 64, 16 channels) and
   prepare its store -- both cached, so a second run starts at step 2;
2. pre-train the ``world`` experiment (1-step loss);
3. fine-tune on the 2-step loss (``world_finetune``);
4. forecast held-out initial conditions (the test year) out to 5 days and
   score them against persistence and climatology: a table of RMSE and ACC,
   plots of score against lead time and of a forecast beside the truth.

Everything goes under ``--workdir`` (default ``runs/demo``). Re-running resumes
finished stages instantly.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

MAIN_CHANNELS = ("z500", "t850", "u850", "t2m", "sp", "u250")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m fcn_jax.demo", description=__doc__.split("\n\n")[0])
    ap.add_argument("--workdir", default="runs/demo")
    ap.add_argument("--pretrain-steps", type=int, default=None, help="override world train.steps")
    ap.add_argument("--finetune-steps", type=int, default=None, help="override world_finetune train.steps")
    ap.add_argument("--set", dest="overrides", action="append", default=[],
                    help="extra --set for both training stages")
    args = ap.parse_args(argv)
    os.environ.setdefault("JAX_PLATFORMS", "cpu")

    import jax
    import numpy as np

    from fcn_jax import checkpoint as model_ckpt
    from fcn_jax import evaluate
    from fcn_jax.config import load_experiment
    from fcn_jax.data.store import open_store, store_stats
    from fcn_jax.data.world import world_store
    from fcn_jax.training.loop import train

    t_start = time.perf_counter()
    workdir = Path(args.workdir).resolve()
    workdir.mkdir(parents=True, exist_ok=True)

    print("== 1/4 the embedded world (generated once, then cached)")
    t0 = time.perf_counter()
    store = world_store(progress=True)
    print(f"   store {store}  ({time.perf_counter() - t0:.1f} s)")

    common = [f"data.store={store}", *args.overrides]
    print("== 2/4 pre-training (1-step relative L2)")
    pre = [*common] + ([f"train.steps={args.pretrain_steps}"] if args.pretrain_steps else [])
    cfg = load_experiment("world", pre)
    t0 = time.perf_counter()
    s = train(cfg, workdir / "world", progress=True)
    print(f"   {s}  ({time.perf_counter() - t0:.1f} s)")

    print("== 3/4 fine-tuning (2-step rollout loss)")
    ft = [*common, f"train.init_from={workdir / 'world'}"]
    ft += [f"train.steps={args.finetune_steps}"] if args.finetune_steps else []
    cfg_ft = load_experiment("world_finetune", ft)
    t0 = time.perf_counter()
    s = train(cfg_ft, workdir / "world_finetune", progress=True)
    print(f"   {s}  ({time.perf_counter() - t0:.1f} s)")

    print("== 4/4 forecasts of the held-out year, scored against persistence and climatology")
    t0 = time.perf_counter()
    model = model_ckpt.load_model(workdir / "world_finetune" / "model_best")
    ds = open_store(store)
    channels = list(cfg.data.channels)
    y0, y1 = cfg.data.test_years
    test = ds["fields"].sel(channel=channels).sel(time=slice(f"{y0}-01-01", f"{y1}-12-31T23"))
    series = np.asarray(test.transpose("time", "lat", "lon", "channel").values, np.float32)  # [time, lat, lon, ch]
    mean, std = store_stats(store, channels)
    series_n = (series - mean) / std
    steps = cfg.evaluation.prediction_length
    starts = evaluate.initial_condition_starts(len(series_n), steps, cfg.evaluation.ic_stride, cfg.evaluation.num_ics)
    truth = evaluate.truth_trajectories(series_n, starts, steps)  # [n_ic, steps, lat, lon, ch]
    forecast = evaluate.forecast_trajectories(model, truth[:, 0], steps - 1, batch_size=16)
    clim = np.asarray(ds["time_mean"].sel(channel=channels).transpose("lat", "lon", "channel").values, np.float32)
    lat, lon = np.asarray(ds["lat"].values), np.asarray(ds["lon"].values)
    scores = evaluate.score_forecasts(truth, np.asarray(forecast), mean, std, clim, lat, channels=channels,
                                      weights=cfg.evaluation.lat_weights)
    out = workdir / "scores"
    out.mkdir(exist_ok=True)
    evaluate.write_scores(scores, out / "scores")
    evaluate.plot_scores(scores, out / "scores_vs_lead.png", channels=MAIN_CHANNELS)
    ic, lead = 0, min(12, steps - 1)  # 3 days
    evaluate.plot_forecast_vs_truth(np.asarray(forecast)[ic] * std + mean, truth[ic] * std + mean,
                                    lat, lon, "z500", lead, out / "z500_forecast_vs_truth.png", channels=channels)
    print(f"   {len(starts)} initial conditions from {y0}, leads 0..{(steps - 1) * 6} h "
          f"({time.perf_counter() - t0:.1f} s)\n")
    print(evaluate.format_table(scores, channels=MAIN_CHANNELS, leads_h=(6, 24, 48, 72, 120)))
    verdict = _beats_persistence(scores, MAIN_CHANNELS, (24, 48, 72))
    print()
    print(verdict)
    print(f"\nplots and scores in {out}; total {time.perf_counter() - t_start:.0f} s "
          f"on {jax.device_count()} {jax.devices()[0].platform} device(s)")
    return 0


def _beats_persistence(scores, channels, leads_h) -> str:
    """One line per lead: does the model beat persistence (lower RMSE) on every main channel?"""
    lines = []
    for h in leads_h:
        # dict form: xarray takes a `method=` keyword as its interpolation option
        rm = scores["rmse"].sel({"method": "model", "lead_time_h": h})
        rp = scores["rmse"].sel({"method": "persistence", "lead_time_h": h})
        wins = [c for c in channels if float(rm.sel(channel=c)) < float(rp.sel(channel=c))]
        lines.append(f"lead {h:3d} h: model RMSE below persistence on {len(wins)}/{len(channels)} main channels"
                     + ("" if len(wins) == len(channels) else f" (not: {sorted(set(channels) - set(wins))})"))
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
