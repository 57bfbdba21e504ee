"""Import (and export) of the original FourCastNet PyTorch checkpoints.

``load_torch_checkpoint(path, config, kind)`` returns an NNX model holding the
original weights, ready for ``model(x)`` with ``x: [batch, lat, lon, channel]``.
``python -m fcn_jax.convert CKPT --experiment NAME --stats DIR --out MODEL``
writes them as a model package (:mod:`fcn_jax.checkpoints.package`) that training,
forecasting and evaluation load: with ``--stats`` it carries the release's
normalisation (``global_means.npy`` / ``global_stds.npy`` of shape
(1, 21, 1, 1), the experiment's channels picked by the original's index list),
its climatology (``time_means.npy`` (1, 21, 721, 1440), rows 0..719; for
``precip.ckpt`` ``precip/time_means.npy``) and the original's grid, so a
forecast needs no store (:func:`read_release_stats`); ``--store`` takes them
from a prepared store instead.

The file is read without PyTorch by ``fcn_jax.torch_format``, whose restricted
unpickler accepts only tensors and plain containers: no pickled code runs. Accepted layouts are what the original tooling wrote: a dict with
``model_state`` (or the legacy ``state_dict``), or a bare state dict; keys with
or without the DistributedDataParallel ``module.`` prefix; the stray ``ged``
key is ignored. Every key and shape is checked against the configuration
before anything is built (model spec §8-§10).
"""

from __future__ import annotations

import dataclasses
import sys
from collections import OrderedDict
from pathlib import Path
from typing import Callable, Iterator

import ml_dtypes
import numpy as np

from fcn_jax import cli, torch_format
from fcn_jax.config import ModelConfig
from fcn_jax.errors import InputError

#: Keys the original loaders skip.
IGNORED_KEYS = ("ged",)


class CheckpointFormatError(InputError):
    """A checkpoint does not match the expected FourCastNet layout."""


@dataclasses.dataclass(frozen=True)
class _Entry:
    torch_key: str
    path: tuple  # path in nnx.to_pure_dict(nnx.state(model, nnx.Param))
    torch_shape: tuple[int, ...]
    to_flax: Callable[[np.ndarray], np.ndarray]
    to_torch: Callable[[np.ndarray], np.ndarray]


def _ident(a):
    return a


def _transpose(a):
    return a.T


def _oihw_to_hwio(a):
    return a.transpose(2, 3, 1, 0)


def _hwio_to_oihw(a):
    return a.transpose(3, 2, 0, 1)


def _backbone_entries(cfg: ModelConfig, prefix: str, path: tuple) -> Iterator[_Entry]:
    """The original AFNONet ``state_dict()`` keys, in their order (model spec §9)."""
    E, M = cfg.embed_dim, cfg.mlp_hidden
    lat, lon = cfg.token_grid
    ph, pw = cfg.patch_size
    nb, d = cfg.num_blocks, cfg.block_size
    yield _Entry(
        f"{prefix}pos_embed", (*path, "pos_embed"), (1, lat * lon, E),
        lambda a: a.reshape(1, lat, lon, E), lambda a: a.reshape(1, lat * lon, E),
    )
    yield _Entry(f"{prefix}patch_embed.proj.weight", (*path, "patch_embed", "kernel"),
                 (E, cfg.in_channels, ph, pw), _oihw_to_hwio, _hwio_to_oihw)
    yield _Entry(f"{prefix}patch_embed.proj.bias", (*path, "patch_embed", "bias"), (E,), _ident, _ident)
    for i in range(cfg.depth):
        k, p = f"{prefix}blocks.{i}.", (*path, "blocks", i)
        yield _Entry(k + "norm1.weight", (*p, "norm1", "scale"), (E,), _ident, _ident)
        yield _Entry(k + "norm1.bias", (*p, "norm1", "bias"), (E,), _ident, _ident)
        yield _Entry(k + "filter.w1", (*p, "filter", "w1"), (2, nb, d, d), _ident, _ident)
        yield _Entry(k + "filter.b1", (*p, "filter", "b1"), (2, nb, d), _ident, _ident)
        yield _Entry(k + "filter.w2", (*p, "filter", "w2"), (2, nb, d, d), _ident, _ident)
        yield _Entry(k + "filter.b2", (*p, "filter", "b2"), (2, nb, d), _ident, _ident)
        yield _Entry(k + "norm2.weight", (*p, "norm2", "scale"), (E,), _ident, _ident)
        yield _Entry(k + "norm2.bias", (*p, "norm2", "bias"), (E,), _ident, _ident)
        yield _Entry(k + "mlp.fc1.weight", (*p, "mlp", "fc1", "kernel"), (M, E), _transpose, _transpose)
        yield _Entry(k + "mlp.fc1.bias", (*p, "mlp", "fc1", "bias"), (M,), _ident, _ident)
        yield _Entry(k + "mlp.fc2.weight", (*p, "mlp", "fc2", "kernel"), (E, M), _transpose, _transpose)
        yield _Entry(k + "mlp.fc2.bias", (*p, "mlp", "fc2", "bias"), (E,), _ident, _ident)
    yield _Entry(f"{prefix}norm.weight", (*path, "norm", "scale"), (E,), _ident, _ident)
    yield _Entry(f"{prefix}norm.bias", (*path, "norm", "bias"), (E,), _ident, _ident)
    yield _Entry(f"{prefix}head.weight", (*path, "head", "kernel"), (ph * pw * cfg.out_channels, E),
                 _transpose, _transpose)


