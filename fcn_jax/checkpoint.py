"""Model-weight checkpoints (Orbax): one directory that describes itself.

Layout of ``DIR``::

    DIR/model.json          {"kind": ..., "model": {ModelConfig fields}, ...extra}
    DIR/params/             Orbax PyTree checkpoint of the parameters (global arrays)
    DIR/fcn_integrity.json  CRC32C and size of every file above (fcn_jax.integrity)

Parameters are stored as global arrays, so a checkpoint restores onto any mesh:
:func:`load_model` builds an abstract model whose leaves carry the target
shardings and lets Orbax reshard on read. The directory is written under a
temporary name and renamed only when complete, so a half-written checkpoint is
never mistaken for a good one; its integrity manifest is written last, and
:func:`load_model` verifies it before reading anything, so a damaged model is
refused with the file and what is wrong.

Command line::

    python -m fcn_jax.checkpoint verify DIR [DIR ...]   # a run directory, its checkpoints/, or a model
    python -m fcn_jax.checkpoint seal DIR [DIR ...]     # add integrity data to trusted pre-integrity checkpoints

``verify`` checks without changing anything and exits 1 if anything is
damaged; ``seal`` only adds manifests where there are none.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path

import jax
from flax import nnx

from fcn_jax import integrity
from fcn_jax.config import ModelConfig, _build_section


def _barrier(name: str) -> None:
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(name)


def save_model(directory: str | Path, model, extra: dict | None = None, overwrite: bool = False) -> Path:
    """Write ``model``'s parameters and configuration to ``directory``.

    Multi-process: every process calls this (each writes its shards); only
    process 0 touches directories and metadata, between barriers.
    """
    import orbax.checkpoint as ocp

    directory = Path(directory).resolve()
    primary = jax.process_index() == 0
    if directory.exists() and not overwrite:
        raise FileExistsError(f"{directory} already exists; choose a new --out or remove it")
    tmp = directory.with_name(directory.name + ".tmp-partial")
    if primary:
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir(parents=True)
    _barrier(f"save_model:mkdir:{directory}")
    try:
        params = nnx.to_pure_dict(nnx.state(model, nnx.Param))
        with ocp.StandardCheckpointer() as ckptr:
            ckptr.save(tmp / "params", params)
            ckptr.wait_until_finished()
        _barrier(f"save_model:saved:{directory}")
        if primary:
            meta = {"format": "fcn_jax.model/1", "kind": model.config.kind, "model": _model_dict(model.config)}
            meta.update(extra or {})
            (tmp / "model.json").write_text(json.dumps(meta, indent=2))
            integrity.write_manifest(tmp)  # last: covers params/ and model.json
            if directory.exists():
                shutil.rmtree(directory)
            tmp.rename(directory)
    except BaseException:
        if primary:
            shutil.rmtree(tmp, ignore_errors=True)  # never leave a half-written checkpoint behind
        raise
    _barrier(f"save_model:done:{directory}")
    return directory


def _model_dict(cfg: ModelConfig) -> dict:
    d = dataclasses.asdict(cfg)
    return {k: list(v) if isinstance(v, tuple) else v for k, v in d.items()}


def read_model_config(directory: str | Path) -> ModelConfig:
    path = Path(directory) / "model.json"
    if not path.is_file():
        raise FileNotFoundError(f"{directory} is not an fcn_jax model checkpoint: {path} is missing")
    meta = json.loads(path.read_text())
    return _build_section(ModelConfig, meta["model"], f"{path}: model")


def load_model(directory: str | Path, mesh=None, model_cfg: ModelConfig | None = None):
    """Restore a model saved by :func:`save_model`, sharded for ``mesh`` (or one device)."""
    import orbax.checkpoint as ocp

    from fcn_jax.model.afnonet import build_model, param_shardings
    from fcn_jax.parallel.mesh import single_device_mesh

    directory = Path(directory).resolve()
    saved_cfg = read_model_config(directory)
    integrity.check(directory, what="model checkpoint")  # never load (or export onwards) damaged weights
    cfg = model_cfg or saved_cfg
    if model_cfg is not None:
        # runtime switches may differ; the architecture may not
        arch = lambda c: dataclasses.replace(c, compute_dtype="float32", remat=False)  # noqa: E731
        if arch(model_cfg) != arch(saved_cfg):
            raise ValueError(f"{directory}: saved model {saved_cfg} does not match the requested {model_cfg}")
    mesh = mesh or single_device_mesh()
    abstract_model = nnx.eval_shape(lambda: build_model(cfg))
    graphdef, abstract_state = nnx.split(abstract_model)
    shardings = param_shardings(abstract_model, mesh)
    target = jax.tree.map(
        lambda v, s: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=s),
        nnx.to_pure_dict(nnx.state(abstract_model, nnx.Param)),
        nnx.to_pure_dict(shardings),
    )
    with ocp.StandardCheckpointer() as ckptr:
        params = ckptr.restore(directory / "params", target)
    nnx.replace_by_pure_dict(abstract_state, params)
    return nnx.merge(graphdef, abstract_state)


# ------------------------------------------------------------------ verify
def verify_path(path: str | Path) -> tuple[bool, list[str]]:
    """Verify a run directory (its checkpoint steps and exported models), a ``checkpoints/`` directory or a model.

    Returns (everything intact, report lines). Changes nothing.
    """
    from fcn_jax.training.checkpointing import TMP_SUFFIX, verify_step_dir

    path = Path(path).resolve()
    lines: list[str] = []
    ok = True

    def report(label: str, d: Path, problems: list[str]) -> None:
        nonlocal ok
        if problems:
            ok = False
            lines.append(f"DAMAGED  {label}  {d}")
            lines.extend(f"           {p}" for p in problems)
        else:
            lines.append(f"ok       {label}  {d}  ({integrity.total_size(d) / 2**20:.1f} MiB)")

    if (path / "model.json").is_file():
        report("model", path, integrity.verify(path))
        return ok, lines
    ckdir = path / "checkpoints" if (path / "checkpoints").is_dir() else path
    steps = sorted((int(p.name), p) for p in ckdir.iterdir() if p.is_dir() and p.name.isdigit()) \
        if ckdir.is_dir() else []
    for step, d in steps:
        report(f"step {step}", d, verify_step_dir(d))
    for p in sorted(ckdir.glob(f"*{TMP_SUFFIX}*")) if ckdir.is_dir() else []:
        lines.append(f"partial  {p.name}: an interrupted save, never used (removed at the next start)")
    models = [path / n for n in ("model_best", "model_final") if (path / n).is_dir()]
    for m in models:
        report(m.name, m, integrity.verify(m))
    damaged = path / "checkpoints_damaged"
    if damaged.is_dir():
        moved = sorted(p.name for p in damaged.iterdir() if p.is_dir())
        lines.append(f"note     {len(moved)} damaged step(s) set aside earlier in {damaged}: {moved}")
    if not steps and not models:
        ok = False
        lines.append(f"nothing to verify in {path}: no checkpoint steps, model_best/ or model_final/")
    return ok, lines


def seal_path(path: str | Path) -> list[str]:
    """Write integrity manifests where a trusted run directory / model lacks them (made before fcn_jax wrote them).

    Only directories *without* a manifest are sealed; one that has a manifest
    is never rewritten (that would bless damage). Returns what was sealed.
    """
    from fcn_jax.training.checkpointing import ORBAX_COMMIT_FILES

    path = Path(path).resolve()
    if (path / "model.json").is_file():
        targets = [(path, ())]
    else:
        ckdir = path / "checkpoints" if (path / "checkpoints").is_dir() else path
        targets = [(p, ORBAX_COMMIT_FILES) for p in sorted(ckdir.iterdir()) if p.is_dir() and p.name.isdigit()]
        targets += [(path / n, ()) for n in ("model_best", "model_final") if (path / n / "model.json").is_file()]
    sealed = []
    for d, unchecked in targets:
        if not (d / integrity.MANIFEST).exists():
            integrity.write_manifest(d, unchecked=unchecked)
            sealed.append(str(d))
    return sealed


def main(argv=None) -> int:
    import argparse

    ap = argparse.ArgumentParser(prog="python -m fcn_jax.checkpoint",
                                 description="Check fcn_jax checkpoints against their integrity data.")
    sub = ap.add_subparsers(dest="cmd", required=True)
    v = sub.add_parser("verify", help="verify a run directory, its checkpoints/ or a model directory")
    v.add_argument("paths", nargs="+")
    s = sub.add_parser("seal", help="add integrity data to checkpoints written before fcn_jax had it (trusted only!)")
    s.add_argument("paths", nargs="+")
    args = ap.parse_args(argv)
    if args.cmd == "seal":
        for p in args.paths:
            done = seal_path(p)
            print("\n".join(f"sealed   {d}" for d in done) or f"nothing to seal in {p}")
        return 0
    all_ok = True
    for p in args.paths:
        ok, lines = verify_path(p)
        all_ok &= ok
        print("\n".join(lines))
    print("all intact" if all_ok else "DAMAGED checkpoints found (see above)")
    return 0 if all_ok else 1


if __name__ == "__main__":
    import sys

    sys.exit(main())


def resolve_model_dir(path: str | Path) -> Path:
    """A model checkpoint dir, or a run dir (its ``model_best``, else ``model_final``)."""
    p = Path(path)
    if (p / "model.json").is_file():
        return p
    for name in ("model_best", "model_final"):
        if (p / name / "model.json").is_file():
            return p / name
    raise FileNotFoundError(
        f"{path}: neither a model checkpoint (model.json) nor a run directory with model_best/ or model_final/"
    )
