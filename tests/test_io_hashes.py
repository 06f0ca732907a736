"""Tests for lorasurgery.io.hashes (math.md section 12)."""
from __future__ import annotations

import hashlib

import pytest
import torch
from safetensors.torch import save, save_file

from lorasurgery.errors import InputError
from lorasurgery.io.dtypes import ST_TO_TORCH
from lorasurgery.io.hashes import (LEGACY_LEN, LEGACY_START, legacy_hash_of_layout, sha256_file,
                                   sshs_legacy_hash, sshs_legacy_hash_file, sshs_model_hash)
from lorasurgery.io.reader import read_header
from lorasurgery.io.writer import write_file

EMPTY = hashlib.sha256(b"").hexdigest()[:8]


def direct_legacy(tensors, meta) -> str:
    return hashlib.sha256(save(dict(tensors), meta)[LEGACY_START:LEGACY_START + LEGACY_LEN]).hexdigest()[:8]


def mixed_tensors(n_big: int = 3, seed: int = 0) -> dict[str, torch.Tensor]:
    """> 1 MiB of tensors in several dtypes whose safetensors order differs from insertion order."""
    g = torch.Generator().manual_seed(seed)
    ts: dict[str, torch.Tensor] = {}
    for i in range(n_big):
        ts[f"z{i}.lora_up.weight"] = torch.randn(256, 320, generator=g).to(torch.bfloat16)
        ts[f"a{i}.lora_down.weight"] = torch.randn(320, 256, generator=g).half()
        ts[f"m{i}.alpha"] = torch.tensor(float(i + 1))
    ts["f8.weight"] = torch.randn(700, generator=g).to(torch.float8_e4m3fn)
    ts["mask"] = torch.randn(33, generator=g) > 0
    ts["big64"] = torch.randn(40000, generator=g, dtype=torch.float64)
    return ts


def test_sha256_file_streams_in_chunks(tmp_path):
    data = bytes(range(256)) * (5 * 4096 + 7)  # > 5 MiB, not a multiple of the chunk size
    p = tmp_path / "blob"
    p.write_bytes(data)
    assert sha256_file(p) == hashlib.sha256(data).hexdigest()
    assert sha256_file(p, start=1000) == hashlib.sha256(data[1000:]).hexdigest()
    e = tmp_path / "empty"
    e.write_bytes(b"")
    assert sha256_file(e) == hashlib.sha256(b"").hexdigest()


def test_sshs_model_hash_is_data_section_hash(tmp_path):
    ts = mixed_tensors(1)
    p = tmp_path / "m.safetensors"
    save_file(ts, p, metadata={"ss_x": "1", "other": "2"})
    data = p.read_bytes()
    assert sshs_model_hash(p) == hashlib.sha256(data[read_header(p).data_offset:]).hexdigest()
    q = tmp_path / "n.safetensors"
    save_file(ts, q, metadata={"totally": "different metadata"})
    assert sshs_model_hash(q) == sshs_model_hash(p)  # metadata is ignored
    with pytest.raises(InputError):
        sshs_model_hash(tmp_path / "missing.safetensors")


@pytest.mark.parametrize("meta", [{"ss_network_dim": "16", "ss_network_alpha": "8.0", "ss_v2": "False",
                                   "ss_tag": "é ü \n \"q\""}, {}, None])
def test_legacy_hash_matches_safetensors_over_1mib(meta):
    ts = mixed_tensors()
    assert len(save(ts, meta)) > LEGACY_START + LEGACY_LEN
    got = sshs_legacy_hash(ts, meta)
    assert got == direct_legacy(ts, meta) and got != EMPTY
    assert sshs_legacy_hash(list(reversed(list(ts.items()))), meta) == got  # input order is irrelevant


def test_legacy_hash_depends_on_metadata_length():
    ts = mixed_tensors()
    assert sshs_legacy_hash(ts, {"ss_a": "1"}) != sshs_legacy_hash(ts, {"ss_a": "12345678"})
    assert sshs_legacy_hash(ts, {}) != sshs_legacy_hash(ts, None)


def test_legacy_hash_small_output_is_empty_hash():
    ts = {"a.lora_up.weight": torch.randn(8, 4).half(), "a.alpha": torch.tensor(4.0)}
    assert direct_legacy(ts, {"ss_x": "1"}) == EMPTY == "e3b0c442"
    assert sshs_legacy_hash(ts, {"ss_x": "1"}) == "e3b0c442"


def test_legacy_hash_window_partially_past_the_end():
    ts = {"w": torch.zeros(LEGACY_START + 1000, dtype=torch.uint8)}
    ts["w"][LEGACY_START - 200:] = 7
    assert LEGACY_START < len(save(ts, {})) < LEGACY_START + LEGACY_LEN
    assert sshs_legacy_hash(ts, {}) == direct_legacy(ts, {}) != EMPTY


def test_legacy_hash_with_header_inside_the_window():
    # One metadata key (so safetensors' key order cannot vary) long enough to push the header past 1 MiB.
    meta = {"ss_tag_frequency": "x" * (LEGACY_START + 100)}
    ts = {"b": torch.arange(50000, dtype=torch.int32), "a": torch.ones(10, dtype=torch.float16)}
    assert sshs_legacy_hash(ts, meta) == direct_legacy(ts, meta)


def test_legacy_hash_every_dtype():
    g = torch.Generator().manual_seed(3)
    base = torch.randn(64, 64, generator=g) * 10
    ts = {}
    for st, dt in ST_TO_TORCH.items():
        if dt in (torch.uint16, torch.uint32, torch.uint64):
            ts[st] = base.abs().to(torch.int64).to(dt)
        elif dt == torch.complex64:
            ts[st] = torch.complex(base, base)
        elif dt == torch.bool:
            ts[st] = base > 0
        else:
            ts[st] = base.to(dt)
    ts["pad"] = torch.randn(250000, generator=g)
    assert sshs_legacy_hash(ts, {"ss_a": "b"}) == direct_legacy(ts, {"ss_a": "b"})


def test_legacy_hash_reads_only_the_window():
    calls: list[tuple[str, int, int]] = []

    def entry(name: str, nbytes: int):
        def read(lo: int, hi: int) -> bytes:
            calls.append((name, lo, hi))
            return bytes(hi - lo)
        return (name, "U8", (nbytes,), nbytes, read)

    entries = [entry(f"t{i}", 300_000) for i in range(8)]  # 2.4 MB in 300 kB tensors
    legacy_hash_of_layout(entries, {})
    # t3 covers the whole window: it is the only tensor read, and only 64 KiB of it.
    assert [c[0] for c in calls] == ["t3"] and calls[0][2] - calls[0][1] == LEGACY_LEN


def test_legacy_hash_of_file_in_any_order(tmp_path):
    ts = mixed_tensors(seed=5)
    meta = {"ss_network_dim": "8", "modelspec.title": "not hashed"}
    p = tmp_path / "o.safetensors"
    write_file(p, ts, meta)  # our order (insertion), not safetensors' order
    ss = {"ss_network_dim": "8"}
    assert sshs_legacy_hash_file(p) == direct_legacy(ts, ss) == sshs_legacy_hash(ts, ss)
    assert sshs_legacy_hash_file(p, {"ss_other": "1"}) == direct_legacy(ts, {"ss_other": "1"})