def checkpoint_layout(cfg: ModelConfig, kind: str) -> list[_Entry]:
    """Every original key with its shape and its place in the Flax model."""
    if kind == "backbone":
        return list(_backbone_entries(cfg, "", ()))
    if kind == "precip":
        bb = dataclasses.replace(cfg, kind="backbone")
        return [
            *_backbone_entries(bb, "backbone.", ("backbone",)),
            _Entry("conv.weight", ("conv_kernel",), (1, 1, 3, 3), _oihw_to_hwio, _hwio_to_oihw),
            _Entry("conv.bias", ("conv_bias",), (1,), _ident, _ident),
        ]
    raise ValueError(f"kind must be 'backbone' or 'precip', got {kind!r}")


def read_torch_state_dict(path: str | Path) -> "OrderedDict[str, np.ndarray]":
    """The model state of an original checkpoint as float32 NumPy arrays, prefix stripped."""
    path = Path(path)
    try:
        ckpt = torch_format.load(path)  # FileNotFoundError passes through
    except torch_format.TorchFormatError as e:  # corrupt file, or pickled objects outside the allow-list
        raise CheckpointFormatError(f"{e} Only tensor checkpoints are accepted.") from None
    if not isinstance(ckpt, dict):
        raise CheckpointFormatError(f"{path}: expected a dict, got {type(ckpt).__name__}")
    if "model_state" in ckpt:
        state = ckpt["model_state"]
    elif "state_dict" in ckpt:
        state = ckpt["state_dict"]
    elif ckpt and all(isinstance(v, np.ndarray) for v in ckpt.values()):
        state = ckpt  # a bare state dict
    else:
        raise CheckpointFormatError(
            f"{path}: no 'model_state' (or legacy 'state_dict') entry; top-level keys: {sorted(map(str, ckpt))[:10]}"
        )
    if not isinstance(state, dict):
        raise CheckpointFormatError(f"{path}: the model state is a {type(state).__name__}, not a dict")
    out: "OrderedDict[str, np.ndarray]" = OrderedDict()
    for key, tensor in state.items():
        name = key[len("module."):] if isinstance(key, str) and key.startswith("module.") else key
        if name in IGNORED_KEYS:
            continue
        if not isinstance(tensor, np.ndarray):
            raise CheckpointFormatError(f"{path}: entry {key!r} is a {type(tensor).__name__}, not a tensor")
        if not (np.issubdtype(tensor.dtype, np.floating) or tensor.dtype == ml_dtypes.bfloat16):
            raise CheckpointFormatError(f"{path}: entry {key!r} has dtype {tensor.dtype}, expected a float type")
        out[name] = tensor.astype(np.float32)
    return out


