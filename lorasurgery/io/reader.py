"""Reading safetensors headers and tensors without loading whole files.

:func:`read_header` parses the safetensors header itself (an 8-byte little-endian length followed by
that many bytes of JSON) and validates it as strictly as the safetensors library does, so every later
``safe_open`` call succeeds. No tensor data is read.

:func:`open_source` wraps a single file, a sharded set (``*.safetensors.index.json``), a diffusers
pipeline folder (``model_index.json``) or a single diffusers component folder (``config.json`` plus
weights) as one :class:`TensorSource` that loads tensors lazily, one at a time, memory-mapped.

Nothing here ever unpickles: pickle checkpoints are recognised by name and magic bytes and refused.
"""
from __future__ import annotations

import hashlib
import json
import re
import struct
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Iterable, Iterator

import torch

from ..errors import InputError
from .dtypes import ITEMSIZE, ST_TO_TORCH, UNLOADABLE

#: Largest header accepted (the safetensors library's own limit).
MAX_HEADER_BYTES = 100_000_000

#: File suffixes of pickle-based checkpoints.
PICKLE_SUFFIXES = frozenset({".ckpt", ".pt", ".pth", ".bin", ".pkl", ".pickle"})

#: diffusers pipeline components lorasurgery reads, in the order their keys are listed.
DIFFUSERS_COMPONENTS = ("unet", "transformer", "text_encoder", "text_encoder_2", "text_encoder_3", "vae")

#: Weight file names of a diffusers component folder, in order of preference.
COMPONENT_WEIGHT_NAMES = (
    "diffusion_pytorch_model.safetensors",
    "model.safetensors",
    "diffusion_pytorch_model.safetensors.index.json",
    "model.safetensors.index.json",
)

_SHARD_RE = re.compile(r"^(?P<base>.+)-(?P<i>\d+)-of-(?P<n>\d+)\.safetensors$")

_CONVERT_HINT = (
    "lorasurgery only reads .safetensors files and never unpickles, because loading a pickle can run "
    "arbitrary code. Convert it once in an environment you trust: "
    "`sd = torch.load(path, map_location='cpu', weights_only=True)` (take `sd['state_dict']` if present), "
    "then `safetensors.torch.save_file({k: v.contiguous() for k, v in sd.items() if torch.is_tensor(v)}, "
    "'model.safetensors')`, and pass the new file."
)


@dataclass(frozen=True)
class TensorInfo:
    """One tensor entry of a safetensors header; ``start``/``end`` are offsets into the data section."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    start: int
    end: int

    @property
    def nbytes(self) -> int:
        """Size of the tensor's data in bytes."""
        return self.end - self.start

    @property
    def numel(self) -> int:
        """Number of elements (1 for a 0-dim tensor)."""
        n = 1
        for d in self.shape:
            n *= d
        return n

    @property
    def torch_dtype(self) -> torch.dtype:
        """The torch dtype of the tensor."""
        return ST_TO_TORCH[self.dtype]


@dataclass(frozen=True)
class Header:
    """A parsed safetensors header.

    ``tensors`` is in file order (sorted by data offset); ``data_offset`` is the absolute file offset of
    the data section (8 + header length).
    """

    path: Path
    metadata: dict[str, str]
    tensors: dict[str, TensorInfo]
    data_offset: int
    file_size: int

    @property
    def header_size(self) -> int:
        """Length of the JSON header in bytes (padding included)."""
        return self.data_offset - 8

    @property
    def total_bytes(self) -> int:
        """Size of the data section in bytes."""
        return self.file_size - self.data_offset


def _fail(path: Path, what: str, todo: str = "") -> InputError:
    msg = f"{path}: {what}"
    if todo:
        msg += f" {todo}"
    return InputError(msg, path)


