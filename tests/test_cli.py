"""The one command-line layer (fcn_jax.cli): every command parses, starts and exits alike."""

import argparse
import importlib

import pytest

from fcn_jax import cli, errors

COMMANDS = ["train", "forecast", "evaluate", "convert", "track", "check", "prepare", "world", "checkpoint", "perf",
            "demo"]


@pytest.mark.parametrize("name", COMMANDS)
def test_every_command_parses_through_cli(name, capsys):
    """Each command's --help is cli's parser (its prog) and, where it takes them, the shared flags."""
    mod = importlib.import_module(f"fcn_jax.{name}")
    with pytest.raises(SystemExit) as e:
        mod.main(["--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith(f"usage: python -m fcn_jax.{name}")
    if name in ("train", "check", "perf", "convert", "forecast", "evaluate", "track"):
        assert "--set SECTION.KEY=VALUE" in out and "--experiment NAME" in out
    if name in ("train", "forecast", "check", "perf"):
        assert "--mesh D,C,H,W" in out
    if name in ("train", "forecast", "demo", "check"):
        assert "--cpu-devices" in out


def test_experiment_positional_or_option():
    ap = cli.parser("x", "doc")
    cli.add_experiment(ap)
    assert cli.experiment_name(ap.parse_args(["world"])) == "world"
    assert cli.experiment_name(ap.parse_args(["--experiment", "world"])) == "world"
    assert cli.experiment_name(ap.parse_args(["world", "--experiment", "world"])) == "world"
    with pytest.raises(SystemExit):
        cli.experiment_name(ap.parse_args(["world", "--experiment", "precip"]))
    with pytest.raises(SystemExit):  # required without a default
        cli.load_experiment(ap.parse_args([]))
    ap2 = cli.parser("y", "doc")
    cli.add_experiment(ap2, default="world")
    cfg = cli.load_experiment(ap2.parse_args(["--set", "train.lr=1e-3"]))
    assert cfg.name == "world" and cfg.train.lr == 1e-3


def test_mesh_and_store_flags_become_overrides_after_set():
    ap = cli.parser("x", "doc")
    cli.add_experiment(ap)
    cli.add_mesh(ap)
    cli.add_store(ap, help="h")
    args = cli.parse(ap, ["world", "--set", "mesh.height=4", "--mesh", "-1,1,2,2", "--store", "/some/store"])
    assert args.mesh == (-1, 1, 2, 2)
    cfg = cli.load_experiment(args, mesh=True, store=True)
    assert cfg.mesh.shape == (-1, 1, 2, 2) and cfg.data.store == "/some/store"  # the flag wins over --set
    assert cli.load_experiment(args).mesh.height == 4  # without mesh=True only --set applies


@pytest.mark.parametrize("text", ["-1,1,2,2", "2,1,2,2"])
def test_negative_mesh_sizes_pass_argparse(text):
    ap = cli.parser("x", "doc")
    cli.add_mesh(ap, repeatable=True)
    assert cli.parse(ap, ["--mesh", text, "--mesh=1,1,1,-1"]).mesh == [
        tuple(int(v) for v in text.split(",")), (1, 1, 1, -1)]


@pytest.mark.parametrize("bad", ["2,2", "a,1,1,1", "0,1,1,1", "-1,-1,1,1", "-2,1,1,1"])
def test_bad_mesh_is_a_usage_error(bad):
    with pytest.raises(argparse.ArgumentTypeError, match="--mesh"):
        cli.parse_mesh(bad)


def test_world_store_takes_the_experiments_seed(monkeypatch):
    from fcn_jax.config import load_experiment

    seen = {}

    def fake_resolve(store, *, world_seed, world_days, check, progress):
        seen.update(store=store, seed=world_seed, days=world_days)
        return store

    monkeypatch.setattr("fcn_jax.data.catalog.resolve_store", fake_resolve)
    cli.resolve_store("world", load_experiment("world", ["data.world_seed=7", "data.world_days=400"]))
    assert seen == {"store": "world", "seed": 7, "days": 400}
    cli.resolve_store("world", None)
    assert seen["seed"] == 0 and seen["days"] is None
    assert cli.resolve_store(None, None) is None


def _raises(exc):
    def body():
        raise exc
    return body


@pytest.mark.parametrize("exc, code", [
    ("config", errors.EXIT_INPUT), ("data", errors.EXIT_INPUT), ("mesh", errors.EXIT_INPUT),
    ("forecast", errors.EXIT_INPUT), ("locked", errors.EXIT_INPUT), ("nonfinite", errors.EXIT_NON_FINITE),
    ("space", errors.EXIT_NO_SPACE), ("damaged", errors.EXIT_DAMAGED), ("integrity", errors.EXIT_DAMAGED),
    ("missing", errors.EXIT_INPUT), ("interrupt", errors.EXIT_INTERRUPTED)])
def test_exit_codes_come_from_the_exception_type(exc, code, capsys, tmp_path):
    from fcn_jax.checkpoints.integrity import IntegrityError
    from fcn_jax.checkpoints.train_state import CheckpointDamagedError, CheckpointSpaceError
    from fcn_jax.config import ConfigError
    from fcn_jax.data.errors import DataError
    from fcn_jax.inference.files import ForecastError
    from fcn_jax.parallel.mesh import MeshError
    from fcn_jax.training.loop import NonFiniteLossError
    from fcn_jax.training.runlock import RunLockedError

    made = {"config": ConfigError("bad key x.y"), "data": DataError("file f: no variable z"),
            "mesh": MeshError("height 3"), "forecast": ForecastError("--steps 0"),
            "locked": RunLockedError("run r"), "nonfinite": NonFiniteLossError("nan"),
            "space": CheckpointSpaceError("disk", step=1, needed=2, free=1, directory=tmp_path), "damaged": CheckpointDamagedError("step 3"),
            "integrity": IntegrityError(tmp_path, ["crc"]), "missing": FileNotFoundError("no file f"),
            "interrupt": KeyboardInterrupt()}[exc]
    assert cli.run(_raises(made)) == code
    err = capsys.readouterr().err
    assert err.startswith("interrupted" if exc == "interrupt" else "error: ")


def test_a_bug_keeps_its_traceback():
    with pytest.raises(ZeroDivisionError):
        cli.run(lambda: 1 / 0)
    assert cli.run(lambda: None) == 0 and cli.run(lambda: 1) == 1


def test_commands_report_bad_input_with_exit_2(tmp_path, capsys):
    from fcn_jax import check, evaluate, perf, track, train

    assert train.main(["no_such_experiment", "--workdir", str(tmp_path / "r")]) == 2
    assert perf.main(["no_such_experiment"]) == 2
    assert check.main(["no_such_experiment", "--mesh", "1,1,1,1"]) == 2
    assert evaluate.main([str(tmp_path / "none.nc"), "--truth", str(tmp_path / "t.zarr"),
                          "--out", str(tmp_path / "o")]) == 2
    assert track.main([str(tmp_path / "none.nc"), "--start", "45,300"]) == 2
    err = capsys.readouterr().err
    assert err.count("error: ") == 5 and "Traceback" not in err