def state_dict_to_params(state: dict[str, np.ndarray], cfg: ModelConfig, kind: str, source: str = "checkpoint"):
    """Check keys and shapes, then build the pure nested dict of Flax parameters."""
    layout = checkpoint_layout(cfg, kind)
    expected = {e.torch_key for e in layout}
    missing = [e for e in layout if e.torch_key not in state]
    extra = [k for k in state if k not in expected]
    problems = []
    for e in missing:
        problems.append(f"missing key {e.torch_key!r} (expected shape {e.torch_shape})")
    for k in extra:
        problems.append(f"unexpected key {k!r} with shape {tuple(state[k].shape)}")
    for e in layout:
        if e.torch_key in state and tuple(state[e.torch_key].shape) != e.torch_shape:
            problems.append(
                f"key {e.torch_key!r} has shape {tuple(state[e.torch_key].shape)}, "
                f"the configuration expects {e.torch_shape}"
            )
    if problems:
        raise CheckpointFormatError(
            f"{source} does not match the {kind} model "
            f"(img_size={cfg.img_size}, patch={cfg.patch_size}, in={cfg.in_channels}, out={cfg.out_channels}, "
            f"embed={cfg.embed_dim}, depth={cfg.depth}, blocks={cfg.num_blocks}):\n  - " + "\n  - ".join(problems)
        )
    params: dict = {}
    for e in layout:
        node = params
        for p in e.path[:-1]:
            node = node.setdefault(p, {})
        node[e.path[-1]] = np.ascontiguousarray(e.to_flax(np.asarray(state[e.torch_key], np.float32)))
    return params


def model_from_params(params: dict, cfg: ModelConfig, kind: str):
    """An NNX model (backbone or precip) holding ``params`` (pure nested dict)."""
    import jax
    from flax import nnx

    from fcn_jax.model.afnonet import AFNONet, PrecipNet

    cls = PrecipNet if kind == "precip" else AFNONet
    model_cfg = dataclasses.replace(cfg, kind=kind)
    # Build abstractly (no random init of 75 M parameters), then fill in.
    graphdef, abstract = nnx.split(nnx.eval_shape(lambda: cls(model_cfg)))
    state = nnx.to_pure_dict(abstract)
    flat_ref = dict(_flatten(state))
    flat_new = dict(_flatten(params))
    if set(flat_ref) != set(flat_new):
        raise CheckpointFormatError(
            f"parameter tree mismatch: missing {sorted(set(flat_ref) - set(flat_new))[:5]}, "
            f"extra {sorted(set(flat_new) - set(flat_ref))[:5]}"
        )
    for k, ref in flat_ref.items():
        if tuple(ref.shape) != tuple(flat_new[k].shape):
            raise CheckpointFormatError(f"parameter {'.'.join(map(str, k))}: shape {flat_new[k].shape}, expected {ref.shape}")
    nnx.replace_by_pure_dict(abstract, jax.tree.map(jax.numpy.asarray, params))
    return nnx.merge(graphdef, abstract)


def _flatten(tree, prefix=()):
    if isinstance(tree, dict):
        for k, v in tree.items():
            yield from _flatten(v, (*prefix, k))
    else:
        yield prefix, tree


def load_torch_checkpoint(path: str | Path, config: ModelConfig, kind: str = "backbone"):
    """The NNX model (AFNONet or PrecipNet) holding an original checkpoint's weights.

    ``config`` is the model configuration (``fcn_jax.config.ModelConfig`` or an
    experiment's ``model`` section). The result runs on one device as is:
    ``model(x)`` with ``x: [batch, lat, lon, in_channels]`` in normalised units.
    """
    if kind not in ("backbone", "precip"):
        raise ValueError(f"kind must be 'backbone' or 'precip', got {kind!r}")
    state = read_torch_state_dict(path)
    params = state_dict_to_params(state, config, kind, source=str(path))
    return model_from_params(params, config, kind)


def to_torch_state_dict(model) -> "OrderedDict[str, np.ndarray]":
    """The original's state dict (NumPy, original key order, no ``module.`` prefix)."""
    from flax import nnx

    cfg = model.config
    params = nnx.to_pure_dict(nnx.state(model, nnx.Param))
    out: "OrderedDict[str, np.ndarray]" = OrderedDict()
    for e in checkpoint_layout(cfg, cfg.kind):
        node = params
        for p in e.path:
            node = node[p]
        out[e.torch_key] = np.ascontiguousarray(e.to_torch(np.asarray(node, np.float32)))
    return out


def save_torch_checkpoint(model, path: str | Path, ddp_prefix: bool = True) -> None:
    """Write ``{'iters', 'epoch', 'model_state'}`` as the original training script did (atomically).

    No PyTorch needed; the original's ``torch.load`` (also with ``weights_only=True``) reads it.
    """
    prefix = "module." if ddp_prefix else ""
    state = OrderedDict((prefix + k, v) for k, v in to_torch_state_dict(model).items())
    torch_format.save({"iters": 0, "epoch": 0, "model_state": state}, path)


# --------------------------------------------------------------------------- #
# The release's statistics (stats_v0: global_means.npy, global_stds.npy, time_means.npy)
# --------------------------------------------------------------------------- #


