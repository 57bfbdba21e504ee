"""``make demo``: the whole chain on the embedded world, on a CPU, in minutes.

1. generate the world (Held-Suarez atmosphere, 32 x 64, 16 channels) and
   prepare its store -- both cached, so a second run starts at step 2;
2. pre-train the ``world`` experiment (1-step loss);
3. fine-tune on the 2-step loss (``world_finetune``);
4. forecast held-out initial conditions (the test year) out to 5 days with
   :mod:`fcn_jax.forecast`, and score them with :mod:`fcn_jax.evaluate`
   against persistence and climatology: a table of RMSE and ACC, plots;
5. an 8-member IC-perturbation ensemble from a few held-out initial
   conditions, scored with the fair CRPS and the spread-skill ratio, and the
   track of a mid-latitude low (surface-pressure minimum) through every
   member with :mod:`fcn_jax.track`, against the truth's track.

The stages write the same files the command-line tools do, under
``--workdir`` (default ``runs/demo``): ``forecasts/*.nc``, ``scores/``,
``scores_ensemble/``, ``track/``. Re-running resumes finished training stages
instantly.
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

from fcn_jax import cli

#: Channels of the embedded world in the demo's deterministic score table, in order.
WORLD_TABLE_CHANNELS = ("z500", "t850", "u850", "t2m", "sp", "u250")


def main(argv=None) -> int:
    ap = cli.parser("demo", __doc__)
    ap.add_argument("--workdir", default="runs/demo")
    ap.add_argument("--pretrain-steps", type=int, default=None, help="override world train.steps")
    ap.add_argument("--finetune-steps", type=int, default=None, help="override world_finetune train.steps")
    ap.add_argument("--members", type=int, default=8, help="ensemble size of stage 5")
    ap.add_argument("--ensemble-ics", type=int, default=4, help="initial conditions of the ensemble")
    ap.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE",
                    help="extra --set for both training stages (data.world_seed=N: another world)")
    cli.add_runtime(ap, multihost=False)
    args = cli.parse(ap, argv)
    return cli.run(lambda: _demo(args))


def _demo(args) -> None:
    os.environ.setdefault("JAX_PLATFORMS", "cpu")  # a laptop's demo: the CPU, unless the user chose
    cli.start(args)
    import jax

    from fcn_jax import evaluate, track
    from fcn_jax.config import load_experiment
    from fcn_jax.data.store import open_store
    from fcn_jax.forecast import run_forecast
    from fcn_jax.training.loop import train

    t_start = time.perf_counter()
    workdir = Path(args.workdir).resolve()
    workdir.mkdir(parents=True, exist_ok=True)

    print("== 1/5 the embedded world (generated once, then cached)")
    t0 = time.perf_counter()
    store = cli.resolve_store("world", load_experiment("world", args.overrides))
    print(f"   store {store}  ({time.perf_counter() - t0:.1f} s)")

    common = [f"data.store={store}", *args.overrides]
    print("== 2/5 pre-training (1-step relative L2)")
    pre = [*common] + ([f"train.steps={args.pretrain_steps}"] if args.pretrain_steps else [])
    cfg = load_experiment("world", pre)
    t0 = time.perf_counter()
    s = train(cfg, workdir / "world", progress=True)
    print(f"   {s}  ({time.perf_counter() - t0:.1f} s)")

    print("== 3/5 fine-tuning (2-step rollout loss)")
    ft = [*common, f"train.init_from={workdir / 'world'}"]
    ft += [f"train.steps={args.finetune_steps}"] if args.finetune_steps else []
    cfg_ft = load_experiment("world_finetune", ft)
    t0 = time.perf_counter()
    s = train(cfg_ft, workdir / "world_finetune", progress=True)
    print(f"   {s}  ({time.perf_counter() - t0:.1f} s)")

    print("== 4/5 forecasts of the held-out year (python -m fcn_jax.forecast / fcn_jax.evaluate)")
    t0 = time.perf_counter()
    ds = open_store(store)
    ev = cfg.evaluation
    y0, y1 = cfg.data.test_years
    times = ds["time"].sel(time=slice(f"{y0}-01-01", f"{y1}-12-31T23")).values
    steps = ev.prediction_length - 1
    starts = evaluate.initial_condition_starts(len(times), ev.prediction_length, ev.ic_stride, ev.num_ics)
    model_dir = workdir / "world_finetune" / "model_best"
    det = run_forecast(model_dir, store=store, init_times=times[starts], steps=steps,
                       out=workdir / "forecasts" / "deterministic.nc", batch_size=16)
    scores = evaluate.evaluate_forecast(det, store, workdir / "scores", convention="fcn")
    print(f"   {len(starts)} initial conditions from {y0}, leads 0..{steps * 6} h "
          f"({time.perf_counter() - t0:.1f} s)\n")
    print(evaluate.format_table(scores, channels=WORLD_TABLE_CHANNELS, leads_h=(6, 24, 48, 72, 120)))
    print()
    print(_beats_persistence(scores, WORLD_TABLE_CHANNELS, (24, 48, 72)))

    print(f"\n== 5/5 {args.members}-member ensemble (IC perturbation, std {ev.perturbation_std}) and a cyclone track")
    t0 = time.perf_counter()
    ens_starts = starts[:: max(1, len(starts) // args.ensemble_ics)][: args.ensemble_ics]
    ens = run_forecast(model_dir, store=store, init_times=times[ens_starts], steps=steps,
                       out=workdir / "forecasts" / "ensemble.nc", members=args.members,
                       perturbation_std=ev.perturbation_std, seed=0, member_chunk=args.members)
    escores = evaluate.evaluate_forecast(ens, store, workdir / "scores_ensemble", convention="fcn")
    print(f"   {len(ens_starts)} initial conditions x {args.members} members "
          f"({time.perf_counter() - t0:.1f} s)\n")
    print(evaluate.format_table(escores, channels=("z500", "t850", "sp"), leads_h=(24, 72, 120)))

    sp0 = ds["fields"].sel(channel="sp", time=times[ens_starts[0]]).values  # [lat, lon]
    lat, lon = ds["lat"].values, ds["lon"].values
    start = track.find_low(sp0, lat, lon, lat_band=(30.0, 70.0))
    tracks = track.track_forecast(ens, start, radius_km=800.0, truth=store)
    paths = track.write_tracks(tracks, workdir / "track", background=sp0, lat=lat, lon=lon)
    print(f"\n   track of the deepest mid-latitude low at {str(times[ens_starts[0]])[:13]} "
          f"({start[0]:.1f} N, {start[1]:.1f} E), search radius 800 km:")
    print("   " + track.format_track_errors(tracks).replace("\n", "\n   "))
    print(f"   map: {paths[-1]}")
    print(f"\nplots and scores in {workdir / 'scores'}, {workdir / 'scores_ensemble'}, {workdir / 'track'}; "
          f"total {time.perf_counter() - t_start:.0f} s on {jax.device_count()} {jax.devices()[0].platform} device(s)")


def _beats_persistence(scores, channels, leads_h) -> str:
    """One line per lead: does the model beat persistence (lower RMSE) on every main channel?"""
    import numpy as np

    hours = list(scores["lead_time"].values / np.timedelta64(1, "h"))
    lines = []
    for h in leads_h:
        j = hours.index(float(h))
        rm = scores["rmse"].sel(system="model").isel(lead_time=j)
        rp = scores["rmse"].sel(system="persistence").isel(lead_time=j)
        wins = [c for c in channels if float(rm.sel(channel=c)) < float(rp.sel(channel=c))]
        lines.append(f"lead {h:3d} h: model RMSE below persistence on {len(wins)}/{len(channels)} main channels"
                     + ("" if len(wins) == len(channels) else f" (not: {sorted(set(channels) - set(wins))})"))
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
