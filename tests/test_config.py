"""Experiment configuration: shipped experiments, inheritance, overrides and error messages."""

import dataclasses
import re
import textwrap

import pytest

from fcn_jax.config import (
    EXPERIMENTS_DIR,
    FCN_CHANNELS,
    ConfigError,
    ExperimentConfig,
    ModelConfig,
    dump_experiment,
    load_experiment,
    parse_override,
)

SHIPPED = sorted(p.stem for p in EXPERIMENTS_DIR.glob("*.yaml"))
ORIGINAL_CHANNELS = (
    "u10", "v10", "t2m", "sp", "msl", "t850", "u1000", "v1000", "z1000", "u850",
    "v850", "z850", "u500", "v500", "z500", "t500", "z50", "r500", "r850", "tcwv",
)  # fmt: skip  (model spec §11.2, written out here rather than imported)


def write(path, text):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(textwrap.dedent(text))
    return path


def small_yaml(tmp_path, name="small.yaml", extra=""):
    """A complete small experiment (no base) plus ``extra`` YAML appended."""
    path = tmp_path / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(textwrap.dedent(
        """\
        model:
          img_size: [16, 32]
          patch_size: [4, 4]
          in_channels: 3
          out_channels: 3
          embed_dim: 32
          depth: 2
          num_blocks: 4
        data:
          store: world
          channels: [u10, v10, t2m]
        train:
          steps: 10
          batch_size: 2
        """
    ) + extra)
    return path


def file_and(path, *parts):
    """Regex: the file path, then each part, in that order."""
    return re.escape(str(path)) + "".join(".*" + re.escape(p) for p in parts)


# --------------------------------------------------------------------------- #
# Shipped experiments
# --------------------------------------------------------------------------- #


def test_the_original_experiments_are_shipped():
    assert {"afno_backbone", "afno_backbone_finetune", "precip", "perturbations"} <= set(SHIPPED)


@pytest.mark.parametrize("name", SHIPPED)
def test_every_shipped_experiment_loads_and_round_trips(name, tmp_path):
    cfg = load_experiment(name)
    assert isinstance(cfg, ExperimentConfig)
    assert cfg.name == name
    assert len(cfg.data.channels) == cfg.model.in_channels
    # dump -> reload gives an equal config
    out = tmp_path / f"{name}_dump.yaml"
    out.write_text(dump_experiment(cfg))
    assert load_experiment(out) == cfg


def test_afno_backbone_has_the_original_values():
    cfg = load_experiment("afno_backbone")
    m = cfg.model
    assert m == ModelConfig(img_size=(720, 1440), patch_size=(8, 8), in_channels=20, out_channels=20, embed_dim=768,
                            depth=12, mlp_ratio=4.0, num_blocks=8, sparsity_threshold=0.01,
                            hard_thresholding_fraction=1.0)
    assert m.kind == "backbone"
    assert m.token_grid == (90, 180)
    assert cfg.data.channels == ORIGINAL_CHANNELS == FCN_CHANNELS
    assert cfg.train.mode == "pretrain"
    assert cfg.train.lr == 5e-4
    assert cfg.train.batch_size == 64
    assert cfg.train.rollout_steps == 1
    assert cfg.train.optimizer == "adam"
    assert cfg.train.schedule == "cosine"
    assert cfg.data.train_years == (1979, 2015)
    assert cfg.evaluation.lat_weights == "fcn"


def test_finetune_inherits_from_the_backbone():
    base = load_experiment("afno_backbone")
    ft = load_experiment("afno_backbone_finetune")
    assert "base: afno_backbone" in (EXPERIMENTS_DIR / "afno_backbone_finetune.yaml").read_text()
    assert ft.train.mode == "finetune"
    assert ft.train.lr == 1e-4
    assert ft.train.rollout_steps == 2
    # everything not overridden comes from the base
    assert ft.model == base.model
    assert ft.data == base.data
    assert ft.mesh == base.mesh
    assert ft.train.batch_size == 64
    assert ft.train.optimizer == base.train.optimizer
    assert ft.train.steps_per_epoch == base.train.steps_per_epoch