class StatsError(InputError):
    """A statistics file does not fit the model (the message names the file and both shapes)."""


def _load_npy(path: Path) -> np.ndarray:
    if not path.is_file():
        raise FileNotFoundError(f"{path}: not found")
    try:
        return np.load(path, allow_pickle=False)  # never unpickle objects from a data file
    except ValueError as e:
        raise StatsError(f"{path}: not a plain NumPy array file ({e})") from None


def stats_layout(n: int, channels) -> list:
    """Channel name at each index of a release statistics array with ``n`` channels.

    21: the original's HDF5 layout (the 20 channels + an unused 21st); 26: v0.1's
    channels; otherwise the array must list exactly the experiment's channels.
    """
    from fcn_jax.data.channels import FCN_26, FCN_HDF5_LAYOUT

    if n == len(FCN_HDF5_LAYOUT):
        return list(FCN_HDF5_LAYOUT)
    if n == len(FCN_26):
        return list(FCN_26)
    if n == len(channels):
        return list(channels)
    return []


def read_release_stats(stats_dir, channels, img_size, *, kind: str = "backbone", precip_eps: float = 1e-5,
                       time_means: str | Path | None = None):
    """``(package, climatology)`` for :func:`fcn_jax.checkpoints.package.save_model` from the release's files.

    ``stats_dir`` holds ``global_means.npy`` and ``global_stds.npy`` of shape
    ``(1, N, 1, 1)`` and optionally ``time_means.npy`` ``(1, N, H, W)`` (N = 21
    for the original layout; the experiment's ``channels`` are picked by the
    original's index list). For a precipitation model the climatology is
    ``tp``'s: ``time_means`` if given, else ``stats_dir/precip/time_means.npy``
    ``(1, 1, H, W)`` in metres. The model grid is the first ``img_size[0]`` rows
    of the statistics' pole-to-pole grid (721 rows -> the original's 720).
    """
    from fcn_jax.checkpoints import package as checkpoint
    from fcn_jax.checkpoints.integrity import file_crc32c
    from fcn_jax.data.channels import channel_names
    from fcn_jax.data.readers.grid import original_grid

    d = Path(stats_dir)
    channels = channel_names(channels)
    h, w = map(int, img_size)
    files = {}
    arrays = {}
    for name in ("global_means", "global_stds"):
        f = d / f"{name}.npy"
        a = _load_npy(f)
        files[f.name] = f
        if a.ndim != 4 or a.shape[0] != 1 or a.shape[2:] != (1, 1):
            raise StatsError(f"{f}: shape {a.shape}, expected (1, N, 1, 1) with N = 21 (the original's layout) "
                             f"or {len(channels)} (the experiment's channels)")
        arrays[name] = a.reshape(-1).astype(np.float64)
    if arrays["global_means"].shape != arrays["global_stds"].shape:
        raise StatsError(f"{d}: global_means.npy has {arrays['global_means'].size} channels but global_stds.npy "
                         f"{arrays['global_stds'].size}")
    n = arrays["global_means"].size
    layout = stats_layout(n, channels)
    missing = [c for c in channels if c not in layout]
    if missing:
        raise StatsError(f"{d / 'global_means.npy'}: shape (1, {n}, 1, 1) does not hold the experiment's channels "
                         f"{missing}; expected 21 entries (the original's layout) or the {len(channels)} channels "
                         f"{channels} in order")
    idx = [layout.index(c) for c in channels]
    mean, std = arrays["global_means"][idx], arrays["global_stds"][idx]
    if np.any(~np.isfinite(std)) or np.any(std <= 0):
        raise StatsError(f"{d / 'global_stds.npy'}: non-positive or non-finite std for "
                         f"{[c for c, s in zip(channels, std) if not (np.isfinite(s) and s > 0)]}")
    if kind == "precip":
        tm_path = Path(time_means) if time_means else d / "precip" / "time_means.npy"
        scored, tm_idx = ["tp"], [0]
    else:
        tm_path = Path(time_means) if time_means else d / "time_means.npy"
        scored, tm_idx = channels, idx
    clim = None
    if tm_path.is_file():
        tm = _load_npy(tm_path)
        files[str(tm_path.relative_to(d)) if tm_path.is_relative_to(d) else str(tm_path)] = tm_path
        want_c = 1 if kind == "precip" else n
        if tm.ndim != 4 or tm.shape[0] != 1 or tm.shape[1] != want_c or tm.shape[3] != w or tm.shape[2] not in (h, h + 1):
            raise StatsError(f"{tm_path}: shape {tm.shape}, expected (1, {want_c}, {h + 1} or {h}, {w}) for a "
                             f"{kind} model on a {h} x {w} grid with {n}-entry statistics")
        clim_arr = tm[0, tm_idx, :h, :].astype(np.float32)  # the original: rows 0 .. img_shape_x - 1
    elif time_means:
        raise FileNotFoundError(f"{tm_path}: not found")
    lat, lon = original_grid(h + 1, w)  # 721 rows pole to pole; the model sees the first 720
    lat = lat[:h]
    if tm_path.is_file():
        clim = checkpoint.climatology_dataset(clim_arr, scored, lat, lon,
                                              source=f"release time mean {tm_path.name} (rows 0..{h - 1})")
    package = checkpoint.package_metadata(
        channels=channels, mean=mean, std=std, lat=lat, lon=lon, time_step_hours=6.0,
        out_channels=["tp"] if kind == "precip" else channels,
        precip={"eps": precip_eps} if kind == "precip" else None,
        provenance={"statistics": "release files " + ", ".join(sorted(files)),
                    "stats_files": {k: {"path": str(v.resolve()), "crc32c": file_crc32c(v)} for k, v in files.items()},
                    "stats_channel_index": idx})
    return package, clim


