"""``python -m fcn_jax.perf [EXPERIMENT]``: predicted FLOPs, memory, communication and time of an experiment."""

from __future__ import annotations

import json
import sys

from fcn_jax import cli

GB = 1e9


def _fmt_s(t: float) -> str:
    if t >= 86400:
        return f"{t / 86400:.2f} d"
    if t >= 3600:
        return f"{t / 3600:.2f} h"
    if t >= 1:
        return f"{t:.2f} s"
    return f"{t * 1e3:.2f} ms"


def _print_text(res: dict, head: str):
    m = res["memory_per_device_bytes"]
    t = res["step_time_s"]
    print(head)
    print(f"train step: {res['flops_per_step'] / 1e12:.3f} TFLOP on all devices "
          f"({res['flops_per_device'] / 1e12:.3f} per device; model {res['model_flops_per_step'] / 1e12:.3f})")
    print("  per device by class: " + ", ".join(f"{k} {v / 1e12:.3f} TFLOP"
                                                for k, v in res["flops_by_class_per_device"].items()))
    print(f"  memory traffic per device {res['memory_traffic_bytes_per_device'] / GB:.2f} GB")
    print(f"memory per device: params {m['params'] / GB:.3f} GB, Adam {m['optimizer'] / GB:.3f}, "
          f"gradients {m['gradients'] / GB:.3f}, activations {m['activations'] / GB:.2f} "
          f"(no remat {m['activations_no_remat'] / GB:.2f}, remat {m['activations_remat'] / GB:.2f}), "
          f"inputs {m['inputs'] / GB:.3f}; total {m['total'] / GB:.2f} GB ({'fits' if m['fits'] else 'DOES NOT FIT'})")
    cb = res["collective_bytes_per_device"]
    print("collectives per device: " + (", ".join(f"{k} {v / 1e6:.1f} MB" for k, v in cb.items()) or "none")
          + f" ({res['collectives_per_step']} per step)")
    print(f"step time: compute {_fmt_s(t['compute'])}, memory {_fmt_s(t['memory'])}, "
          f"communication {_fmt_s(t['communication'])}, total {_fmt_s(t['total'])}; MFU {100 * res['mfu']:.1f} %")
    f = res["forward"]
    print(f"forward (batch {f['batch']}): {_fmt_s(f['time_s']['total'])}, MFU {100 * f['mfu']:.1f} %, "
          f"{f['memory_per_device_bytes'] / GB:.2f} GB/device")
    tts = res["time_to_solution_s"]
    print(f"time to solution: training {tts['training_steps']:,} steps {_fmt_s(tts['training'])}; "
          f"7-day forecast {_fmt_s(tts['forecast_7day'])}; 100-member 24 h ensemble {_fmt_s(tts['ensemble_100x24h'])}")


def main(argv=None) -> int:
    from fcn_jax.perfmodel.hardware import HARDWARE
    from fcn_jax.perfmodel.layouts import LAYOUTS

    ap = cli.parser("perf", "Predicted FLOPs, memory, communication and time of an experiment's train step, "
                            "forward pass and time to solution (speed of light, no overlap).")
    cli.add_experiment(ap, default="afno_backbone")
    cli.add_mesh(ap, help="mesh sizes; default: the experiment's; -1 (data only) = one sample per data shard")
    ap.add_argument("--hardware", default="a100-80gb", choices=sorted(HARDWARE) + ["cpu"])
    ap.add_argument("--layout", choices=["auto", *sorted(LAYOUTS)],
                    help="spectral layout; default: the experiment's mesh.spectral_layout (auto = channel-block "
                         "when it applies, else pencil)")
    ap.add_argument("--json", action="store_true", help="print one JSON object")
    ap.add_argument("--seed-table", action="store_true", help="the seed talk's memory table and its extension")
    ap.add_argument("--plot", metavar="PNG", help="write the time-to-solution figure")
    ap.add_argument("--calibrate", action="store_true", help="measure this CPU's peaks and cache them")
    args = cli.parse(ap, argv)
    return cli.run(lambda: _perf(args))


def _perf(args) -> None:
    if args.calibrate:
        from fcn_jax.perfmodel.hardware import calibrate_cpu

        print(json.dumps(calibrate_cpu(), indent=2))
        return
    if args.seed_table or args.plot:
        from fcn_jax.perfmodel import report

        if args.seed_table:
            hw = args.hardware if args.hardware != "cpu" else "a100-80gb"
            print(f"Seed talk's memory table, one device, batch 1, float32 (GB = 1e9 B); model on {hw}:")
            print(report.format_seed_table(report.seed_rows(hw)))
            print()
            print(f"One sample split over all the devices (data = 1), cheapest mesh that fits, {hw}:")
            print(report.format_extension_table(report.extension_rows(hw_name=hw, max_data=1)))
            print()
            print(f"Fastest use of the devices (any data axis), cheapest mesh that fits, {hw}:")
            print(report.format_extension_table(report.extension_rows(hw_name=hw)))
            print()
            print(f"Time to solution, {hw}:")
            print(report.format_tts_table(report.tts_rows(hw_name=hw)))
        if args.plot:
            report.plot_time_to_solution(args.plot)
            print(f"wrote {args.plot}")
        return

    from fcn_jax.parallel.mesh import MeshError, MeshSizes
    from fcn_jax.perfmodel.hardware import get_hardware
    from fcn_jax.perfmodel.predict import predict

    exp = cli.load_experiment(args)
    batch = exp.train.batch_size
    shape = args.mesh or exp.mesh.shape
    if -1 in shape:
        if shape.index(-1) == 0:
            shape = (batch,) + tuple(shape[1:])
        else:
            raise MeshError(f"--mesh {shape}: only data may be -1 here (it becomes the global batch {batch})")
    hw = get_hardware(args.hardware)
    counts = 2 if exp.train.schedule == "cosine" or exp.train.warmup_steps else 1
    res = predict(exp.model, MeshSizes(*shape), batch, hw, args.layout or exp.mesh.spectral_layout,
                  rollout=exp.train.rollout_steps, train_steps=exp.train.steps, optimizer_counts=counts)
    res["experiment"] = exp.name
    res["mesh"] = list(shape)
    res["global_batch"] = batch
    res["hardware"] = hw.name
    res["layout"] = res["spectral_layout"]
    if args.json:
        print(json.dumps(res, indent=2, default=float))
        return
    _print_text(res, f"{exp.name}: mesh (data, channel, height, width) = {tuple(shape)}, global batch {batch}, "
                     f"{exp.model.compute_dtype}{', remat' if exp.model.remat else ''}, {hw.name}, {res['layout']} layout")


if __name__ == "__main__":
    sys.exit(main())
