"""Read and write PyTorch ``torch.save`` files without PyTorch (NumPy arrays in and out).

``load(path)`` returns the saved object with every tensor as a NumPy array
(bfloat16 via ``ml_dtypes``); ``save(obj, path)`` writes nested dicts, lists,
tuples, scalars, strings and NumPy arrays so that ``torch.load(path,
weights_only=True)`` of current PyTorch reads them as tensors.

Why our own: no maintained library reads ``.ckpt`` pickles into NumPy behind an
allow-list and writes them back (``safetensors`` has its own format;
``fickling``/``picklescan`` only analyse pickles; ``tinygrad``'s loader
returns its own tensors and imports any other global it meets).

Safety (the promise of ``weights_only=True``): the pickle is decoded by an
``Unpickler`` whose ``find_class`` knows only the tensor rebuild functions, the
storage type names and a few plain containers (``_ALLOWED``). Any other global
raises :class:`ForbiddenGlobalError` naming it, before anything from the file is
called. Tensor views are bounds-checked against their storage.

Formats read:

* zip (``torch.save`` since PyTorch 1.6; what the FourCastNet checkpoints use,
  model spec §8): ``<archive>/data.pkl`` (pickle with persistent ids
  ``('storage', StorageType, key, location, numel)``), ``<archive>/data/<key>``
  (raw storage bytes), ``<archive>/byteorder`` (absent: little endian).
* legacy (before 1.6, or ``_use_new_zipfile_serialization=False``): five
  consecutive pickles (magic number, protocol version, system info, the object,
  the storage keys), then each storage as a little-endian int64 element count
  and its bytes.

Written: the zip layout with ``data.pkl`` in pickle protocol 2 (what
``torch.save`` uses), ``version`` 3, ``byteorder`` ``little``,
``.storage_alignment`` 64 and every storage's bytes starting at a multiple of 64
in the file (so ``torch.load(..., mmap=True)`` maps them in place). One storage
per distinct array object; arrays are written C-contiguous.
"""

from __future__ import annotations

import _compat_pickle
import collections
import io
import os
import pickle
import struct
import sys
import zipfile
from pathlib import Path
from typing import Any

import ml_dtypes
import numpy as np

from fcn_jax.errors import InputError

__all__ = ["TorchFormatError", "ForbiddenGlobalError", "load", "save"]


class TorchFormatError(InputError):
    """A file is not a readable ``torch.save`` file, or an object cannot be written as one."""


class ForbiddenGlobalError(TorchFormatError):
    """The pickle names a global outside the allow-list (possible code execution refused)."""

    def __init__(self, message: str, global_name: str):
        super().__init__(message)
        self.global_name = global_name


# --------------------------------------------------------------------------- #
# dtypes: torch storage type name <-> NumPy dtype (little endian)
# --------------------------------------------------------------------------- #

_STORAGE_DTYPES: dict[str, np.dtype] = {
    "DoubleStorage": np.dtype("<f8"),
    "FloatStorage": np.dtype("<f4"),
    "HalfStorage": np.dtype("<f2"),
    "BFloat16Storage": np.dtype(ml_dtypes.bfloat16),
    "LongStorage": np.dtype("<i8"),
    "IntStorage": np.dtype("<i4"),
    "ShortStorage": np.dtype("<i2"),
    "CharStorage": np.dtype("i1"),
    "ByteStorage": np.dtype("u1"),
    "BoolStorage": np.dtype("?"),
    "ComplexFloatStorage": np.dtype("<c8"),
    "ComplexDoubleStorage": np.dtype("<c16"),
    "UntypedStorage": np.dtype("u1"),  # raw bytes (a storage saved on its own)
}
_DTYPE_STORAGES: dict[np.dtype, str] = {dt: name for name, dt in _STORAGE_DTYPES.items() if name != "UntypedStorage"}


class _StorageType:
    """What ``torch.FloatStorage`` etc. unpickle to: a dtype tag, not callable."""

    __slots__ = ("name", "dtype")

    def __init__(self, name: str):
        self.name = name
        self.dtype = _STORAGE_DTYPES[name]

    def __repr__(self):
        return f"torch.{self.name}"