def test_precip_experiment():
    cfg = load_experiment("precip")
    assert cfg.model.kind == "precip"
    assert cfg.model.out_channels == 1
    assert cfg.model.in_channels == 20
    assert cfg.train.mode == "precip"
    assert cfg.train.lr == 2.5e-4
    assert cfg.model.token_grid == (90, 180)
    assert cfg.data.channels == ORIGINAL_CHANNELS


def test_perturbations_experiment():
    cfg = load_experiment("perturbations")
    assert cfg.evaluation.ensemble_members == 100
    assert cfg.evaluation.perturbation_std == 0.3
    assert cfg.model.token_grid == (90, 180)


def test_world_experiment_is_small():
    assert "world" in SHIPPED
    cfg = load_experiment("world")
    m = cfg.model
    assert m.img_size[0] * m.img_size[1] * m.embed_dim * m.depth < 720 * 1440 * 768 * 12 / 100


# --------------------------------------------------------------------------- #
# base: inheritance
# --------------------------------------------------------------------------- #


def test_base_relative_path_and_chained_bases(tmp_path):
    small_yaml(tmp_path / "configs", "root.yaml", extra="name: root\n")
    write(
        tmp_path / "configs" / "sub" / "mid.yaml",
        """\
        base: ../root.yaml
        name: mid
        model:
          depth: 3
        train:
          lr: 1e-3
        """,
    )
    leaf = write(
        tmp_path / "configs" / "sub" / "leaf.yaml",
        """\
        base: mid            # without the .yaml suffix, relative to this file
        train:
          batch_size: 4
        evaluation:
          prediction_length: 5
        """,
    )
    cfg = load_experiment(leaf)
    assert cfg.name == "mid"  # inherited
    assert cfg.model.depth == 3  # from mid
    assert cfg.model.embed_dim == 32  # from root, merged key by key
    assert cfg.model.img_size == (16, 32)
    assert cfg.train.lr == 1e-3  # mid
    assert cfg.train.batch_size == 4  # leaf
    assert cfg.train.steps == 10  # root
    assert cfg.evaluation.prediction_length == 5
    assert cfg.data.channels == ("u10", "v10", "t2m")


def test_base_by_shipped_name(tmp_path):
    p = write(tmp_path / "x.yaml", "base: afno_backbone\ntrain:\n  lr: 3.0e-4\n")
    cfg = load_experiment(p)
    assert cfg.train.lr == 3e-4
    assert cfg.model == load_experiment("afno_backbone").model


def test_circular_base_is_an_error(tmp_path):
    a = write(tmp_path / "a.yaml", "base: b.yaml\n")
    write(tmp_path / "b.yaml", "base: a.yaml\n")
    with pytest.raises(ConfigError, match="circular") as e:
        load_experiment(a)
    assert str(a.resolve()) in str(e.value) and str((tmp_path / "b.yaml").resolve()) in str(e.value)
    selfref = write(tmp_path / "self.yaml", "base: self\n")
    with pytest.raises(ConfigError, match=file_and(selfref.resolve(), "circular")):
        load_experiment(selfref)


def test_missing_base_names_the_file(tmp_path):
    p = write(tmp_path / "orphan.yaml", "base: no_such_parent\n")
    with pytest.raises(ConfigError, match=file_and(p.resolve(), "no_such_parent", "not found", "afno_backbone")):
        load_experiment(p)


def test_error_in_a_base_file_names_that_file(tmp_path):
    parent = small_yaml(tmp_path, "parent.yaml", extra="  learning_rate: 1.0\n")  # under train:
    child = write(tmp_path / "child.yaml", "base: parent.yaml\n")
    with pytest.raises(ConfigError, match=file_and(parent.resolve(), "train.learning_rate", "allowed", "lr")):
        load_experiment(child)
    parent2 = small_yaml(tmp_path, "parent2.yaml", extra="  lr: [1]\n")
    child2 = write(tmp_path / "child2.yaml", "base: parent2.yaml\n")
    with pytest.raises(ConfigError, match=file_and(parent2.resolve(), "train.lr", "expected a number")):
        load_experiment(child2)


