"""Experiment configuration: frozen, typed dataclasses loaded from YAML.

An experiment is one YAML file under ``experiments/`` with the sections
``model``, ``mesh``, ``data``, ``train`` and ``evaluation``. A file may start
from another with ``base: NAME`` (a name under ``experiments/`` or a path
relative to the file); sections are merged key by key, the derived file
winning. Command lines override single values with ``--set section.key=value``.

Every key is checked: an unknown key, a value of the wrong type or an
impossible value raises :class:`ConfigError` naming the file, the key and what
is allowed. YAML is read with ``yaml.safe_load``; nothing in a config file is
ever executed.
"""

from __future__ import annotations

import dataclasses
import datetime
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Sequence

import yaml

from fcn_jax.errors import InputError

#: Directory holding the shipped experiments.
EXPERIMENTS_DIR = Path(__file__).resolve().parent.parent / "experiments"

#: The original 20 FourCastNet channels, in the original order (model spec §11.2): the one
#: definition (``fcn_jax.data.channels.FCN_20`` is this tuple, for the data layer's users).
FCN_CHANNELS: tuple[str, ...] = (
    "u10", "v10", "t2m", "sp", "msl", "t850", "u1000", "v1000", "z1000", "u850",
    "v850", "z850", "u500", "v500", "z500", "t500", "z50", "r500", "r850", "tcwv",
)  # fmt: skip


class ConfigError(InputError):
    """A configuration value or file is invalid. The message says where and why."""


def _fail(key: str, msg: str) -> None:
    raise ConfigError(f"{key}: {msg}")


# --------------------------------------------------------------------------- #
# Sections
# --------------------------------------------------------------------------- #


