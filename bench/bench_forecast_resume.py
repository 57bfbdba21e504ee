"""A killed ensemble, continued: the rerun's time against a clean run's, in the same session.

    JAX_PLATFORMS=cpu python bench/bench_forecast_resume.py [--members 64] [--steps 40] [--kill-at 0.6]

On the embedded world's grid and channels (32 x 64, 16 channels) with the
``world`` experiment's model (random weights unless ``--model DIR`` names a
trained package): one clean ``python -m fcn_jax.forecast ... --members M`` run;
then the same command SIGKILLed once ``--kill-at`` of its chunks are committed
and started again. Prints the times, the rerun's share of the clean run (the
target is at most 0.75 at a 60 % kill), whether the two files are equal, and
whether anything was left behind. Each command is a fresh process, so start-up
and compilation count in every time, as they do for a user.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--members", type=int, default=64)
    ap.add_argument("--member-chunk", type=int, default=8)
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--ics", type=int, default=2)
    ap.add_argument("--kill-at", type=float, default=0.6, help="fraction of chunks committed at the kill")
    ap.add_argument("--model", default=None, help="a model package on the world's grid (default: random weights)")
    ap.add_argument("--workdir", default=None)
    args = ap.parse_args()

    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    import numpy as np

    from fcn_jax.checkpoints import package as model_ckpt
    from fcn_jax.config import load_experiment
    from fcn_jax.data.catalog import resolve_store
    from fcn_jax.data.store import StoreInfo
    from fcn_jax.inference.files import partial_outputs, read_forecast
    from fcn_jax.model.afnonet import build_model

    work = Path(args.workdir or tempfile.mkdtemp(prefix="fcn_resume_"))
    cfg = load_experiment("world")
    store = resolve_store("world", world_seed=cfg.data.world_seed)
    model = args.model
    if model is None:
        model = work / "model"
        if not model.exists():
            package, clim = model_ckpt.package_from_store(store, cfg.data.channels)
            model_ckpt.save_model(model, build_model(cfg.model, seed=0), package=package, climatology=clim)
    times = StoreInfo.read(store).times
    init = ",".join(str(t) for t in times[-(args.steps + 8 * args.ics + 1):: 8][: args.ics])  # leads inside the data
    cmd = [sys.executable, "-m", "fcn_jax.forecast", str(model), "--store", str(store), "--init", init,
           "--steps", str(args.steps), "--members", str(args.members), "--member-chunk", str(args.member_chunk)]
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    n_chunks = args.ics * -(-args.members // args.member_chunk)

    def run(out, kill_at=None):
        t0 = time.perf_counter()
        proc = subprocess.Popen([*cmd, "--out", str(out)], env=env, cwd=REPO, stdout=subprocess.DEVNULL,
                                stderr=subprocess.PIPE, text=True)
        if kill_at is not None:
            while proc.poll() is None:
                journals = [p / "journal.json" for p in partial_outputs(out)]
                try:
                    done = len(json.loads(journals[0].read_text())["done"]) if journals else 0
                except (OSError, ValueError):
                    done = 0
                if done >= kill_at:
                    proc.send_signal(signal.SIGKILL)
                    break
                time.sleep(0.05)
        _, err = proc.communicate()
        if kill_at is None and proc.returncode:
            raise SystemExit(err[-3000:])
        return time.perf_counter() - t0

    clean_out, out = work / "clean.zarr", work / "ens.zarr"
    for p in (clean_out, out):
        subprocess.run(["rm", "-rf", str(p)], check=True)
    t_clean = run(clean_out)
    kill_at = int(round(args.kill_at * n_chunks))
    t_killed = run(out, kill_at=kill_at)
    t_rerun = run(out)
    a, b = read_forecast(clean_out), read_forecast(out)
    equal = all(np.array_equal(a[v].values, b[v].values, equal_nan=True) for v in a.data_vars)
    left = [str(p) for p in partial_outputs(out)] + [str(p) for p in work.glob(".*.tmp")]
    print(f"{args.ics} ICs x {args.members} members x {args.steps} steps, {n_chunks} chunks of {args.member_chunk}; "
          f"world grid, {len(cfg.data.channels)} channels, on {os.cpu_count()} CPU cores")
    print(f"| run | seconds |\n|---|---:|\n| clean | {t_clean:.1f} |\n| killed at {kill_at}/{n_chunks} chunks | "
          f"{t_killed:.1f} |\n| rerun (same command) | {t_rerun:.1f} |")
    print(f"rerun / clean = {t_rerun / t_clean:.2f} (target <= 0.75); files equal: {equal}; left behind: {left or 'nothing'}")


if __name__ == "__main__":
    main()