# --------------------------------------------------------------------------- #
# --set overrides
# --------------------------------------------------------------------------- #


def test_overrides_of_every_type():
    cfg = load_experiment(
        "afno_backbone",
        [
            "train.lr=1e-4",  # YAML 1.1 reads this as a string; still a float
            "train.batch_size=8",
            "model.img_size=[32, 64]",
            "model.patch_size=[4, 8]",
            "model.remat=true",
            "model.hard_thresholding_fraction=0.5",
            "data.store=/tmp/some store.zarr",
            "evaluation.initial_time=2018-01-01T00",
            "train.optimizer=adamw",
            "mesh.data=2",
            "name=tweaked",
        ],
    )
    assert cfg.train.lr == 1e-4 and isinstance(cfg.train.lr, float)
    assert cfg.train.batch_size == 8 and isinstance(cfg.train.batch_size, int)
    assert cfg.model.img_size == (32, 64) and cfg.model.patch_size == (4, 8)
    assert cfg.model.token_grid == (8, 8)
    assert cfg.model.remat is True
    assert cfg.model.hard_thresholding_fraction == 0.5
    assert cfg.data.store == "/tmp/some store.zarr"
    assert cfg.evaluation.initial_time == "2018-01-01T00"
    assert cfg.train.optimizer == "adamw"
    assert cfg.mesh.data == 2
    assert cfg.name == "tweaked"
    # untouched values stay
    assert cfg.model.embed_dim == 768 and cfg.data.channels == ORIGINAL_CHANNELS


def test_overrides_lists_and_later_wins():
    cfg = load_experiment(
        "afno_backbone_finetune",
        ["train.loss_weights=[1, 0.5]", "data.channels=[u10, v10]", "model.in_channels=2",
         "model.out_channels=2", "train.lr=2e-4", "train.lr=3e-4"],
    )
    assert cfg.train.loss_weights == (1.0, 0.5)
    assert all(isinstance(w, float) for w in cfg.train.loss_weights)
    assert cfg.data.channels == ("u10", "v10")
    assert cfg.train.lr == 3e-4


def test_override_round_trip(tmp_path):
    cfg = load_experiment("afno_backbone", ["train.lr=1e-4", "model.depth=3", "train.loss_weights=[2]"])
    p = tmp_path / "dump.yaml"
    p.write_text(dump_experiment(cfg))
    assert load_experiment(p) == cfg


def test_parse_override():
    assert parse_override("train.lr=1e-4")[:2] == ("train", "lr")
    assert parse_override("model.img_size=[4, 8]") == ("model", "img_size", [4, 8])
    assert parse_override("model.remat=false") == ("model", "remat", False)
    assert parse_override("data.store=a=b") == ("data", "store", "a=b")


@pytest.mark.parametrize("text", ["train.lr", "lr=1e-4", "train.adam.lr=1", "nosection.lr=1"])
def test_bad_override_syntax(text):
    with pytest.raises(ConfigError, match=re.escape(text) + ".*(section.key|section)"):
        load_experiment("afno_backbone", [text])


def test_override_unknown_key_lists_allowed():
    with pytest.raises(ConfigError, match=r"train\.learning_rate.*allowed keys of 'train'.*batch_size.*\blr\b"):
        load_experiment("afno_backbone", ["train.learning_rate=1"])


@pytest.mark.parametrize(
    "override,key,allowed",
    [
        ("model.depth=twelve", "model.depth", "an integer"),
        ("train.lr=fast", "train.lr", "a number"),
        ("model.remat=maybe", "model.remat", "true/false"),
        ("train.optimizer=sgd", "train.optimizer", "'adam', 'adamw'"),
        ("model.img_size=[4, 8, 2]", "model.img_size", "a list of 2 values"),
        ("train.lr=-1e-3", "train.lr", "> 0"),
    ],
)
def test_override_errors_name_file_key_and_allowed(override, key, allowed):
    path = EXPERIMENTS_DIR / "afno_backbone.yaml"
    with pytest.raises(ConfigError, match=file_and(path.resolve(), override, key, allowed)):
        load_experiment("afno_backbone", [override])