@dataclass(frozen=True)
class ModelConfig:
    """The AFNO network (AFNONet backbone or PrecipNet).

    Field names follow the original ``AFNONet`` constructor. Defaults are the
    published FourCastNet v0 values (model spec §1).
    """

    img_size: tuple[int, int] = (720, 1440)  # (lat, lon) pixels
    patch_size: tuple[int, int] = (8, 8)
    in_channels: int = 20
    out_channels: int = 20
    embed_dim: int = 768
    depth: int = 12
    mlp_ratio: float = 4.0
    num_blocks: int = 8  # AFNO block-diagonal blocks
    sparsity_threshold: float = 0.01  # softshrink lambda in the spectral filter
    hard_thresholding_fraction: float = 1.0
    kind: Literal["backbone", "precip"] = "backbone"
    #: dtype of matmuls and activations; parameters, LayerNorm statistics and
    #: FFTs stay float32 ("bfloat16" = mixed precision).
    compute_dtype: Literal["float32", "bfloat16"] = "float32"
    #: Rematerialise each AFNO block in the backward pass (saves activation memory).
    remat: bool = False

    def __post_init__(self):
        h, w = self.img_size
        ph, pw = self.patch_size
        for name, v in (("img_size", h), ("img_size", w), ("patch_size", ph), ("patch_size", pw)):
            if v <= 0:
                _fail(f"model.{name}", f"must be positive, got {getattr(self, name)}")
        if h % ph or w % pw:
            _fail(
                "model.img_size",
                f"{self.img_size} must be a multiple of patch_size {self.patch_size} "
                "(FourCastNet uses 720x1440 with 8x8 patches)",
            )
        for name in ("in_channels", "out_channels", "embed_dim", "num_blocks"):
            if getattr(self, name) <= 0:
                _fail(f"model.{name}", f"must be positive, got {getattr(self, name)}")
        if self.depth < 0:
            _fail("model.depth", f"must be >= 0, got {self.depth}")
        if self.embed_dim % self.num_blocks:
            _fail(
                "model.num_blocks",
                f"{self.num_blocks} does not divide embed_dim {self.embed_dim}; "
                f"valid: {_divisors(self.embed_dim)}",
            )
        hidden = self.mlp_ratio * self.embed_dim
        if self.mlp_ratio <= 0 or hidden != int(hidden):
            _fail("model.mlp_ratio", f"mlp_ratio*embed_dim must be a positive integer, got {hidden}")
        if not 0.0 < self.hard_thresholding_fraction <= 1.0:
            _fail(
                "model.hard_thresholding_fraction",
                f"must be in (0, 1], got {self.hard_thresholding_fraction}",
            )
        if int(self.token_grid[0] // 2 + 1) * self.hard_thresholding_fraction < 1:
            _fail("model.hard_thresholding_fraction", "keeps no Fourier mode at all")
        if self.sparsity_threshold < 0:
            _fail("model.sparsity_threshold", f"must be >= 0, got {self.sparsity_threshold}")
        if self.kind == "precip" and self.out_channels != 1:
            _fail("model.out_channels", f"PrecipNet predicts one field: must be 1, got {self.out_channels}")

    @property
    def token_grid(self) -> tuple[int, int]:
        """(lat, lon) tokens, e.g. (90, 180) for the published model."""
        return self.img_size[0] // self.patch_size[0], self.img_size[1] // self.patch_size[1]

    @property
    def mlp_hidden(self) -> int:
        return int(self.mlp_ratio * self.embed_dim)

    @property
    def block_size(self) -> int:
        return self.embed_dim // self.num_blocks

    @property
    def kept_modes(self) -> int:
        """Modes kept by the original's hidden truncation: int((H_tokens//2+1)*fraction)."""
        return int((self.token_grid[0] // 2 + 1) * self.hard_thresholding_fraction)


@dataclass(frozen=True)
class MeshConfig:
    """Device mesh sizes; -1 means 'all remaining devices' (at most one axis)."""

    data: int = -1
    channel: int = 1
    height: int = 1
    width: int = 1
    #: AFNO spectral-filter layout: ``channel_block`` (2 all-to-alls per transform;
    #: channel*height*width must divide the AFNO blocks), ``pencil`` (4 per transform;
    #: only channel must divide the blocks, so model parallelism may exceed them) or
    #: ``auto`` = channel_block when it applies, else pencil (README, Parallelism).
    spectral_layout: Literal["auto", "channel_block", "pencil"] = "auto"
    #: Pipeline stages (layer pipelining, GPipe): each stage runs depth/stage
    #: consecutive AFNO blocks on its own data*channel*height*width devices, so the
    #: run uses stage times as many devices. 1 = no pipelining.
    stage: int = 1

    def __post_init__(self):
        if self.spectral_layout not in ("auto", "channel_block", "pencil"):
            _fail("mesh.spectral_layout", f"must be one of auto, channel_block, pencil; got {self.spectral_layout!r}")
        if self.stage < 1:
            _fail("mesh.stage", f"must be a positive number of pipeline stages, got {self.stage}")
        sizes = self.shape
        if sum(s == -1 for s in sizes) > 1:
            _fail("mesh", f"at most one axis may be -1, got {sizes}")
        for name, s in zip(("data", "channel", "height", "width"), sizes):
            if s == 0 or s < -1:
                _fail(f"mesh.{name}", f"must be a positive device count or -1, got {s}")

    @property
    def shape(self) -> tuple[int, int, int, int]:
        return (self.data, self.channel, self.height, self.width)


@dataclass(frozen=True)
class DataConfig:
    """Where samples come from and how they are read."""

    #: Prepared training store (zarr) or the literal "world" for the embedded world.
    store: str = "world"
    channels: tuple[str, ...] = FCN_CHANNELS
    train_years: tuple[int, int] = (1979, 2015)  # inclusive range
    valid_years: tuple[int, int] = (2016, 2017)
    test_years: tuple[int, int] = (2018, 2018)
    #: Time steps between model input and target (1 = 6 h on 6-hourly data).
    dt: int = 1
    num_workers: int = 0  # grain worker processes (0 = read in the main process)
    num_threads: int = 4  # reader threads per process / worker
    prefetch: int = 2
    world_seed: int = 0
    world_days: int = 0  # 0 = generator default

    def __post_init__(self):
        if not self.channels:
            _fail("data.channels", "needs at least one channel name")
        if len(set(self.channels)) != len(self.channels):
            _fail("data.channels", f"repeated channel names in {self.channels}")
        for name in ("train_years", "valid_years", "test_years"):
            a, b = getattr(self, name)
            if a > b:
                _fail(f"data.{name}", f"empty year range {a}..{b}")
        if self.dt < 1:
            _fail("data.dt", f"must be >= 1, got {self.dt}")
        if self.num_workers < 0 or self.prefetch < 0:
            _fail("data.num_workers", "num_workers and prefetch must be >= 0")


@dataclass(frozen=True)
class TrainConfig:
    """The optimisation recipe (model spec §14)."""

    mode: Literal["pretrain", "finetune", "precip"] = "pretrain"
    steps: int = 126_600  # total optimiser steps of the run
    batch_size: int = 64  # global batch
    #: Autoregressive steps in the loss: 1 = pre-training, 2 = the original fine-tuning.
    #: In precip mode: PrecipNet learns from the frozen backbone's 1 .. k-step states
    #: (1 = the original; k = the leads it forecasts at).
    rollout_steps: int = 1
    #: Weight of each rollout step's loss; empty = all 1 (the original; precip mode: all 1/k).
    loss_weights: tuple[float, ...] = ()
    optimizer: Literal["adam", "adamw"] = "adam"
    lr: float = 5e-4
    weight_decay: float = 0.0
    b1: float = 0.9
    b2: float = 0.999
    eps: float = 1e-8
    schedule: Literal["cosine", "constant"] = "cosine"
    warmup_steps: int = 0
    #: >0: cosine evaluated at step // steps_per_epoch (the original's per-epoch staircase).
    steps_per_epoch: int = 0
    grad_clip: float = 0.0  # global-norm clipping; 0 = off
    checkpoint_every: int = 1000
    log_every: int = 50
    validate_every: int = 1000
    validate_batches: int = 20
    keep_latest: int = 2
    keep_best: int = 1
    seed: int = 0
    #: Start from these weights (an Orbax run dir / converted checkpoint); "" = random init.
    init_from: str = ""
    #: Frozen wind model for precipitation training.
    backbone_checkpoint: str = ""
    precip_eps: float = 1e-5
    #: Pipeline microbatches per data shard (mesh.stage > 1): each splits the
    #: batch/data samples of a data shard; 0 = one sample per microbatch (the
    #: smallest pipeline bubble, (stage-1)/(microbatches+stage-1)).
    microbatches: int = 0

    def __post_init__(self):
        for name in ("steps", "batch_size", "rollout_steps", "checkpoint_every", "log_every", "validate_every"):
            if getattr(self, name) < 1:
                _fail(f"train.{name}", f"must be >= 1, got {getattr(self, name)}")
        if self.loss_weights and len(self.loss_weights) != self.rollout_steps:
            _fail(
                "train.loss_weights",
                f"needs one weight per rollout step ({self.rollout_steps}), got {len(self.loss_weights)}",
            )
        if self.lr <= 0:
            _fail("train.lr", f"must be > 0, got {self.lr}")
        if self.weight_decay < 0 or self.grad_clip < 0 or self.warmup_steps < 0 or self.steps_per_epoch < 0:
            _fail("train", "weight_decay, grad_clip, warmup_steps and steps_per_epoch must be >= 0")
        if self.warmup_steps >= self.steps:
            _fail("train.warmup_steps", f"{self.warmup_steps} must be < steps ({self.steps})")
        if self.keep_latest < 1 or self.keep_best < 0:
            _fail("train.keep_latest", "keep_latest must be >= 1 and keep_best >= 0")
        if self.mode == "pretrain" and self.rollout_steps != 1:
            _fail("train.rollout_steps", "pre-training uses 1 step; use mode finetune for k > 1")
        if self.precip_eps <= 0:
            _fail("train.precip_eps", f"must be > 0, got {self.precip_eps}")
        if self.microbatches < 0:
            _fail("train.microbatches", f"must be >= 0 (0 = one sample per microbatch), got {self.microbatches}")
        if self.microbatches and self.batch_size % self.microbatches:
            _fail("train.microbatches", f"{self.microbatches} does not divide the batch of {self.batch_size}; "
                                        f"valid: {_divisors(self.batch_size)}")


@dataclass(frozen=True)
class EvaluationConfig:
    """Forecast and scoring settings (evaluation spec §5)."""

    #: Entries of a rollout including the initial condition (41 = 0..240 h).
    prediction_length: int = 41
    #: Steps between initial conditions (36 = 9 days for z500 in the original).
    ic_stride: int = 36
    num_ics: int = 0  # 0 = as many as fit
    #: Latitude weights: "fcn" reproduces the original's quirks; "cos" the true grid.
    lat_weights: Literal["fcn", "cos"] = "fcn"
    ensemble_members: int = 0  # 0 = deterministic
    perturbation_std: float = 0.3  # n_level: std of the Gaussian IC noise, normalised units
    initial_time: str = ""  # e.g. "2018-01-01T00"; "" = regular ICs from ic_stride
    seed: int = 0

    def __post_init__(self):
        if self.prediction_length < 2:
            _fail("evaluation.prediction_length", f"must be >= 2, got {self.prediction_length}")
        if self.ic_stride < 1 or self.num_ics < 0 or self.ensemble_members < 0:
            _fail("evaluation", "ic_stride must be >= 1; num_ics and ensemble_members >= 0")
        if self.perturbation_std < 0:
            _fail("evaluation.perturbation_std", f"must be >= 0, got {self.perturbation_std}")


@dataclass(frozen=True)
class ExperimentConfig:
    """A whole experiment: one YAML file, after ``base:`` merging and overrides."""

    name: str = "experiment"
    description: str = ""
    model: ModelConfig = field(default_factory=ModelConfig)
    mesh: MeshConfig = field(default_factory=MeshConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    evaluation: EvaluationConfig = field(default_factory=EvaluationConfig)

    def __post_init__(self):
        if len(self.data.channels) != self.model.in_channels:
            _fail(
                "model.in_channels",
                f"{self.model.in_channels} but data.channels lists {len(self.data.channels)} channels",
            )
        if self.model.kind == "backbone" and self.model.out_channels != self.model.in_channels:
            _fail(
                "model.out_channels",
                f"an autoregressive backbone maps its state to itself: must equal "
                f"in_channels ({self.model.in_channels}), got {self.model.out_channels}",
            )
        stage, depth = self.mesh.stage, self.model.depth
        if stage > 1 and (depth == 0 or depth % stage):
            _fail("mesh.stage", f"{stage} pipeline stages do not divide the model's depth {depth} (each stage "
                                f"runs depth/stage consecutive blocks); valid: {_divisors(depth) if depth else [1]}")
        if self.train.mode == "precip" and self.model.kind != "precip":
            _fail("train.mode", "precip training needs model.kind: precip")

    def to_dict(self) -> dict[str, Any]:
        """Plain nested dict (tuples as lists), suitable for YAML/JSON."""
        return _to_plain(dataclasses.asdict(self))


SECTIONS: dict[str, type] = {
    "model": ModelConfig,
    "mesh": MeshConfig,
    "data": DataConfig,
    "train": TrainConfig,
    "evaluation": EvaluationConfig,
}
TOP_LEVEL_KEYS = {"name", "description", *SECTIONS}


def _to_plain(v):
    if isinstance(v, dict):
        return {k: _to_plain(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_to_plain(x) for x in v]
    return v


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


# --------------------------------------------------------------------------- #
# Typed conversion
# --------------------------------------------------------------------------- #


def _type_name(tp) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(tp))
    if origin is tuple:
        args = typing.get_args(tp)
        if len(args) == 2 and args[1] is Ellipsis:
            return f"a list of {_type_name(args[0])}"
        return f"a list of {len(args)} values ({', '.join(_type_name(a) for a in args)})"
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_type_name(a) for a in typing.get_args(tp))
    if tp is type(None):
        return "null"
    return {int: "an integer", float: "a number", bool: "true/false", str: "a string"}.get(tp, str(tp))


def _coerce(value: Any, tp, key: str) -> Any:
    """Convert a YAML value to the annotated type, or raise ConfigError."""
    origin = typing.get_origin(tp)
    bad = ConfigError(f"{key}: expected {_type_name(tp)}, got {value!r} ({type(value).__name__})")
    if origin is Literal:
        if value in typing.get_args(tp):
            return value
        raise bad
    if origin in (typing.Union, types.UnionType):
        for arg in typing.get_args(tp):
            if arg is type(None) and value is None:
                return None
            try:
                return _coerce(value, arg, key)
            except ConfigError:
                continue
        raise bad
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            raise bad
        args = typing.get_args(tp)
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_coerce(v, args[0], f"{key}[{i}]") for i, v in enumerate(value))
        if len(value) != len(args):
            raise bad
        return tuple(_coerce(v, a, f"{key}[{i}]") for i, (v, a) in enumerate(zip(value, args)))
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise bad
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        if isinstance(value, str):
            try:
                f = float(value.replace("_", ""))
            except ValueError:
                raise bad from None
            if f.is_integer():
                return int(f)
        raise bad
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            f = float(value)
        elif isinstance(value, str):  # YAML 1.1 reads "1e-4" as a string
            try:
                f = float(value)
            except ValueError:
                raise bad from None
        else:
            raise bad
        if not math.isfinite(f):
            raise bad
        return f
    if tp is str:
        if isinstance(value, str):
            return value
        if isinstance(value, (datetime.date, datetime.datetime)):  # YAML reads 2018-01-01 as a date
            return value.isoformat()
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return str(value)
        raise bad
    raise bad


def _check_section_types(cls, raw: dict, section: str) -> dict:
    """Known keys with values of the right type -> the coerced values (no value checks)."""
    hints = typing.get_type_hints(cls)
    allowed = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for key, value in raw.items():
        if key not in hints:
            raise ConfigError(f"{section}.{key}: unknown key; allowed keys of '{section}': {', '.join(allowed)}")
        kwargs[key] = _coerce(value, hints[key], f"{section}.{key}")
    return kwargs


def build_section(cls, raw: dict, section: str):
    """One section dataclass (``ModelConfig``, ...) from a mapping, checked as an experiment's is; ``section``
    names it in errors (a model package's ``model.json`` uses it too)."""
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{section}: expected a mapping of keys, got {raw!r}")
    return cls(**_check_section_types(cls, raw, section))


# --------------------------------------------------------------------------- #
# Files, inheritance, overrides
# --------------------------------------------------------------------------- #


def resolve_experiment_path(name_or_path: str | Path, relative_to: Path | None = None) -> Path:
    """A name under ``experiments/`` ("afno_backbone"), or a path to a YAML file."""
    p = Path(name_or_path)
    candidates = []
    if relative_to is not None and not p.is_absolute():
        candidates += [relative_to / p, relative_to / f"{p}.yaml"]
    candidates += [p, Path(f"{p}.yaml"), EXPERIMENTS_DIR / p, EXPERIMENTS_DIR / f"{p}.yaml"]
    for c in candidates:
        if c.is_file():
            return c.resolve()
    known = sorted(x.stem for x in EXPERIMENTS_DIR.glob("*.yaml"))
    raise ConfigError(f"experiment {str(name_or_path)!r} not found: not a file, and not one of {known}")


def _read_yaml(path: Path) -> dict:
    try:
        with open(path) as f:
            raw = yaml.safe_load(f)
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML: {e}") from None
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: an experiment must be a mapping of sections, got {type(raw).__name__}")
    return raw


def _load_raw(path: Path, seen: tuple[Path, ...] = ()) -> dict:
    if path in seen:
        chain = " -> ".join(str(p) for p in (*seen, path))
        raise ConfigError(f"{path}: circular 'base:' inheritance: {chain}")
    raw = _read_yaml(path)
    base = raw.pop("base", None)
    for key, value in raw.items():
        if key not in TOP_LEVEL_KEYS:
            raise ConfigError(
                f"{path}: unknown top-level key {key!r}; allowed: base, {', '.join(sorted(TOP_LEVEL_KEYS))}"
            )
        if key in SECTIONS and value is not None and not isinstance(value, dict):
            raise ConfigError(f"{path}: section {key!r} must be a mapping, got {value!r}")
        if key in SECTIONS and value:
            # keys and types are checked per file, so an error in a base names that base
            try:
                _check_section_types(SECTIONS[key], value, key)
            except ConfigError as e:
                raise ConfigError(f"{path}: {e}") from None
    if base is None:
        merged: dict = {}
    else:
        if not isinstance(base, str):
            raise ConfigError(f"{path}: 'base' must be an experiment name or path, got {base!r}")
        try:
            base_path = resolve_experiment_path(base, relative_to=path.parent)
        except ConfigError as e:
            raise ConfigError(f"{path}: base: {e}") from None
        merged = _load_raw(base_path, (*seen, path))
    for key, value in raw.items():
        if key in SECTIONS:
            merged[key] = {**merged.get(key, {}), **(value or {})}
        else:
            merged[key] = value
    return merged


def parse_override(text: str) -> tuple[str, str, Any]:
    """``section.key=value`` -> (section, key, value parsed as a YAML scalar/list)."""
    if "=" not in text:
        raise ConfigError(f"--set {text!r}: expected section.key=value")
    lhs, rhs = text.split("=", 1)
    parts = lhs.strip().split(".")
    if len(parts) == 1 and parts[0] in ("name", "description"):
        return "", parts[0], rhs
    if len(parts) != 2 or parts[0] not in SECTIONS:
        raise ConfigError(
            f"--set {text!r}: the key must be section.key with section one of {', '.join(SECTIONS)}"
        )
    try:
        value = yaml.safe_load(rhs) if rhs.strip() else ""
    except yaml.YAMLError:
        value = rhs
    return parts[0], parts[1], value


def build_experiment(raw: dict, source: str = "<dict>") -> ExperimentConfig:
    """Validate a merged raw mapping into an :class:`ExperimentConfig`."""
    try:
        sections = {name: build_section(cls, raw.get(name), name) for name, cls in SECTIONS.items()}
        name = raw.get("name", "experiment")
        desc = raw.get("description", "")
        if not isinstance(name, str) or not isinstance(desc, str):
            raise ConfigError("name/description: expected strings")
        return ExperimentConfig(name=name, description=desc, **sections)
    except ConfigError as e:
        raise ConfigError(f"{source}: {e}") from None


def load_experiment(name_or_path: str | Path, overrides: Sequence[str] = ()) -> ExperimentConfig:
    """Load an experiment by name or path, apply ``--set`` overrides, validate.

    >>> cfg = load_experiment("afno_backbone", ["train.lr=1e-4"])
    """
    path = resolve_experiment_path(name_or_path)
    raw = _load_raw(path)
    raw.setdefault("name", path.stem)
    for text in overrides:
        section, key, value = parse_override(text)
        if not section:
            raw[key] = value
            continue
        cls = SECTIONS[section]
        if key not in {f.name for f in dataclasses.fields(cls)}:
            allowed = ", ".join(f.name for f in dataclasses.fields(cls))
            raise ConfigError(f"--set {text!r}: unknown key {section}.{key}; allowed keys of '{section}': {allowed}")
        raw.setdefault(section, {})[key] = value
    source = str(path) + (f" (with --set {' '.join(overrides)})" if overrides else "")
    return build_experiment(raw, source)


def dump_experiment(cfg: ExperimentConfig) -> str:
    """YAML text that :func:`load_experiment` reads back to an equal config."""
    return yaml.safe_dump(cfg.to_dict(), sort_keys=False)
