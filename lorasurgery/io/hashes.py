"""File and model hashes (``math.md`` section 12), all computed by streaming.

* :func:`sha256_file`: SHA-256 of a whole file, read in 1 MiB chunks.
* :func:`sshs_model_hash`: SHA-256 of a safetensors file's data section (bytes from 8 + header length
  to the end), i.e. kohya's ``sshs_model_hash`` / Civitai AutoV3 of that file.
* :func:`sshs_legacy_hash`: first 8 hex digits of the SHA-256 of bytes [0x100000, 0x110000) of the
  serialisation ``safetensors.torch.save(tensors, ss_metadata)`` would produce. That serialisation is
  never built: the header is encoded exactly as safetensors does (tensors sorted by dtype rank, then
  name) and only the tensor bytes that fall inside the 64 KiB window are read.

Metadata key order: safetensors stores ``__metadata__`` in a hash map and writes its keys in a random
order, which changes neither the header length nor the tensor positions. The window therefore only
depends on the order when the header itself reaches past 1 MiB; we then use sorted keys.
"""
from __future__ import annotations

import hashlib
import struct
from pathlib import Path
from typing import Callable, Iterable, Mapping, Sequence

import torch

from .dtypes import ITEMSIZE, SAFETENSORS_ORDER, TORCH_TO_ST
from .reader import read_header
from .writer import encode_header, tensor_bytes

LEGACY_START = 0x100000
LEGACY_LEN = 0x10000
_CHUNK = 1 << 20

#: (name, safetensors dtype, shape, nbytes, read(lo, hi) -> the tensor's bytes [lo, hi))
LayoutEntry = tuple[str, str, Sequence[int], int, Callable[[int, int], bytes]]


def sha256_file(path: str | Path, start: int = 0) -> str:
    """Hex SHA-256 of the bytes of ``path`` from offset ``start`` to the end, read in 1 MiB chunks."""
    h = hashlib.sha256()
    buf = bytearray(_CHUNK)
    view = memoryview(buf)
    with open(path, "rb", buffering=0) as f:
        f.seek(start)
        while True:
            n = f.readinto(buf)
            if not n:
                break
            h.update(view[:n])
    return h.hexdigest()


def sshs_model_hash(path: str | Path) -> str:
    """Hex SHA-256 of the data section of an existing safetensors file (header validated first)."""
    header = read_header(path)
    return sha256_file(header.path, header.data_offset)


def legacy_hash_of_layout(entries: Sequence[LayoutEntry], ss_metadata: Mapping[str, str] | None) -> str:
    """Legacy hash of tensors described by ``entries``, laid out as ``safetensors.torch.save`` would.

    ``ss_metadata`` None omits ``__metadata__`` (``save(tensors)``); a dict, even empty, includes it.
    Only the bytes overlapping [0x100000, 0x110000) are requested from the ``read`` callables.
    """
    ordered = sorted(entries, key=lambda e: (-SAFETENSORS_ORDER[e[1]], e[0]))
    layout: list[tuple[str, str, Sequence[int], int, int]] = []
    pos = 0
    for name, dtype, shape, nbytes, _ in ordered:
        layout.append((name, dtype, shape, pos, pos + nbytes))
        pos += nbytes
    header, _ = encode_header(layout, None if ss_metadata is None else dict(ss_metadata))
    lo_w, hi_w = LEGACY_START, LEGACY_START + LEGACY_LEN
    prefix = struct.pack("<Q", len(header)) + header
    out = bytearray()
    if lo_w < len(prefix):
        out += prefix[lo_w:hi_w]
    base = len(prefix)
    for (_, _, _, start, end), entry in zip(layout, ordered):
        a, b = base + start, base + end
        lo, hi = max(a, lo_w), min(b, hi_w)
        if lo < hi:
            chunk = entry[4](lo - a, hi - a)
            if len(chunk) != hi - lo:
                raise ValueError(f"short read of tensor {entry[0]!r} while computing the legacy hash")
            out += chunk
    return hashlib.sha256(bytes(out)).hexdigest()[:8]


def _tensor_entry(name: str, t: torch.Tensor) -> LayoutEntry:
    dtype = TORCH_TO_ST[t.dtype]
    nbytes = t.numel() * ITEMSIZE[dtype]

    def read(lo: int, hi: int) -> bytes:
        return tensor_bytes(t)[lo:hi].numpy().tobytes()

    return (name, dtype, tuple(t.shape), nbytes, read)


def sshs_legacy_hash(
    tensors: Mapping[str, torch.Tensor] | Iterable[tuple[str, torch.Tensor]],
    ss_metadata: Mapping[str, str] | None,
) -> str:
    """kohya's ``sshs_legacy_hash`` of in-memory tensors (already cast to the output dtype).

    Equals ``sha256(safetensors.torch.save(dict(tensors), ss_metadata)[0x100000:0x110000])[:8]``;
    pass only the ``ss_*`` metadata keys, as kohya does. Only the tensors overlapping the window are
    converted to bytes. Outputs shorter than 1 MiB give ``"e3b0c442"`` (the hash of nothing).
    """
    items = list(tensors.items()) if isinstance(tensors, Mapping) else list(tensors)
    return legacy_hash_of_layout([_tensor_entry(n, t) for n, t in items], ss_metadata)


def sshs_legacy_hash_file(path: str | Path, ss_metadata: Mapping[str, str] | None = None) -> str:
    """Legacy hash of the tensors stored in an existing safetensors file, whatever their order there.

    ``ss_metadata`` defaults to the file's own ``ss_*`` metadata keys. Reads at most the 64 KiB of
    tensor data that fall inside the window.
    """
    header = read_header(path)
    if ss_metadata is None:
        ss_metadata = {k: v for k, v in header.metadata.items() if k.startswith("ss_")}
    with open(header.path, "rb") as f:
        def reader(start: int) -> Callable[[int, int], bytes]:
            def read(lo: int, hi: int) -> bytes:
                f.seek(header.data_offset + start + lo)
                return f.read(hi - lo)
            return read

        entries = [(t.name, t.dtype, t.shape, t.nbytes, reader(t.start)) for t in header.tensors.values()]
        return legacy_hash_of_layout(entries, ss_metadata)