def test_unknown_experiment_lists_known():
    with pytest.raises(ConfigError, match=r"no_such_experiment.*not found.*afno_backbone.*precip"):
        load_experiment("no_such_experiment")


# --------------------------------------------------------------------------- #
# Errors in files: file, key, what is allowed
# --------------------------------------------------------------------------- #


def test_small_yaml_is_valid(tmp_path):
    cfg = load_experiment(small_yaml(tmp_path))
    assert cfg.model.token_grid == (4, 8)
    assert cfg.name == "small"


def test_unknown_top_level_key(tmp_path):
    p = small_yaml(tmp_path, extra="optimiser:\n  lr: 1\n")
    with pytest.raises(ConfigError, match=file_and(p.resolve(), "optimiser", "allowed", "base", "model", "train")):
        load_experiment(p)


def test_unknown_section_key_lists_allowed(tmp_path):
    p = small_yaml(tmp_path, extra="evaluation:\n  lead_time: 3\n")
    with pytest.raises(
        ConfigError,
        match=file_and(p.resolve(), "evaluation.lead_time", "allowed keys", "prediction_length", "ic_stride"),
    ):
        load_experiment(p)


def test_section_not_a_mapping(tmp_path):
    p = small_yaml(tmp_path, extra="mesh: 8\n")
    with pytest.raises(ConfigError, match=file_and(p.resolve(), "mesh", "mapping")):
        load_experiment(p)


def test_not_yaml_and_not_a_mapping(tmp_path):
    p = write(tmp_path / "broken.yaml", "model: [1, 2\n")
    with pytest.raises(ConfigError, match=file_and(p.resolve(), "YAML")):
        load_experiment(p)
    q = write(tmp_path / "list.yaml", "- 1\n- 2\n")
    with pytest.raises(ConfigError, match=file_and(q.resolve(), "mapping")):
        load_experiment(q)


@pytest.mark.parametrize(
    "extra,key,allowed",
    [
        ('  depth: "twelve"\n', "model.depth", "expected an integer"),
        ("  mlp_ratio: [4]\n", "model.mlp_ratio", "expected a number"),
        ("  img_size: 16\n", "model.img_size", "a list of 2 values"),
        ("  kind: transformer\n", "model.kind", "'backbone', 'precip'"),
        ("  remat: 1\n", "model.remat", "true/false"),
    ],
)
def test_wrong_type_in_model(tmp_path, extra, key, allowed):
    text = small_yaml(tmp_path).read_text().replace("  num_blocks: 4\n", "  num_blocks: 4\n" + extra)
    p = write(tmp_path / "bad.yaml", text)
    with pytest.raises(ConfigError, match=file_and(p.resolve(), key, allowed)):
        load_experiment(p)


def test_wrong_type_in_train(tmp_path):
    p = small_yaml(tmp_path, extra="  lr: [1]\n")  # continues the train: section
    with pytest.raises(ConfigError, match=file_and(p.resolve(), "train.lr", "expected a number", "[1]")):
        load_experiment(p)
    q = small_yaml(tmp_path, "q.yaml", extra="  lr: .nan\n")
    with pytest.raises(ConfigError, match=file_and(q.resolve(), "train.lr", "a number")):
        load_experiment(q)


def test_float_forms_in_files(tmp_path):
    p = small_yaml(tmp_path, extra="  lr: 1e-4\n  eps: 1.0e-8\n  weight_decay: 0\n")
    cfg = load_experiment(p)
    assert cfg.train.lr == 1e-4 and cfg.train.eps == 1e-8 and cfg.train.weight_decay == 0.0
    assert isinstance(cfg.train.weight_decay, float)


SMALL_MODEL = "  num_blocks: 4\n"


