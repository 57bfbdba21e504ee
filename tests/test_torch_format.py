"""``fcn_jax.torch_format``: torch.save files read and written without PyTorch.

The fixtures in ``tests/fixtures`` are real ``torch.save`` files written once by
``make_torch_fixtures.py`` (whose NumPy recipes give the expected values here).
When PyTorch happens to be installed, reader and writer are also checked
against ``torch.save`` / ``torch.load(weights_only=True)``.
"""

import collections
import io
import os
import pickle
import struct
import sys
import zipfile
from pathlib import Path

import ml_dtypes
import numpy as np
import pytest

from fcn_jax import torch_format as tf
from tests.fixtures import make_torch_fixtures as fx

FIXTURES = Path(__file__).resolve().parent / "fixtures"


def assert_same(got, expected):
    assert isinstance(got, np.ndarray), type(got)
    assert got.dtype == expected.dtype and got.shape == expected.shape, (got.dtype, got.shape, expected.dtype)
    np.testing.assert_array_equal(got, expected)


# --------------------------------------------------------------------------- #
# Reading real torch.save files (no torch needed)
# --------------------------------------------------------------------------- #


@pytest.mark.parametrize("name", ["afno_tiny.ckpt", "afno_tiny_legacy.ckpt"])
def test_original_layout_fixture(name):
    ckpt = tf.load(FIXTURES / name)
    assert list(ckpt) == ["iters", "epoch", "model_state", "optimizer_state_dict"]
    assert ckpt["iters"] == 12345 and ckpt["epoch"] == 7
    state, sd = ckpt["model_state"], fx.tiny_state_dict()
    assert isinstance(state, collections.OrderedDict)
    assert [k for k in state if k != "module.ged"] == ["module." + k for k in sd]
    for k, v in sd.items():
        assert_same(state["module." + k], v)
    assert_same(state["module.ged"], np.zeros(3, np.float32))
    opt = ckpt["optimizer_state_dict"]
    assert opt["param_groups"][0]["betas"] == (0.9, 0.999) and opt["param_groups"][0]["params"] == list(range(len(sd)))
    for i, v in enumerate(sd.values()):
        assert opt["state"][i]["step"] == 17
        assert_same(opt["state"][i]["exp_avg_sq"], np.full(v.shape, 0.25, np.float32))


def test_dtypes_fixture():
    ckpt = tf.load(FIXTURES / "dtypes.ckpt")
    for k, v in fx.dtype_tensors().items():
        if k == "bfloat16":
            v = v.astype(ml_dtypes.bfloat16)
        assert_same(ckpt["tensors"][k], v)
    assert_same(ckpt["parameter"], np.ones((2, 2), np.float32))  # torch.nn.Parameter -> its data
    assert ckpt["values"] == fx.PLAIN_VALUES


@pytest.mark.parametrize("name", ["views.ckpt", "views_legacy.ckpt"])
def test_views_fixture_non_contiguous_and_shared_storage(name):
    got = tf.load(FIXTURES / name)
    expected = fx.view_tensors(fx.view_base())
    assert list(got) == list(expected)
    for k, v in expected.items():
        assert_same(got[k], np.ascontiguousarray(v))
        assert got[k].flags.c_contiguous and got[k].flags.writeable and got[k].flags.owndata
    got["base"][0, 0] = -1  # outputs own their memory: no aliasing between entries
    assert got["transposed"][0, 0] == 0