class _Storage:
    """A storage (flat typed buffer) referenced by persistent id; data may arrive later (legacy)."""

    __slots__ = ("key", "dtype", "numel", "data", "base", "offset")

    def __init__(self, key: str, dtype: np.dtype, numel: int, base: "_Storage | None" = None, offset: int = 0):
        self.key, self.dtype, self.numel = key, dtype, numel
        self.data: np.ndarray | None = None
        self.base, self.offset = base, offset  # legacy storage views

    def array(self) -> np.ndarray:
        if self.base is not None:
            return self.base.array()[self.offset: self.offset + self.numel]
        if self.data is None:
            raise TorchFormatError(f"storage {self.key!r} has no data in the file")
        return self.data


class _PendingTensor:
    """A tensor view (storage, offset, size, stride), materialised once all storages are read."""

    __slots__ = ("storage", "offset", "size", "stride")

    def __init__(self, storage, offset, size, stride):
        self.storage, self.offset, self.size, self.stride = storage, offset, size, stride


def _is_int(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _rebuild_tensor_v2(storage, storage_offset, size, stride, requires_grad, backward_hooks, metadata=None):
    if not isinstance(storage, _Storage):
        raise TorchFormatError(f"tensor rebuild got a {type(storage).__name__} instead of a storage")
    if not (_is_int(storage_offset) and storage_offset >= 0):
        raise TorchFormatError(f"tensor storage offset {storage_offset!r} is not a non-negative int")
    size, stride = tuple(size), tuple(stride)
    if len(size) != len(stride) or not all(_is_int(n) and n >= 0 for n in size + stride):
        raise TorchFormatError(f"tensor size {size} / stride {stride} are not non-negative ints of equal length")
    if not isinstance(requires_grad, bool):
        raise TorchFormatError(f"tensor requires_grad {requires_grad!r} is not a bool")
    if backward_hooks:  # hooks are functions: never data
        raise TorchFormatError("tensor carries backward hooks; only plain tensors are accepted")
    if metadata:  # e.g. conjugate/negative bits: the bytes alone would be the wrong values
        raise TorchFormatError(f"tensor carries metadata {metadata!r}; only plain tensors are accepted")
    return _PendingTensor(storage, storage_offset, size, stride)


def _rebuild_parameter(data, requires_grad, backward_hooks, state=None):
    if not isinstance(data, _PendingTensor):
        raise TorchFormatError(f"parameter rebuild got a {type(data).__name__} instead of a tensor")
    if backward_hooks or state:
        raise TorchFormatError("parameter carries hooks or extra state; only plain tensors are accepted")
    return data


#: Every global a state dict of tensors needs (plus plain containers torch's own
#: weights_only loader also allows). Anything else is refused by name.
_ALLOWED: dict[tuple[str, str], Any] = {
    ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor_v2,
    ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
    ("torch._utils", "_rebuild_parameter_with_state"): _rebuild_parameter,
    ("collections", "OrderedDict"): collections.OrderedDict,
    ("collections", "Counter"): collections.Counter,
    ("builtins", "set"): set,
    ("builtins", "frozenset"): frozenset,
    **{("torch", name): _StorageType(name) for name in _STORAGE_DTYPES},
}


class _RestrictedUnpickler(pickle.Unpickler):
    def __init__(self, file, source: str, persistent_load):
        super().__init__(file)
        self._source = source
        self._persistent = persistent_load

    def find_class(self, module, name):
        # protocol 2 spells some globals the Python 2 way (__builtin__.set): the names pickle itself maps
        if (module, name) in _compat_pickle.NAME_MAPPING:
            module, name = _compat_pickle.NAME_MAPPING[(module, name)]
        elif module in _compat_pickle.IMPORT_MAPPING:
            module = _compat_pickle.IMPORT_MAPPING[module]
        try:
            return _ALLOWED[(module, name)]
        except (KeyError, TypeError):
            pass
        raise ForbiddenGlobalError(
            f"{self._source}: refused to load global '{module}.{name}': only tensors, their storages and "
            "plain containers (dict, OrderedDict, list, tuple, set, numbers, strings) are accepted. "
            "Nothing from the file was executed.",
            f"{module}.{name}",
        )

    def persistent_load(self, pid):
        return self._persistent(pid)


def _unpickle(file, source: str, persistent_load=None):
    def refuse(pid):
        raise TorchFormatError(f"{source}: unexpected persistent id {pid!r}")

    try:
        return _RestrictedUnpickler(file, source, persistent_load or refuse).load()
    except TorchFormatError:
        raise
    except Exception as e:  # truncated/corrupt pickle, or data misused by a rebuild call
        raise TorchFormatError(f"{source}: corrupt pickle data ({type(e).__name__}: {e})") from None


def _storage_pid(pid, source: str) -> tuple[_StorageType, str, int, Any]:
    if not (isinstance(pid, tuple) and len(pid) in (5, 6) and pid[0] in ("storage", b"storage")):
        raise TorchFormatError(f"{source}: unexpected persistent id {pid!r}")
    _, stype, key, _location, numel, *view = pid
    if not isinstance(stype, _StorageType):
        raise TorchFormatError(f"{source}: storage type {stype!r} is not a torch storage type")
    if isinstance(key, bytes):
        key = key.decode("ascii")
    if not (isinstance(key, str) and _is_int(numel) and numel >= 0):
        raise TorchFormatError(f"{source}: malformed storage id {pid!r}")
    return stype, key, numel, (view[0] if view else None)


def _materialise(obj, source: str):
    """Replace every pending tensor in ``obj`` (nested containers) by an owned NumPy array."""
    if isinstance(obj, _PendingTensor):
        base = obj.storage.array()
        if 0 in obj.size:
            return np.zeros(obj.size, base.dtype)
        last = obj.offset + sum((n - 1) * s for n, s in zip(obj.size, obj.stride))
        if last >= base.size:
            raise TorchFormatError(
                f"{source}: tensor view (offset {obj.offset}, size {obj.size}, stride {obj.stride}) reaches "
                f"element {last} of storage {obj.storage.key!r}, which has {base.size} elements"
            )
        view = np.lib.stride_tricks.as_strided(
            base[obj.offset:], obj.size, tuple(s * base.itemsize for s in obj.stride), writeable=False
        )
        return np.array(view, order="C")  # own, C-contiguous, writable memory (views of one storage no longer alias)
    if isinstance(obj, dict):
        out = type(obj)() if type(obj) in (dict, collections.OrderedDict, collections.Counter) else {}
        for k, v in obj.items():
            out[k] = _materialise(v, source)
        return out
    if isinstance(obj, list):
        return [_materialise(v, source) for v in obj]
    if isinstance(obj, tuple):
        return tuple(_materialise(v, source) for v in obj)
    if isinstance(obj, (set, frozenset)):
        if any(isinstance(v, _PendingTensor) for v in obj):
            raise TorchFormatError(f"{source}: a set holds tensors, which have no value equality")
        return obj
    if isinstance(obj, (_Storage, _StorageType)):
        raise TorchFormatError(f"{source}: a bare storage outside a tensor is not supported")
    return obj


def _to_native(raw: np.ndarray, file_byteorder: str) -> np.ndarray:
    if raw.dtype.itemsize > 1 and file_byteorder != sys.byteorder:
        return raw.byteswap()
    return raw


# --------------------------------------------------------------------------- #
# Reading
# --------------------------------------------------------------------------- #


def _load_zip(path: Path, zf: zipfile.ZipFile):
    src = str(path)
    pkls = [n for n in zf.namelist() if n.endswith("/data.pkl") and n.count("/") == 1]
    if len(pkls) != 1:
        raise TorchFormatError(f"{src}: a zip file but not a torch.save archive (no single <archive>/data.pkl)")
    prefix = pkls[0][: -len("data.pkl")]
    names = set(zf.namelist())
    byteorder = "little"
    if prefix + "byteorder" in names:
        byteorder = zf.read(prefix + "byteorder").decode("ascii", "replace").strip()
        if byteorder not in ("little", "big"):
            raise TorchFormatError(f"{src}: byteorder record is {byteorder!r}, expected 'little' or 'big'")
    storages: dict[str, _Storage] = {}

    def persistent_load(pid):
        stype, key, numel, _ = _storage_pid(pid, src)
        if key in storages:
            st = storages[key]
            if st.dtype != stype.dtype:
                raise TorchFormatError(f"{src}: storage {key!r} is used as both {st.dtype} and {stype.dtype}")
            return st
        name = f"{prefix}data/{key}"
        if name not in names:
            raise TorchFormatError(f"{src}: storage record {name!r} is missing")
        raw = zf.read(name)
        if len(raw) != numel * stype.dtype.itemsize:
            raise TorchFormatError(
                f"{src}: storage record {name!r} has {len(raw)} bytes, expected {numel} x {stype.dtype.itemsize}"
            )
        st = _Storage(key, stype.dtype, numel)
        st.data = _to_native(np.frombuffer(raw, stype.dtype), byteorder)
        storages[key] = st
        return st

    with zf.open(pkls[0]) as f:
        obj = _unpickle(io.BytesIO(f.read()), src, persistent_load)
    return _materialise(obj, src)


_LEGACY_MAGIC = 0x1950A86A20F9469CFC6C
_LEGACY_PROTOCOL = 1001


def _load_legacy(path: Path, f):
    src = str(path)
    if _unpickle(f, src) != _LEGACY_MAGIC:
        raise TorchFormatError(f"{src}: neither a torch.save zip archive nor a legacy torch.save file (bad magic number)")
    if (proto := _unpickle(f, src)) != _LEGACY_PROTOCOL:
        raise TorchFormatError(f"{src}: legacy torch.save protocol {proto!r}, only {_LEGACY_PROTOCOL} is known")
    _unpickle(f, src)  # system info; storages are little endian whatever it says
    roots: dict[str, _Storage] = {}
    views: dict[str, _Storage] = {}

    def persistent_load(pid):
        stype, key, numel, view = _storage_pid(pid, src)
        root = roots.setdefault(key, _Storage(key, stype.dtype, numel))
        if root.dtype != stype.dtype or root.numel != numel:
            raise TorchFormatError(f"{src}: storage {key!r} is declared twice with different dtype or size")
        if view is None:
            return root
        try:
            view_key, offset, view_numel = view
        except (TypeError, ValueError):
            raise TorchFormatError(f"{src}: malformed storage view {view!r}") from None
        if not (_is_int(offset) and _is_int(view_numel) and 0 <= offset and offset + view_numel <= numel):
            raise TorchFormatError(f"{src}: storage view {view!r} lies outside storage {key!r} ({numel} elements)")
        return views.setdefault(str(view_key), _Storage(str(view_key), stype.dtype, view_numel, root, offset))

    obj = _unpickle(f, src, persistent_load)
    keys = _unpickle(f, src)
    if not (isinstance(keys, list) and all(isinstance(k, str) for k in keys)):
        raise TorchFormatError(f"{src}: legacy storage key list is malformed: {keys!r}")
    for key in keys:
        if key not in roots:
            raise TorchFormatError(f"{src}: storage {key!r} is listed but not used by any tensor")
        st = roots[key]
        head = f.read(8)
        if len(head) != 8:
            raise TorchFormatError(f"{src}: file ends before storage {key!r}")
        (numel,) = struct.unpack("<q", head)
        if numel != st.numel:
            raise TorchFormatError(f"{src}: storage {key!r} holds {numel} elements, its tensors expect {st.numel}")
        raw = f.read(numel * st.dtype.itemsize)
        if len(raw) != numel * st.dtype.itemsize:
            raise TorchFormatError(f"{src}: file ends inside storage {key!r}")
        st.data = np.frombuffer(raw, st.dtype.newbyteorder("<") if st.dtype.itemsize > 1 else st.dtype)
        st.data = st.data.astype(st.dtype, copy=False)  # to native order
    return _materialise(obj, src)


def load(path: str | os.PathLike) -> Any:
    """The object saved in a ``torch.save`` file, tensors as NumPy arrays; no pickled code runs.

    Raises ``FileNotFoundError`` for a missing file, :class:`ForbiddenGlobalError`
    (naming the global) for anything but tensors and plain containers, and
    :class:`TorchFormatError` for a file that is not a readable ``torch.save`` file.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    if zipfile.is_zipfile(path):
        try:
            with zipfile.ZipFile(path) as zf:
                return _load_zip(path, zf)
        except zipfile.BadZipFile as e:
            raise TorchFormatError(f"{path}: damaged zip archive ({e})") from None
    with open(path, "rb") as f:  # buffered: the unpickler stops exactly at each pickle's end
        return _load_legacy(path, f)


# --------------------------------------------------------------------------- #
# Writing: protocol-2 pickle emitted opcode by opcode (no torch to import)
# --------------------------------------------------------------------------- #


class _TensorRecord:
    """A tensor as the writer emits it: a view into storage ``key`` (tests build odd ones)."""

    __slots__ = ("key", "storage_name", "numel", "offset", "size", "stride")

    def __init__(self, key, storage_name, numel, offset, size, stride):
        self.key, self.storage_name, self.numel = key, storage_name, numel
        self.offset, self.size, self.stride = offset, size, stride


class _Emitter:
    def __init__(self):
        self.out = io.BytesIO()
        self.storages: dict[int, tuple[str, np.ndarray]] = {}  # id(array) -> (key, contiguous LE array)
        self._keep: list = []  # keep arrays alive so ids stay unique

    def w(self, b: bytes):
        self.out.write(b)

    def glob(self, module: str, name: str):
        self.w(b"c" + module.encode() + b"\n" + name.encode() + b"\n")

    def dump(self, obj) -> bytes:
        self.w(b"\x80\x02")  # PROTO 2
        self.obj(obj, "obj")
        self.w(b".")
        return self.out.getvalue()

    def obj(self, x, where: str):
        if x is None:
            self.w(b"N")
        elif x is True or x is False:
            self.w(b"\x88" if x else b"\x89")
        elif isinstance(x, np.ndarray):
            self.tensor(self.record(x, where))
        elif isinstance(x, _TensorRecord):
            self.tensor(x)
        elif isinstance(x, (np.bool_, np.integer, np.floating)):
            self.obj(x.item(), where)
        elif isinstance(x, int):
            if 0 <= x < 256:
                self.w(b"K" + bytes([x]))
            elif -(2**31) <= x < 2**31:
                self.w(b"J" + struct.pack("<i", x))
            else:
                n = (x.bit_length() + 8) // 8
                self.w(b"\x8a" + bytes([n]) + x.to_bytes(n, "little", signed=True))
        elif isinstance(x, float):
            self.w(b"G" + struct.pack(">d", x))
        elif isinstance(x, str):
            b = x.encode("utf-8", "surrogatepass")
            self.w(b"X" + struct.pack("<I", len(b)) + b)
        elif isinstance(x, tuple):
            if len(x) == 0:
                self.w(b")")
                return
            if len(x) > 3:
                self.w(b"(")
            for i, v in enumerate(x):
                self.obj(v, f"{where}[{i}]")
            self.w({1: b"\x85", 2: b"\x86", 3: b"\x87"}.get(len(x), b"t"))
        elif isinstance(x, list):
            self.w(b"]")
            if x:
                self.w(b"(")
                for i, v in enumerate(x):
                    self.obj(v, f"{where}[{i}]")
                self.w(b"e")
        elif isinstance(x, dict):
            if type(x) is collections.OrderedDict:
                self.glob("collections", "OrderedDict")
                self.w(b")R")
            elif type(x) is dict:
                self.w(b"}")
            else:
                raise TorchFormatError(f"cannot write {where}: {type(x).__name__} (use dict or OrderedDict)")
            if x:
                self.w(b"(")
                for k, v in x.items():
                    if not isinstance(k, (str, int)) or isinstance(k, bool):
                        raise TorchFormatError(f"cannot write {where}: key {k!r} is not a str or int")
                    self.obj(k, where)
                    self.obj(v, f"{where}[{k!r}]")
                self.w(b"u")
        else:
            raise TorchFormatError(
                f"cannot write {where}: {type(x).__name__} is not an array, number, string, None, list, tuple or dict"
            )

    def record(self, a: np.ndarray, where: str) -> _TensorRecord:
        dt = a.dtype.newbyteorder("<")  # what is stored; big-endian input is swapped
        name = _DTYPE_STORAGES.get(dt)
        if name is None:
            raise TorchFormatError(
                f"cannot write {where}: dtype {a.dtype} has no torch storage type; supported: "
                + ", ".join(str(d) for d in _DTYPE_STORAGES)
            )
        if id(a) in self.storages:
            key = self.storages[id(a)][0]
        else:
            key = str(len(self.storages))
            self.storages[id(a)] = (key, np.ascontiguousarray(a, dtype=dt))
            self._keep.append(a)
        strides, acc = [], 1
        for n in reversed(a.shape):
            strides.append(acc)
            acc *= n
        return _TensorRecord(key, name, a.size, 0, tuple(a.shape), tuple(reversed(strides)))

    def tensor(self, r: _TensorRecord):
        # torch._utils._rebuild_tensor_v2(storage, offset, size, stride, requires_grad=False, OrderedDict())
        self.glob("torch._utils", "_rebuild_tensor_v2")
        self.w(b"((")
        self.obj("storage", "")
        self.glob("torch", r.storage_name)
        self.obj(r.key, "")
        self.obj("cpu", "")
        self.obj(r.numel, "")
        self.w(b"tQ")  # TUPLE, BINPERSID
        self.obj(r.offset, "")
        self.obj(r.size, "")
        self.obj(r.stride, "")
        self.w(b"\x89")
        self.glob("collections", "OrderedDict")
        self.w(b")Rt")  # hooks = OrderedDict(); close the argument tuple
        self.w(b"R")


ALIGNMENT = 64  # bytes; torch's default storage alignment
_ARCHIVE = "archive"
_CHUNK = 64 << 20


def _write_entry(zf: zipfile.ZipFile, fp, name: str, data, align: bool):
    info = zipfile.ZipInfo(f"{_ARCHIVE}/{name}", date_time=(1980, 1, 1, 0, 0, 0))
    info.compress_type = zipfile.ZIP_STORED
    nbytes = len(data)
    info.file_size = nbytes
    zip64 = nbytes * 1.05 > zipfile.ZIP64_LIMIT  # zipfile adds a 20-byte zip64 field then
    if align:
        # local header: 30 bytes + name + extra (+ zip64 field); pad with an "FB" extra field as torch does
        fixed = fp.tell() + 30 + len(info.filename.encode()) + 4 + (20 if zip64 else 0)
        info.extra = b"FB" + struct.pack("<H", -fixed % ALIGNMENT) + b"Z" * (-fixed % ALIGNMENT)
    with zf.open(info, "w", force_zip64=zip64) as out:
        view = memoryview(data)
        for i in range(0, nbytes, _CHUNK):
            out.write(view[i: i + _CHUNK])


def save(obj: Any, path: str | os.PathLike) -> None:
    """Write ``obj`` (dicts, lists, tuples, scalars, strings, NumPy arrays) as a ``torch.save`` zip file.

    ``torch.load(path, weights_only=True)`` gives back the same structure with
    tensors (same dtype, shape and values; ``requires_grad=False``). The same
    array object appearing twice becomes one shared storage. The file is written
    to ``path + '.tmp'`` and renamed, so an existing file is replaced whole or
    not at all.
    """
    path = Path(path)
    em = _Emitter()
    pkl = em.dump(obj)  # raises before any file is touched
    tmp = path.with_name(path.name + ".tmp")
    try:
        with open(tmp, "wb") as fp, zipfile.ZipFile(fp, "w", zipfile.ZIP_STORED) as zf:
            _write_entry(zf, fp, "data.pkl", pkl, align=False)
            _write_entry(zf, fp, "byteorder", b"little", align=False)
            _write_entry(zf, fp, ".storage_alignment", str(ALIGNMENT).encode(), align=False)
            for key, arr in em.storages.values():
                _write_entry(zf, fp, f"data/{key}", arr.reshape(-1).view(np.uint8), align=True)
            _write_entry(zf, fp, "version", b"3\n", align=False)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