def main(argv=None) -> int:
    ap = cli.parser("convert", "Convert an original FourCastNet PyTorch checkpoint (backbone.ckpt / precip.ckpt) "
                               "into an fcn_jax model package (Orbax weights + channels, statistics, grid, "
                               "climatology).")
    ap.add_argument("ckpt", help="path to the .ckpt/.tar written by the original code")
    cli.add_experiment(ap, positional=False, help="experiment name or YAML path giving the model config")
    ap.add_argument("--out", required=True, help="output directory (must not exist)")
    ap.add_argument("--kind", choices=["backbone", "precip"], default=None,
                    help="default: the experiment's model.kind")
    ap.add_argument("--stats", default=None, metavar="DIR",
                    help="the release's statistics: DIR/global_means.npy, global_stds.npy (1, 21, 1, 1) and "
                         "time_means.npy (1, 21, 721, 1440); for precip.ckpt DIR/precip/time_means.npy")
    ap.add_argument("--time-means", default=None, metavar="NPY",
                    help="the climatology file, when not at its place under --stats")
    cli.add_store(ap, help="take statistics, grid and climatology from a prepared store (or 'world') instead of "
                           "--stats")
    args = cli.parse(ap, argv)
    return cli.run(lambda: _convert(args))


def _convert(args) -> None:
    from fcn_jax.checkpoints import package as checkpoint

    cfg = cli.load_experiment(args)
    kind = args.kind or cfg.model.kind
    model_cfg = dataclasses.replace(cfg.model, kind=kind, out_channels=1 if kind == "precip" else cfg.model.out_channels)
    if args.stats and args.store:
        raise StatsError("give --stats (the release's files) or --store (a prepared store), not both")
    package = clim = None
    if args.stats:
        package, clim = read_release_stats(args.stats, cfg.data.channels, model_cfg.img_size, kind=kind,
                                           precip_eps=cfg.train.precip_eps, time_means=args.time_means)
    elif args.store:
        package, clim = checkpoint.package_from_store(cli.resolve_store(args.store, cfg), cfg.data.channels,
                                                      kind=kind, precip_eps=cfg.train.precip_eps,
                                                      experiment=cfg.name)
    if package is not None:
        package["provenance"].update(source_checkpoint=str(Path(args.ckpt).resolve()), experiment=cfg.name)
    model = load_torch_checkpoint(args.ckpt, model_cfg, kind)
    checkpoint.save_model(args.out, model, extra={"source": str(Path(args.ckpt).resolve()), "experiment": cfg.name},
                          package=package, climatology=clim)
    from fcn_jax.model.afnonet import count_params

    print(f"wrote {args.out}: {kind}, {count_params(model):,} parameters"
          + ("" if package is None else f"; statistics of {len(package['channels'])} channels"
             + (", climatology" if clim is not None else ", no climatology")))
    if package is None:
        print("note: no --stats or --store: the model carries no normalisation statistics; forecast and evaluate "
              "will need a store's (give the release's stats with --stats DIR)", file=sys.stderr)


if __name__ == "__main__":
    sys.exit(main())