def test_malicious_fixture_is_refused_and_never_runs(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # the payload would create PWNED_BY_PICKLE in the working directory
    with pytest.raises(tf.ForbiddenGlobalError, match=r"evil_exec\.ckpt.*'builtins\.exec'.*Nothing.*executed") as e:
        tf.load(FIXTURES / "evil_exec.ckpt")
    assert e.value.global_name == "builtins.exec"
    assert not (tmp_path / fx.EVIL_MARKER).exists()
    # the payload is live: an unrestricted unpickler runs it
    with zipfile.ZipFile(FIXTURES / "evil_exec.ckpt") as zf:
        data = zf.read(next(n for n in zf.namelist() if n.endswith("/data.pkl")))
    class Unsafe(pickle.Unpickler):  # a subclass: Python 3.13 made an instance's persistent_load read-only
        def persistent_load(self, pid):
            return None

    unsafe = Unsafe(io.BytesIO(data))
    try:
        unsafe.load()
    except Exception:  # fails later (torch absent, or a None storage); the payload came first
        pass
    assert (tmp_path / fx.EVIL_MARKER).is_dir()


# --------------------------------------------------------------------------- #
# Refusal of everything that is not data (pickles made here, no torch needed)
# --------------------------------------------------------------------------- #


class _Reduce:
    def __init__(self, fn, args):
        self.fn, self.args = fn, args

    def __reduce__(self):
        return (self.fn, self.args)


def _zip_with_pickle(path, obj=None, data=None):
    """A torch-style zip archive whose data.pkl is ``pickle.dumps(obj)`` (or the given bytes)."""
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr("archive/data.pkl", data if data is not None else pickle.dumps(obj, protocol=2))
        zf.writestr("archive/version", "3\n")
    return path


def _legacy_with_pickles(path, *objs):
    with open(path, "wb") as f:
        for o in objs:
            pickle.dump(o, f, protocol=2)
    return path


def _payloads(marker):
    m = str(marker)
    return {
        "os.mkdir": (_Reduce(os.mkdir, (m,)), f"{os.mkdir.__module__}.mkdir"),
        "os.system": (_Reduce(os.system, (f"mkdir {m}",)), f"{os.system.__module__}.system"),
        "eval": (_Reduce(eval, (f"__import__('os').mkdir({m!r})",)), "builtins.eval"),
        "getattr": (_Reduce(getattr, ("x", "upper")), "builtins.getattr"),
        "numpy": (np.zeros(2), "numpy"),  # numpy's own pickles are not tensors either
        "class": (collections.deque([1]), "collections.deque"),
    }


@pytest.mark.parametrize("payload", ["os.mkdir", "os.system", "eval", "getattr", "numpy", "class"])
@pytest.mark.parametrize("fmt", ["zip", "legacy_first", "legacy_object"])
def test_forbidden_globals_are_named_and_never_run(tmp_path, payload, fmt):
    marker = tmp_path / "code_ran"
    obj, name = _payloads(marker)[payload]
    evil = {"model_state": {}, "optimizer_state_dict": {"extra": obj}}
    path = tmp_path / "evil.ckpt"
    if fmt == "zip":
        _zip_with_pickle(path, evil)
    elif fmt == "legacy_first":  # in place of the magic number: refused before any header check
        _legacy_with_pickles(path, evil)
    else:
        _legacy_with_pickles(path, 0x1950A86A20F9469CFC6C, 1001, {"little_endian": True}, evil, [])
    with pytest.raises(tf.ForbiddenGlobalError, match=str(path).replace(".", r"\.") + ".*refused.*'" + name) as e:
        tf.load(path)
    assert e.value.global_name.startswith(name)
    assert not marker.exists()
    if payload == "os.mkdir":  # live payload: plain pickle would have run it
        pickle.loads(pickle.dumps(obj, protocol=2))
        assert marker.is_dir()


def test_plain_containers_are_accepted(tmp_path):
    # what torch's own weights_only loader also allows; protocol 2 names them __builtin__.set etc.
    obj = {"s": {1, 2}, "f": frozenset({"a"}), "c": collections.Counter(a=3), "o": collections.OrderedDict(x=1.5)}
    got = tf.load(_zip_with_pickle(tmp_path / "plain.ckpt", obj))
    assert got == obj and type(got["c"]) is collections.Counter and type(got["o"]) is collections.OrderedDict


def test_tensor_subclass_rebuild_and_hooks_are_refused(tmp_path):
    # _rebuild_from_type_v2 (tensor subclasses) is not on the list
    bad = tmp_path / "sub.ckpt"
    data = b"\x80\x02ctorch._tensor\n_rebuild_from_type_v2\n)R."
    _zip_with_pickle(bad, data=data)
    with pytest.raises(tf.ForbiddenGlobalError, match="torch._tensor._rebuild_from_type_v2"):
        tf.load(bad)


def test_storage_type_is_not_callable(tmp_path):
    path = _zip_with_pickle(tmp_path / "s.ckpt", data=b"\x80\x02ctorch\nFloatStorage\n)R.")
    with pytest.raises(tf.TorchFormatError, match="corrupt pickle"):
        tf.load(path)


# --------------------------------------------------------------------------- #
# Damaged or hostile tensor data
# --------------------------------------------------------------------------- #


def _write_records(path, obj, edit=None):
    """``tf.save(obj)`` then rewrite the archive, letting ``edit(name, bytes)`` change records."""
    src = path.with_name("src.ckpt")
    tf.save(obj, src)
    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(path, "w") as zout:
        for n in zin.namelist():
            data = zin.read(n)
            if edit is not None:
                data = edit(n, data)
            if data is not None:
                zout.writestr(n, data)
    src.unlink()
    return path


@pytest.mark.parametrize("offset,size,stride", [(0, (4, 7), (7, 1)), (20, (5,), (1,)), (0, (3, 3), (12, 1)),
                                                (25, (1,), (1,))])
def test_views_outside_their_storage_are_refused(tmp_path, offset, size, stride):
    rec = tf._TensorRecord("0", "FloatStorage", 24, offset, size, stride)
    em = tf._Emitter()
    path = tmp_path / "oob.ckpt"
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr("archive/data.pkl", em.dump({"w": rec}))
        zf.writestr("archive/data/0", np.arange(24, dtype=np.float32).tobytes())
    with pytest.raises(tf.TorchFormatError, match=r"oob\.ckpt.*tensor view.*storage '0', which has 24 elements"):
        tf.load(path)


def test_a_view_inside_its_storage_is_read(tmp_path):
    rec = tf._TensorRecord("0", "FloatStorage", 24, 3, (2, 3), (1, 5))
    em = tf._Emitter()
    path = tmp_path / "v.ckpt"
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr("archive/data.pkl", em.dump({"w": rec}))
        zf.writestr("archive/data/0", np.arange(24, dtype=np.float32).tobytes())
    assert_same(tf.load(path)["w"], np.array([[3, 8, 13], [4, 9, 14]], np.float32))


def test_truncated_storage_and_missing_records(tmp_path):
    obj = {"w": np.arange(6, dtype=np.float32)}
    short = _write_records(tmp_path / "short.ckpt", obj, lambda n, d: d[:-4] if n.endswith("data/0") else d)
    with pytest.raises(tf.TorchFormatError, match=r"short\.ckpt.*'archive/data/0' has 20 bytes, expected 6 x 4"):
        tf.load(short)
    gone = _write_records(tmp_path / "gone.ckpt", obj, lambda n, d: None if n.endswith("data/0") else d)
    with pytest.raises(tf.TorchFormatError, match=r"gone\.ckpt.*'archive/data/0' is missing"):
        tf.load(gone)
    nopkl = _write_records(tmp_path / "nopkl.ckpt", obj, lambda n, d: None if n.endswith("data.pkl") else d)
    with pytest.raises(tf.TorchFormatError, match=r"nopkl\.ckpt.*not a torch\.save archive"):
        tf.load(nopkl)
    cut = _write_records(tmp_path / "cut.ckpt", obj, lambda n, d: d[:-5] if n.endswith("data.pkl") else d)
    with pytest.raises(tf.TorchFormatError, match=r"cut\.ckpt.*corrupt pickle"):
        tf.load(cut)


def test_big_endian_archive(tmp_path):
    values = {"f": np.array([1.5, -2.0], np.float32), "bf": np.array([0.5, 3.0], ml_dtypes.bfloat16),
              "i": np.array([1, -(2**40)], np.int64), "u": np.array([1, 255], np.uint8)}
    order = {"0": "f", "1": "bf", "2": "i", "3": "u"}

    def to_big(name, data):
        if name.endswith("byteorder"):
            return b"big"
        if "/data/" in name:
            return values[order[name.rsplit("/", 1)[1]]].byteswap().tobytes()
        return data

    got = tf.load(_write_records(tmp_path / "be.ckpt", values, to_big))
    for k, v in values.items():
        assert_same(got[k], v)


def test_junk_legacy_and_missing_files(tmp_path):
    junk = tmp_path / "junk.ckpt"
    junk.write_bytes(b"this is not a torch file")
    with pytest.raises(tf.TorchFormatError, match=r"junk\.ckpt"):
        tf.load(junk)
    magic = _legacy_with_pickles(tmp_path / "magic.ckpt", 1234)
    with pytest.raises(tf.TorchFormatError, match=r"magic\.ckpt.*bad magic number"):
        tf.load(magic)
    cut = tmp_path / "cut_legacy.ckpt"
    cut.write_bytes((FIXTURES / "views_legacy.ckpt").read_bytes()[:-10])
    with pytest.raises(tf.TorchFormatError, match=r"cut_legacy\.ckpt.*file ends inside storage"):
        tf.load(cut)
    with pytest.raises(FileNotFoundError, match=r"nope\.ckpt"):
        tf.load(tmp_path / "nope.ckpt")


# --------------------------------------------------------------------------- #
# Writing (no torch needed): round trip, layout, alignment, atomicity
# --------------------------------------------------------------------------- #


def _everything():
    a = np.arange(12, dtype=np.float32).reshape(3, 4)
    arrays = {k: v for k, v in fx.dtype_tensors().items()}
    arrays["bfloat16"] = arrays["bfloat16"].astype(ml_dtypes.bfloat16)
    arrays["complex128"] = np.array([1j, 2], np.complex128)
    return {
        "iters": 3, "lr": 1e-4, "name": "précip", "none": None, "flags": [True, False],
        "ints": (0, 255, 256, -1, 2**31, -(2**31) - 1, 2**70, -(2**70)),
        "arrays": arrays,
        "model_state": collections.OrderedDict([("b", a), ("a", a.T), ("same", a), ("big_endian", a.astype(">f8"))]),
        "nested": {1: [{"x": (np.float32(0.5), np.int64(3))}], 2: []},
    }


def _expected(x):
    if isinstance(x, np.ndarray):
        return np.array(x, dtype=x.dtype.newbyteorder("="), order="C")
    if isinstance(x, np.generic):
        return x.item()
    if isinstance(x, dict):
        return type(x)((k, _expected(v)) for k, v in x.items())
    if isinstance(x, (list, tuple)):
        return type(x)(_expected(v) for v in x)
    return x


def _assert_tree_equal(got, expected):
    assert type(got) is type(expected), (type(got), type(expected))
    if isinstance(expected, np.ndarray):
        assert_same(got, expected)
    elif isinstance(expected, dict):
        assert list(got) == list(expected)
        for k in expected:
            _assert_tree_equal(got[k], expected[k])
    elif isinstance(expected, (list, tuple)):
        assert len(got) == len(expected)
        for g, e in zip(got, expected):
            _assert_tree_equal(g, e)
    else:
        assert got == expected


def test_save_load_round_trip(tmp_path):
    obj = _everything()
    path = tmp_path / "rt.ckpt"
    tf.save(obj, path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["rt.ckpt"]
    _assert_tree_equal(tf.load(path), _expected(obj))


def _data_offsets(path):
    """Where each record's bytes start in the file (from the local headers)."""
    out = {}
    raw = path.read_bytes()
    with zipfile.ZipFile(path) as zf:
        for info in zf.infolist():
            sig, *_ = struct.unpack_from("<4s", raw, info.header_offset)
            assert sig == b"PK\x03\x04"
            n, m = struct.unpack_from("<HH", raw, info.header_offset + 26)
            out[info.filename] = (info.header_offset + 30 + n + m, info.compress_type)
    return out


def test_written_layout_is_what_torch_reads(tmp_path):
    path = tmp_path / "layout.ckpt"
    tf.save(_everything(), path)
    offsets = _data_offsets(path)
    with zipfile.ZipFile(path) as zf:
        assert zf.read("archive/version") == b"3\n" and zf.read("archive/byteorder") == b"little"
        assert zf.read("archive/.storage_alignment") == b"64"
        assert zf.read("archive/data.pkl")[:2] == b"\x80\x02"  # pickle protocol 2, as torch.save writes
        storages = [n for n in zf.namelist() if n.startswith("archive/data/")]
    # one storage per distinct array ("same" is the "b" array again): 14 + 3
    assert len(storages) == len(_everything()["arrays"]) + 3
    for name, (offset, compression) in offsets.items():
        assert compression == zipfile.ZIP_STORED, name
        if name in storages:
            assert offset % tf.ALIGNMENT == 0, (name, offset)
    got = tf.load(path)["model_state"]
    assert_same(got["same"], got["b"])


def test_unsupported_objects_are_named_and_nothing_is_written(tmp_path):
    path = tmp_path / "keep.ckpt"
    path.write_bytes(b"old contents")
    cases = [
        ({"model_state": {"w": np.array(["a"], dtype=object)}}, r"obj\['model_state'\]\['w'\].*dtype object"),
        ({"x": b"bytes"}, r"obj\['x'\].*bytes"),
        ({"x": {1.5: 2}}, r"key 1\.5"),
        ({"x": [collections.deque()]}, r"obj\['x'\]\[0\].*deque"),
        ({"x": collections.Counter(a=1)}, r"Counter"),
        ({"x": np.array([1], np.uint16)}, r"dtype uint16 has no torch storage type"),
    ]
    for obj, msg in cases:
        with pytest.raises(tf.TorchFormatError, match=msg):
            tf.save(obj, path)
        assert path.read_bytes() == b"old contents"
        assert sorted(p.name for p in tmp_path.iterdir()) == ["keep.ckpt"]


def test_failed_write_keeps_the_old_file(tmp_path, monkeypatch):
    path = tmp_path / "keep.ckpt"
    tf.save({"w": np.ones(3, np.float32)}, path)
    before = path.read_bytes()

    def boom(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr(tf, "_write_entry", boom)
    with pytest.raises(OSError, match="disk full"):
        tf.save({"w": np.zeros(3, np.float32)}, path)
    assert path.read_bytes() == before and sorted(p.name for p in tmp_path.iterdir()) == ["keep.ckpt"]


def test_works_with_torch_unimportable(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "torch", None)  # `import torch` now raises ImportError
    tf.save(_everything(), tmp_path / "x.ckpt")
    _assert_tree_equal(tf.load(tmp_path / "x.ckpt"), _expected(_everything()))
    assert tf.load(FIXTURES / "afno_tiny.ckpt")["epoch"] == 7


# --------------------------------------------------------------------------- #
# Cross-checks against PyTorch itself (only where torch is installed)
# --------------------------------------------------------------------------- #


def _torch_to_numpy(torch, x):
    if isinstance(x, torch.Tensor):
        if x.dtype == torch.bfloat16:
            return x.float().numpy().astype(ml_dtypes.bfloat16)
        return x.detach().numpy().copy()
    if isinstance(x, dict):
        return type(x)((k, _torch_to_numpy(torch, v)) for k, v in x.items())
    if isinstance(x, (list, tuple)):
        return type(x)(_torch_to_numpy(torch, v) for v in x)
    return x


@pytest.mark.parametrize("name", sorted(p.name for p in FIXTURES.glob("*.ckpt") if "evil" not in p.name))
def test_reader_equals_torch_load_on_fixtures(name):
    torch = pytest.importorskip("torch")
    expected = _torch_to_numpy(torch, torch.load(FIXTURES / name, map_location="cpu", weights_only=True))
    got = tf.load(FIXTURES / name)
    _assert_tree_equal(got, expected)


def test_torch_refuses_the_malicious_fixture_too(tmp_path, monkeypatch):
    torch = pytest.importorskip("torch")
    monkeypatch.chdir(tmp_path)
    with pytest.raises(pickle.UnpicklingError, match="exec"):
        torch.load(FIXTURES / "evil_exec.ckpt", weights_only=True)
    assert not (tmp_path / fx.EVIL_MARKER).exists()


@pytest.mark.parametrize("mmap", [False, True])
def test_torch_load_reads_what_we_write(tmp_path, mmap):
    torch = pytest.importorskip("torch")
    obj = _everything()
    path = tmp_path / "ours.ckpt"
    tf.save(obj, path)
    loaded = torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)  # mmap needs aligned storages
    assert loaded["model_state"]["b"].dtype == torch.float32 and loaded["arrays"]["bfloat16"].dtype == torch.bfloat16
    assert loaded["model_state"]["b"].untyped_storage().data_ptr() == loaded["model_state"]["same"].untyped_storage().data_ptr()
    assert not loaded["model_state"]["b"].requires_grad
    _assert_tree_equal(_torch_to_numpy(torch, loaded), _expected(obj))


def test_reader_equals_torch_on_fresh_torch_save(tmp_path):
    torch = pytest.importorskip("torch")
    g = torch.Generator().manual_seed(0)
    base = torch.randn(5, 7, generator=g)
    obj = {"views": {"t": base.t(), "narrow": base.narrow(1, 2, 3), "exp": base[0:1].expand(4, 7),
                     "diag": base.diagonal()},
           "half": base.half(), "bf16": base.bfloat16(), "long": torch.arange(5), "param": torch.nn.Parameter(base)}
    for legacy in (False, True):
        path = tmp_path / f"fresh_{legacy}.ckpt"
        torch.save(obj, path, _use_new_zipfile_serialization=not legacy)
        expected = _torch_to_numpy(torch, torch.load(path, weights_only=True))
        _assert_tree_equal(tf.load(path), expected)