@pytest.mark.parametrize(
    "find,replace,key,allowed",
    [
        ("  img_size: [16, 32]\n", "  img_size: [18, 32]\n", "model.img_size", "multiple of patch_size"),
        (SMALL_MODEL, "  num_blocks: 5\n", "model.num_blocks", "valid: [1, 2, 4, 8, 16, 32]"),
        (SMALL_MODEL, SMALL_MODEL + "  hard_thresholding_fraction: 1.5\n", "model.hard_thresholding_fraction",
         "(0, 1]"),
        ("  batch_size: 2\n", "  batch_size: 2\n  lr: -1.0e-4\n", "train.lr", "> 0"),
        ("  batch_size: 2\n", "  batch_size: 2\n  rollout_steps: 2\n", "train.rollout_steps", "finetune"),
        ("  batch_size: 2\n", "  batch_size: 2\n  mode: finetune\n  rollout_steps: 2\n  loss_weights: [1, 1, 1]\n",
         "train.loss_weights", "one weight per rollout step (2), got 3"),
        ("  store: world\n", "  store: world\n  train_years: [2015, 1979]\n", "data.train_years",
         "empty year range"),
        ("  in_channels: 3\n", "  in_channels: 4\n", "model.in_channels", "data.channels lists 3"),
        ("  out_channels: 3\n", "  out_channels: 2\n", "model.out_channels", "must equal in_channels (3)"),
        ("  batch_size: 2\n", "  batch_size: 0\n", "train.batch_size", ">= 1"),
    ],
)
def test_impossible_values(tmp_path, find, replace, key, allowed):
    text = small_yaml(tmp_path).read_text()
    assert find in text
    p = write(tmp_path / "bad.yaml", text.replace(find, replace, 1))
    with pytest.raises(ConfigError, match=file_and(p.resolve(), key, allowed)):
        load_experiment(p)


def test_modelconfig_direct_construction():
    m = ModelConfig(img_size=(24, 80), patch_size=(4, 4), in_channels=4, out_channels=4, embed_dim=32, depth=2,
                    mlp_ratio=4.0, num_blocks=4, sparsity_threshold=0.01, hard_thresholding_fraction=0.6)
    assert m.token_grid == (6, 20)
    assert m.block_size == 8 and m.mlp_hidden == 128
    assert m.kept_modes == int((6 // 2 + 1) * 0.6)
    with pytest.raises(ConfigError, match=r"model\.num_blocks.*valid"):
        dataclasses.replace(m, num_blocks=3)
    with pytest.raises(ConfigError, match=r"model\.img_size.*multiple of patch_size"):
        dataclasses.replace(m, img_size=(25, 80))
    with pytest.raises(ConfigError, match=r"model\.out_channels.*must be 1"):
        dataclasses.replace(m, kind="precip")
    with pytest.raises(dataclasses.FrozenInstanceError):
        m.depth = 3  # type: ignore[misc]


def test_mesh_flag_parser_shared_by_the_command_lines(capsys):
    import argparse

    from fcn_jax.cli import parse_mesh as parse_mesh_arg

    assert parse_mesh_arg("2,1,2,2") == (2, 1, 2, 2)
    assert parse_mesh_arg("-1,1,1,2") == (-1, 1, 1, 2)
    for bad, said in (("2,2", "four sizes .* got 2"), ("a,1,1,1", "four integers"), ("", "four integers")):
        with pytest.raises(argparse.ArgumentTypeError, match=said):
            parse_mesh_arg(bad)
    # forecast, perf and check report it as a usage error (exit status 2) naming the flag
    from fcn_jax import check, forecast
    from fcn_jax import perf as perf_cli

    for main, argv in ((forecast.main, ["m", "--store", "s", "--init", "2003-01-01", "--steps", "1", "--out", "o.nc"]),
                       (perf_cli.main, []), (check.main, ["--experiment", "world"])):
        with pytest.raises(SystemExit) as e:
            main([*argv, "--mesh", "1,2"])
        assert e.value.code == 2, main.__module__
    assert "--mesh '1,2': expected four sizes" in capsys.readouterr().err