def check_not_pickle(path: str | Path) -> None:
    """Raise :class:`InputError` if ``path`` is a pickle checkpoint (by suffix or by magic bytes).

    Refused suffixes: ``.ckpt .pt .pth .bin .pkl .pickle``. Refused contents: a zip archive
    (``PK\\x03\\x04``, the ``torch.save`` format) or a pickle stream (``\\x80`` followed by a protocol
    number 2-5) unless the bytes also read as a plausible safetensors header. The file is never
    unpickled; at most its first 9 bytes are read.
    """
    p = Path(path)
    if p.suffix.lower() in PICKLE_SUFFIXES:
        raise _fail(p, f"is a pickle checkpoint ({p.suffix} file).", _CONVERT_HINT)
    if not p.is_file():
        return
    with open(p, "rb") as f:
        head = f.read(9)
    if head.startswith(b"PK\x03\x04"):
        raise _fail(p, "is a zip archive (the torch.save pickle format), not a safetensors file.", _CONVERT_HINT)
    if len(head) >= 2 and head[0] == 0x80 and 2 <= head[1] <= 5:
        size = p.stat().st_size
        n = struct.unpack("<Q", head[:8])[0] if len(head) >= 8 else size
        looks_safetensors = len(head) == 9 and head[8:9] == b"{" and 8 + n <= size
        if not looks_safetensors:
            raise _fail(p, "starts with a pickle stream, not a safetensors header.", _CONVERT_HINT)
    if head.startswith(b"GGUF"):
        raise _fail(p, "is a GGUF file.", "lorasurgery reads only .safetensors files; use the original "
                    "safetensors release of this model.")


def _no_dup_object(path: Path):
    def hook(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
        out = dict(pairs)  # built in C; a duplicate shows as a shorter dict
        if len(out) != len(pairs):
            seen: set[str] = set()
            for k, _ in pairs:
                if k in seen:
                    raise _fail(path, f"has a corrupt safetensors header: the key {k!r} appears twice.",
                                "Re-export the file with the safetensors library.")
                seen.add(k)
        return out
    return hook


def _is_nonneg_int(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool) and x >= 0


def _parse_entry(path: Path, name: str, entry: Any) -> TensorInfo:
    bad = f"has a corrupt safetensors header: the entry for tensor {name!r}"
    todo = "The file is damaged or was not written by a safetensors writer; re-download or re-export it."
    if not isinstance(entry, dict):
        raise _fail(path, f"{bad} is not a JSON object.", todo)
    for field in ("dtype", "shape", "data_offsets"):
        if field not in entry:
            raise _fail(path, f"{bad} has no {field!r} field.", todo)
    dtype = entry["dtype"]
    if not isinstance(dtype, str):
        raise _fail(path, f"{bad} has a non-string dtype {dtype!r}.", todo)
    if dtype not in ST_TO_TORCH:
        if dtype in UNLOADABLE:
            raise _fail(path, f"stores tensor {name!r} as {dtype}, a format that cannot be loaded into "
                        "torch tensors.", "Convert the file to fp16, bf16 or fp32 first.")
        raise _fail(path, f"stores tensor {name!r} with unsupported dtype {dtype!r}.",
                    f"Supported dtypes: {', '.join(ST_TO_TORCH)}.")
    shape = entry["shape"]
    if not isinstance(shape, list) or not all(_is_nonneg_int(d) for d in shape):
        raise _fail(path, f"{bad} has an invalid shape {shape!r} (need a list of non-negative integers).", todo)
    offs = entry["data_offsets"]
    if not isinstance(offs, list) or len(offs) != 2 or not all(_is_nonneg_int(o) for o in offs):
        raise _fail(path, f"{bad} has invalid data_offsets {offs!r} (need [start, end]).", todo)
    return TensorInfo(name, dtype, tuple(shape), offs[0], offs[1])


def read_header(path: str | Path) -> Header:
    """Parse and validate the header of one ``.safetensors`` file, reading no tensor data.

    Reads 8 bytes (little-endian u64 header length ``n``) and then ``n`` bytes of UTF-8 JSON. Raises
    :class:`InputError` naming the file if it is missing, a folder, a pickle checkpoint, empty,
    shorter than 8 bytes, has an absurd (> 100 MB) or too long header, invalid UTF-8 or JSON, a
    non-object header, a malformed ``__metadata__`` (must map strings to strings), tensor entries
    without ``dtype``/``shape``/``data_offsets``, an unsupported dtype, or offsets that are out of
    range, reversed, overlapping, leave gaps or trailing bytes, or disagree with shape x itemsize.
    """
    p = Path(path)
    if not p.exists():
        raise _fail(p, "does not exist.", "Check the path and the current folder.")
    if p.is_dir():
        if _is_diffusers_dir(p):
            raise _fail(p, "is a diffusers model folder, not a single .safetensors file.",
                        "Pass one of its weight files, or open the folder as a model source.")
        raise _fail(p, "is a folder, not a .safetensors file.", "Pass the path of a .safetensors file.")
    check_not_pickle(p)
    size = p.stat().st_size
    if size == 0:
        raise _fail(p, "is empty (0 bytes).", "The download or copy probably failed; fetch the file again.")
    if size < 8:
        raise _fail(p, f"is only {size} bytes long, too short for a safetensors header (8-byte length).",
                    "The file is truncated; fetch it again.")
    with open(p, "rb") as f:
        n = struct.unpack("<Q", f.read(8))[0]
        if n > MAX_HEADER_BYTES:
            raise _fail(p, f"declares a {n}-byte header, more than the {MAX_HEADER_BYTES}-byte limit; this "
                        "is not a safetensors file or it is corrupt.", "Check that you passed a .safetensors file.")
        if 8 + n > size:
            raise _fail(p, f"declares a {n}-byte header but the file has only {size} bytes; it is truncated "
                        "or not a safetensors file.", "Fetch the file again.")
        raw = f.read(n)
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise _fail(p, f"has a header that is not valid UTF-8 (byte {e.start}); it is not a safetensors "
                    "file or it is corrupt.", "Check that you passed a .safetensors file.") from None
    try:
        obj = json.loads(text, object_pairs_hook=_no_dup_object(p))
    except json.JSONDecodeError as e:
        raise _fail(p, f"has a header that is not valid JSON ({e.msg} at character {e.pos}); it is not a "
                    "safetensors file or it is corrupt.", "Check that you passed a .safetensors file.") from None
    if not isinstance(obj, dict):
        raise _fail(p, f"has a header that is a JSON {type(obj).__name__}, not an object; it is not a "
                    "safetensors file.", "Check that you passed a .safetensors file.")
    meta = obj.pop("__metadata__", None)
    if meta is None:
        meta = {}
    if not isinstance(meta, dict) or not all(isinstance(v, str) for v in meta.values()):
        raise _fail(p, "has a corrupt __metadata__ entry: safetensors metadata must map strings to strings.",
                    "Re-export the file with the safetensors library.")
    infos = [_parse_entry(p, name, entry) for name, entry in obj.items()]
    data_len = size - 8 - n
    infos.sort(key=lambda t: (t.start, t.end))
    prev_end, prev_name = 0, None
    for t in infos:
        if t.end < t.start:
            raise _fail(p, f"has invalid offsets for tensor {t.name!r}: end {t.end} is before start {t.start}.",
                        "The file is corrupt; fetch it again.")
        if t.end > data_len:
            raise _fail(p, f"has tensor {t.name!r} at bytes [{t.start}, {t.end}) of the data section, which "
                        f"has only {data_len} bytes: the file is truncated or corrupt.", "Fetch the file again.")
        expected = t.numel * ITEMSIZE[t.dtype]
        if t.nbytes != expected:
            raise _fail(p, f"has tensor {t.name!r} of shape {list(t.shape)} and dtype {t.dtype} "
                        f"({expected} bytes) stored in {t.nbytes} bytes.", "The file is corrupt; fetch it again.")
        if t.start < prev_end:
            raise _fail(p, f"has overlapping tensors {prev_name!r} and {t.name!r} (data offset {t.start} is "
                        f"before {prev_end}).", "The file is corrupt; re-export it with the safetensors library.")
        if t.start > prev_end:
            raise _fail(p, f"has a gap of {t.start - prev_end} unused bytes before tensor {t.name!r}; the "
                        "safetensors library refuses such files.", "Re-export it with the safetensors library.")
        prev_end, prev_name = t.end, t.name
    if prev_end != data_len:
        raise _fail(p, f"has {data_len - prev_end} bytes after the last tensor; the safetensors library "
                    "refuses such files.", "The file is damaged; fetch it again or re-export it.")
    return Header(p, dict(meta), {t.name: t for t in infos}, 8 + n, size)


# ---------------------------------------------------------------------------------------------------------
# Sources


def _is_diffusers_dir(p: Path) -> bool:
    return (p / "model_index.json").is_file() or (p / "config.json").is_file()


def _index_of_shard(p: Path) -> Path | None:
    m = _SHARD_RE.match(p.name)
    if not m:
        return None
    idx = p.with_name(m.group("base") + ".safetensors.index.json")
    return idx if idx.is_file() else None


def _is_index_name(name: str) -> bool:
    return name.endswith(".json") and ".safetensors.index" in name


def _shards_of_index(index: Path) -> tuple[list[Path], dict[str, str]]:
    """Return (shard files sorted by name, weight_map) of a sharded-checkpoint index file."""
    try:
        obj = json.loads(index.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise _fail(index, f"is not a valid JSON sharded-checkpoint index ({e}).",
                    "Fetch the index file again.") from None
    wm = obj.get("weight_map") if isinstance(obj, dict) else None
    if not isinstance(wm, dict) or not wm or not all(isinstance(v, str) for v in wm.values()):
        raise _fail(index, "is not a sharded-checkpoint index: it has no 'weight_map' object mapping tensor "
                    "names to shard file names.", "Pass the index that came with the shards.")
    files: dict[str, Path] = {}
    for fname in sorted(set(wm.values())):
        rel = Path(fname)
        if rel.is_absolute() or ".." in rel.parts:
            raise _fail(index, f"names shard {fname!r} outside its own folder.", "Use an index whose shards lie "
                        "beside it.")
        shard = index.parent / rel
        if not shard.is_file():
            raise _fail(index, f"lists shard {fname!r}, which does not exist beside it.",
                        "Download the missing shard.")
        files[fname] = shard
    return list(files.values()), dict(wm)


def _component_weights(folder: Path) -> list[Path]:
    """The weight files (one file, or the shards of an index) of a diffusers component folder."""
    for name in COMPONENT_WEIGHT_NAMES:
        cand = folder / name
        if cand.is_file():
            return _shards_of_index(cand)[0] if _is_index_name(name) else [cand]
    indexes = sorted(q for q in folder.iterdir() if q.is_file() and _is_index_name(q.name))
    files = sorted(q for q in folder.iterdir() if q.is_file() and q.name.endswith(".safetensors"))
    if len(indexes) == 1:
        return _shards_of_index(indexes[0])[0]
    if not indexes and len(files) == 1:
        return files
    if indexes or files:
        names = ", ".join(q.name for q in indexes + files)
        raise _fail(folder, f"holds several candidate weight files ({names}) and none of the standard names "
                    f"({', '.join(COMPONENT_WEIGHT_NAMES)}).", "Pass the file or index you mean directly.")
    pickles = sorted(q.name for q in folder.iterdir() if q.suffix.lower() in PICKLE_SUFFIXES)
    if pickles:
        raise _fail(folder, f"has only pickle weights ({', '.join(pickles)}).", _CONVERT_HINT)
    raise _fail(folder, "has no weight file (expected diffusion_pytorch_model.safetensors, model.safetensors "
                "or a *.safetensors.index.json).", "Download the component's weights or remove the folder.")


@dataclass(frozen=True)
class _Entry:
    file: Path
    info: TensorInfo  # name as stored in the file
    component: str | None


class TensorSource:
    """A read-only set of named tensors backed by one or more safetensors files, loaded lazily.

    Keys are listed in a deterministic order: file order within each file, files in shard-name order,
    diffusers components in :data:`DIFFUSERS_COMPONENTS` order. Keys of a diffusers pipeline folder
    carry their component name and a dot (``unet.conv_in.weight``); other sources use the file keys.
    Tensors are read through ``safetensors.safe_open`` (memory-mapped); one handle per file stays open
    until :meth:`close` (or the end of a ``with`` block).
    """

    def __init__(self, path: Path, kind: str, parts: list[tuple[str | None, Header]], root: Path):
        self.path = path
        #: "file", "sharded", "diffusers" (pipeline folder) or "component" (one component folder).
        self.kind = kind
        self._root = root
        self._entries: dict[str, _Entry] = {}
        self.files: list[Path] = []
        self.metadata: dict[str, str] = {}
        for component, header in parts:
            self.files.append(header.path)
            for k, v in header.metadata.items():
                self.metadata.setdefault(k, v)
            for name, info in header.tensors.items():
                key = f"{component}.{name}" if component else name
                if key in self._entries:
                    other = self._entries[key].file
                    raise _fail(path, f"has tensor {name!r} in two files ({other.name} and {header.path.name}).",
                                "The shard set is inconsistent; fetch it again.")
                self._entries[key] = _Entry(header.path, info, component)
        self._handles: dict[Path, Any] = {}
        self._sha256: str | None = None

    # -- header-level queries ------------------------------------------------------------------------
    def keys(self) -> list[str]:
        """All tensor keys in deterministic (file) order."""
        return list(self._entries)

    def __contains__(self, key: object) -> bool:
        return key in self._entries

    def __len__(self) -> int:
        return len(self._entries)

    def __iter__(self) -> Iterator[str]:
        return iter(self._entries)

    def _entry(self, key: str) -> _Entry:
        try:
            return self._entries[key]
        except KeyError:
            raise InputError(f"{self.path}: has no tensor named {key!r}.", self.path) from None

    def info(self, key: str) -> TensorInfo:
        """The header entry of ``key`` (its ``name`` is the source key, offsets are within its file)."""
        e = self._entry(key)
        return e.info if e.info.name == key else replace(e.info, name=key)

    def file_of(self, key: str) -> Path:
        """The file that stores ``key``."""
        return self._entry(key).file

    def shapes(self) -> dict[str, tuple[int, ...]]:
        """Shape of every tensor, in key order."""
        return {k: e.info.shape for k, e in self._entries.items()}

    def dtypes(self) -> dict[str, str]:
        """safetensors dtype string of every tensor, in key order."""
        return {k: e.info.dtype for k, e in self._entries.items()}

    @property
    def total_bytes(self) -> int:
        """Total size of all tensor data in bytes."""
        return sum(e.info.nbytes for e in self._entries.values())

    @property
    def components(self) -> list[str]:
        """Component names of a diffusers pipeline folder, in key order (empty for other sources)."""
        seen: dict[str, None] = {}
        for e in self._entries.values():
            if e.component:
                seen.setdefault(e.component, None)
        return list(seen)

    def component_of(self, key: str) -> str | None:
        """The diffusers component (``unet``, ``text_encoder``...) holding ``key``; None for unprefixed sources."""
        return self._entry(key).component

    # -- data ----------------------------------------------------------------------------------------
    def _handle(self, file: Path) -> Any:
        h = self._handles.get(file)
        if h is None:
            from safetensors import safe_open

            try:
                h = safe_open(str(file), framework="pt", device="cpu")
            except Exception as e:  # safetensors raises its own error type
                raise _fail(file, f"could not be opened by safetensors ({e}).", "The file may be damaged; "
                            "fetch it again.") from None
            self._handles[file] = h
        return h

    def get(self, key: str, device: str | torch.device = "cpu") -> torch.Tensor:
        """Load one tensor (memory-mapped read of its bytes), optionally moved to ``device``."""
        e = self._entry(key)
        t = self._handle(e.file).get_tensor(e.info.name)
        if torch.device(device).type != "cpu":
            t = t.to(device)
        return t

    def iter_tensors(self, keys: Iterable[str] | None = None,
                     device: str | torch.device = "cpu") -> Iterator[tuple[str, torch.Tensor]]:
        """Yield ``(key, tensor)`` one at a time, for ``keys`` (default: all, in key order)."""
        for k in (self.keys() if keys is None else keys):
            yield k, self.get(k, device)

    def relative_files(self) -> list[str]:
        """Paths of :attr:`files` relative to the source root, with forward slashes."""
        return [f.relative_to(self._root).as_posix() if f.is_relative_to(self._root) else f.name
                for f in self.files]

    def sha256(self) -> str:
        """Hex SHA-256 identifying the source's bytes, computed in 1 MiB chunks and cached.

        A single file gives the SHA-256 of the whole file. A multi-file source (shards, diffusers
        folder) gives the SHA-256 of the ASCII concatenation of each file's hex SHA-256, taken in
        sorted order of the files' paths relative to the source folder (e.g. ``text_encoder/model.safetensors``
        before ``unet/diffusion_pytorch_model.safetensors``).
        """
        if self._sha256 is None:
            from .hashes import sha256_file

            if self.kind == "file":
                self._sha256 = sha256_file(self.files[0])
            else:
                pairs = sorted(zip(self.relative_files(), self.files))
                joined = "".join(sha256_file(f) for _, f in pairs)
                self._sha256 = hashlib.sha256(joined.encode("ascii")).hexdigest()
        return self._sha256

    # -- lifetime ------------------------------------------------------------------------------------
    def close(self) -> None:
        """Release every open file handle (tensors already returned stay valid)."""
        handles, self._handles = self._handles, {}
        for h in handles.values():
            h.__exit__(None, None, None)

    def __enter__(self) -> "TensorSource":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"TensorSource({str(self.path)!r}, kind={self.kind!r}, tensors={len(self)})"


def _sharded_parts(index: Path) -> list[tuple[str | None, Header]]:
    files, wm = _shards_of_index(index)
    headers = {f: read_header(f) for f in files}
    for key, fname in wm.items():
        shard = index.parent / fname
        if key not in headers[shard].tensors:
            raise _fail(index, f"says tensor {key!r} is in shard {fname!r}, but that shard does not contain it.",
                        "The index and shards are from different downloads; fetch them again.")
    return [(None, headers[f]) for f in files]


def _file_parts(files: list[Path], component: str | None) -> list[tuple[str | None, Header]]:
    return [(component, read_header(f)) for f in files]


def open_source(path: str | Path) -> TensorSource:
    """Open a model or LoRA for lazy tensor access.

    Accepts a ``.safetensors`` file; a sharded checkpoint given by its ``*.safetensors.index.json`` or
    by any shard ``name-0000k-of-0000n.safetensors`` whose ``name.safetensors.index.json`` lies beside
    it; a diffusers pipeline folder (``model_index.json``; components from :data:`DIFFUSERS_COMPONENTS`,
    keys prefixed with ``component.``); or one diffusers component folder (``config.json`` plus
    weights; keys unprefixed). Every header is parsed and validated up front; no tensor data is read.
    """
    p = Path(path)
    if not p.exists():
        raise _fail(p, "does not exist.", "Check the path and the current folder.")
    if p.is_file():
        if _is_index_name(p.name):
            return TensorSource(p, "sharded", _sharded_parts(p), p.parent)
        idx = _index_of_shard(p)
        if idx is not None:
            return TensorSource(p, "sharded", _sharded_parts(idx), p.parent)
        return TensorSource(p, "file", [(None, read_header(p))], p.parent)
    if not p.is_dir():
        raise _fail(p, "is neither a file nor a folder.", "Pass a .safetensors file or a diffusers folder.")
    if (p / "model_index.json").is_file():
        parts: list[tuple[str | None, Header]] = []
        for comp in DIFFUSERS_COMPONENTS:
            folder = p / comp
            if folder.is_dir():
                parts += _file_parts(_component_weights(folder), comp)
        if not parts:
            raise _fail(p, "is a diffusers pipeline folder without any of the components lorasurgery reads "
                        f"({', '.join(DIFFUSERS_COMPONENTS)}).", "Download the model's weight folders.")
        return TensorSource(p, "diffusers", parts, p)
    if (p / "config.json").is_file():
        return TensorSource(p, "component", _file_parts(_component_weights(p), None), p)
    found = sorted(q.name for q in p.iterdir() if q.name.endswith(".safetensors"))
    hint = (f"It contains {', '.join(found[:5])}{' ...' if len(found) > 5 else ''}; pass one of those files."
            if found else "Pass a .safetensors file, a *.safetensors.index.json, or a folder with model_index.json "
            "or config.json.")
    raise _fail(p, "is a folder but not a diffusers model folder (no model_index.json or config.json).", hint)
