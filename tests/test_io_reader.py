"""Tests for lorasurgery.io.reader and lorasurgery.io.dtypes."""
from __future__ import annotations

import hashlib
import json
import struct
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from lorasurgery.errors import InputError, PlanError
from lorasurgery.io import dtypes
from lorasurgery.io.reader import TensorInfo, check_not_pickle, open_source, read_header


def raw_file(path: Path, header: object, data: bytes = b"", *, length: int | None = None) -> Path:
    """Write a hand-made safetensors-like file: u64 length + header bytes + data."""
    hb = header if isinstance(header, bytes) else json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(hb) if length is None else length) + hb + data)
    return path


def all_dtype_tensors() -> dict[str, torch.Tensor]:
    base = torch.tensor([[0.5, -1.25, 3.0], [2.0, -0.125, 7.5]])
    out = {}
    for st, dt in dtypes.ST_TO_TORCH.items():
        if dt in (torch.uint16, torch.uint32, torch.uint64):
            out[st] = torch.tensor([[1, 2, 3], [4, 5, 6]], dtype=torch.int64).to(dt)
        elif dt == torch.bool:
            out[st] = base > 0
        elif dt == torch.complex64:
            out[st] = torch.complex(base, -base)
        else:
            out[st] = base.to(dt)
    return out


def same(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.dtype == b.dtype and a.shape == b.shape and torch.equal(
        a.contiguous().reshape(-1).view(torch.uint8), b.contiguous().reshape(-1).view(torch.uint8))


# ---------------------------------------------------------------------------------------------- dtypes

def test_dtype_tables_are_consistent():
    assert set(dtypes.ST_TO_TORCH) == set(dtypes.ITEMSIZE) == set(dtypes.SAFETENSORS_ORDER)
    for st, dt in dtypes.ST_TO_TORCH.items():
        assert dtypes.itemsize(st) == dt.itemsize
        assert dtypes.to_safetensors(dtypes.to_torch(st)) == st
    assert dtypes.is_float("F8_E5M2") and not dtypes.is_float("I8")


@pytest.mark.parametrize("name,dt", [("fp16", torch.float16), ("BF16", torch.bfloat16), (" fp32 ", torch.float32),
                                     ("fp64", torch.float64), ("fp8_e4m3fn", torch.float8_e4m3fn),
                                     ("fp8_e5m2", torch.float8_e5m2), ("half", torch.float16),
                                     ("float32", torch.float32)])
def test_parse_dtype(name, dt):
    assert dtypes.parse_dtype(name) == dt


def test_parse_dtype_rejects_unknown():
    with pytest.raises(PlanError, match="fp16, bf16, fp32, fp64, fp8_e4m3fn, fp8_e5m2"):
        dtypes.parse_dtype("int4")
    assert dtypes.dtype_name(torch.bfloat16) == "bf16" and dtypes.dtype_name(torch.int8) == "I8"


# ---------------------------------------------------------------------------------------------- headers

def test_read_header_valid(tmp_path):
    p = tmp_path / "m.safetensors"
    save_file({"b": torch.zeros(2, 3, dtype=torch.float16), "a": torch.ones(4)}, p, metadata={"x": "1"})
    h = read_header(p)
    assert h.path == p and h.metadata == {"x": "1"} and h.file_size == p.stat().st_size
    assert list(h.tensors) == ["a", "b"]  # file order: safetensors puts F32 before F16
    a = h.tensors["a"]
    assert (a.dtype, a.shape, a.start, a.end, a.nbytes, a.numel, a.torch_dtype) == \
        ("F32", (4,), 0, 16, 16, 4, torch.float32)
    assert h.data_offset == 8 + struct.unpack("<Q", p.read_bytes()[:8])[0]
    assert h.total_bytes == 16 + 12


def _expect(path: Path, *fragments: str) -> str:
    with pytest.raises(InputError) as ei:
        read_header(path)
    msg = str(ei.value)
    assert str(path) in msg
    for f in fragments:
        assert f in msg, msg
    return msg


def test_missing_path(tmp_path):
    _expect(tmp_path / "nope.safetensors", "does not exist")


def test_directories(tmp_path):
    (tmp_path / "plain").mkdir()
    _expect(tmp_path / "plain", "is a folder")
    d = tmp_path / "pipe"
    d.mkdir()
    (d / "model_index.json").write_text("{}")
    _expect(d, "diffusers model folder")


def test_empty_and_short(tmp_path):
    e = tmp_path / "e.safetensors"
    e.write_bytes(b"")
    _expect(e, "empty")
    s = tmp_path / "s.safetensors"
    s.write_bytes(b"\x01\x02\x03\x04\x05")
    _expect(s, "5 bytes", "too short")


def test_header_length_too_large(tmp_path):
    _expect(raw_file(tmp_path / "a.safetensors", b"{}", length=1000), "1000-byte header", "truncated")
    _expect(raw_file(tmp_path / "b.safetensors", b"{}", length=2**40), "limit")


def test_header_not_utf8_or_json(tmp_path):
    _expect(raw_file(tmp_path / "u.safetensors", b'{"\xff\xfe": 1}'), "UTF-8")
    _expect(raw_file(tmp_path / "j.safetensors", b'{"a": '), "not valid JSON")
    _expect(raw_file(tmp_path / "l.safetensors", b"[1, 2]"), "not an object")
    _expect(raw_file(tmp_path / "d.safetensors",
                     b'{"a":{"dtype":"U8","shape":[0],"data_offsets":[0,0]},'
                     b'"a":{"dtype":"U8","shape":[0],"data_offsets":[0,0]}}'), "appears twice")


def test_bad_metadata(tmp_path):
    _expect(raw_file(tmp_path / "m.safetensors", {"__metadata__": {"a": 1}}), "__metadata__")
    _expect(raw_file(tmp_path / "n.safetensors", {"__metadata__": ["a"]}), "__metadata__")


@pytest.mark.parametrize("drop", ["dtype", "shape", "data_offsets"])
def test_entry_missing_field(tmp_path, drop):
    entry = {"dtype": "U8", "shape": [2], "data_offsets": [0, 2]}
    del entry[drop]
    _expect(raw_file(tmp_path / "x.safetensors", {"w": entry}, b"\0\0"), "'w'", repr(drop))


def test_entry_malformed(tmp_path):
    _expect(raw_file(tmp_path / "a.safetensors", {"w": 3}), "not a JSON object")
    _expect(raw_file(tmp_path / "b.safetensors", {"w": {"dtype": "U8", "shape": [-1], "data_offsets": [0, 0]}}),
            "invalid shape")
    _expect(raw_file(tmp_path / "c.safetensors", {"w": {"dtype": "U8", "shape": [1], "data_offsets": [0]}}, b"\0"),
            "invalid data_offsets")


def test_unsupported_dtype(tmp_path):
    _expect(raw_file(tmp_path / "a.safetensors", {"w": {"dtype": "F99", "shape": [1], "data_offsets": [0, 1]}},
                     b"\0"), "unsupported dtype 'F99'")
    _expect(raw_file(tmp_path / "b.safetensors", {"w": {"dtype": "F8_E8M0", "shape": [1], "data_offsets": [0, 1]}},
                     b"\0"), "F8_E8M0", "cannot be loaded")


def test_bad_offsets(tmp_path):
    def f(name, hdr, data):
        return raw_file(tmp_path / name, hdr, data)

    u8 = lambda n, a, b: {"dtype": "U8", "shape": [n], "data_offsets": [a, b]}  # noqa: E731
    _expect(f("range.safetensors", {"w": u8(8, 0, 8)}, b"\0" * 4), "only 4 bytes", "truncated")
    _expect(f("rev.safetensors", {"w": u8(0, 4, 2)}, b"\0" * 4), "end 2 is before start 4")
    _expect(f("over.safetensors", {"a": u8(4, 0, 4), "b": u8(4, 2, 6)}, b"\0" * 6), "overlapping", "'a'", "'b'")
    _expect(f("size.safetensors", {"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 4]}}, b"\0" * 4),
            "stored in 4 bytes", "8 bytes")
    _expect(f("gap.safetensors", {"a": u8(2, 0, 2), "b": u8(2, 4, 6)}, b"\0" * 6), "gap of 2")
    _expect(f("tail.safetensors", {"a": u8(2, 0, 2)}, b"\0" * 5), "3 bytes after the last tensor")


def test_zero_size_and_scalar_tensors_are_valid(tmp_path):
    p = raw_file(tmp_path / "z.safetensors", {
        "e": {"dtype": "F32", "shape": [0, 3], "data_offsets": [0, 0]},
        "s": {"dtype": "F32", "shape": [], "data_offsets": [0, 4]},
        "e2": {"dtype": "F16", "shape": [0], "data_offsets": [4, 4]},
    }, struct.pack("<f", 2.5))
    h = read_header(p)
    assert list(h.tensors) == ["e", "s", "e2"]
    with open_source(p) as src:
        assert src.get("s").item() == 2.5 and src.get("e").shape == (0, 3)


# ---------------------------------------------------------------------------------------------- pickles

def test_pickle_suffixes_refused(tmp_path):
    for suffix in (".ckpt", ".pt", ".pth", ".bin"):
        p = tmp_path / f"model{suffix}"
        p.write_bytes(b"anything")
        msg = _expect(p, "never unpickles", "weights_only=True", "save_file")
        with pytest.raises(InputError):
            open_source(p)
        assert "pickle" in msg


def test_pickle_magic_refused_whatever_the_name(tmp_path):
    z = tmp_path / "zip.safetensors"
    torch.save({"w": torch.zeros(2)}, z)
    assert z.read_bytes()[:4] == b"PK\x03\x04"
    _expect(z, "zip archive", "never unpickles")
    legacy = tmp_path / "legacy.safetensors"
    torch.save({"w": torch.zeros(2)}, legacy, _use_new_zipfile_serialization=False)
    assert legacy.read_bytes()[0] == 0x80
    _expect(legacy, "pickle stream", "never unpickles")


def test_header_length_that_looks_like_pickle_magic_is_accepted(tmp_path):
    # A 640-byte header starts the file with 80 02 00 ..., the pickle protocol-2 magic.
    pad = 640 - len(json.dumps({"__metadata__": {"p": ""}, "w": {"dtype": "U8", "shape": [1],
                                                                  "data_offsets": [0, 1]}}).encode())
    hdr = {"__metadata__": {"p": "x" * pad}, "w": {"dtype": "U8", "shape": [1], "data_offsets": [0, 1]}}
    p = raw_file(tmp_path / "m.safetensors", hdr, b"\x07")
    assert p.read_bytes()[:2] == b"\x80\x02"
    check_not_pickle(p)
    assert read_header(p).tensors["w"].shape == (1,)


# ---------------------------------------------------------------------------------------------- big files

def _rchar() -> int | None:
    try:
        for line in Path("/proc/self/io").read_text().splitlines():
            if line.startswith("rchar:"):
                return int(line.split()[1])
    except OSError:
        return None
    return None


def test_header_only_read_of_sparse_2gb_file(tmp_path):
    n = 2 * 1024**3
    hb = json.dumps({"__metadata__": {"k": "v"},
                     "big": {"dtype": "U8", "shape": [n], "data_offsets": [0, n]}}).encode()
    hb += b" " * (-len(hb) % 8)
    p = tmp_path / "big.safetensors"
    with open(p, "wb") as f:
        f.write(struct.pack("<Q", len(hb)) + hb)
        f.truncate(8 + len(hb) + n)
    before = _rchar()
    t0 = time.perf_counter()
    h = read_header(p)
    src = open_source(p)
    elapsed = time.perf_counter() - t0
    after = _rchar()
    assert h.tensors["big"].nbytes == n and src.total_bytes == n and src.shapes() == {"big": (n,)}
    assert elapsed < 2.0
    if before is not None and after is not None:
        assert after - before < 1_000_000
    src.close()


# ---------------------------------------------------------------------------------------------- sources

def test_lazy_get_every_dtype(tmp_path):
    ts = all_dtype_tensors()
    ts["scalar_bf16"] = torch.tensor(1.5, dtype=torch.bfloat16)
    p = tmp_path / "all.safetensors"
    save_file(ts, p, metadata={"m": "1"})
    with open_source(p) as src:
        assert src.kind == "file" and src.files == [p] and src.metadata == {"m": "1"}
        assert set(src.keys()) == set(ts) and len(src) == len(ts)
        assert src.keys() == list(read_header(p).tensors)
        for k, t in ts.items():
            got = src.get(k)
            assert same(got, t), k
            assert src.info(k).torch_dtype == t.dtype and src.dtypes()[k] == dtypes.TORCH_TO_ST[t.dtype]
        assert src.component_of("F16") is None
        assert src.total_bytes == sum(t.numel() * t.element_size() for t in ts.values())
        assert "F32" in src and "nope" not in src
        with pytest.raises(InputError, match="no tensor named 'nope'"):
            src.get("nope")
        assert src.sha256() == hashlib.sha256(p.read_bytes()).hexdigest()
        assert dict(src.iter_tensors(["I8"]))["I8"].dtype == torch.int8


def _make_shards(folder: Path, base: str = "model") -> dict[str, torch.Tensor]:
    parts = [{"z.w": torch.arange(4.0), "a.w": torch.ones(2, 2)},
             {"m.w": torch.full((3,), 2.0, dtype=torch.float16)},
             {"b.w": torch.zeros(1, dtype=torch.int32)}]
    wm = {}
    for i, part in enumerate(parts, 1):
        name = f"{base}-{i:05d}-of-{len(parts):05d}.safetensors"
        save_file(part, folder / name, metadata={"shard": str(i), "common": "x"})
        wm.update({k: name for k in part})
    (folder / f"{base}.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": 123}, "weight_map": wm}))
    return {k: v for part in parts for k, v in part.items()}


def test_sharded_by_index_and_by_shard_name(tmp_path):
    ts = _make_shards(tmp_path)
    idx = tmp_path / "model.safetensors.index.json"
    for path in (idx, tmp_path / "model-00002-of-00003.safetensors"):
        with open_source(path) as src:
            assert src.kind == "sharded" and len(src.files) == 3
            assert src.keys() == ["a.w", "z.w", "m.w", "b.w"]  # shard order, then file order
            assert src.metadata == {"shard": "1", "common": "x"}
            for k, t in ts.items():
                assert same(src.get(k), t)
            assert src.file_of("m.w").name == "model-00002-of-00003.safetensors"
            shas = "".join(hashlib.sha256((tmp_path / f).read_bytes()).hexdigest()
                           for f in sorted(p.name for p in src.files))
            assert src.sha256() == hashlib.sha256(shas.encode()).hexdigest()


def test_shard_name_without_index_is_a_single_file(tmp_path):
    save_file({"a": torch.ones(1)}, tmp_path / "x-00001-of-00002.safetensors")
    with open_source(tmp_path / "x-00001-of-00002.safetensors") as src:
        assert src.kind == "file" and src.keys() == ["a"]


def test_sharded_errors(tmp_path):
    _make_shards(tmp_path)
    idx = tmp_path / "model.safetensors.index.json"
    obj = json.loads(idx.read_text())
    obj["weight_map"]["ghost.w"] = "model-00001-of-00003.safetensors"
    idx.write_text(json.dumps(obj))
    with pytest.raises(InputError, match="'ghost.w'.*does not contain it"):
        open_source(idx)
    obj["weight_map"]["ghost.w"] = "model-00009-of-00009.safetensors"
    idx.write_text(json.dumps(obj))
    with pytest.raises(InputError, match="does not exist beside it"):
        open_source(idx)
    idx.write_text(json.dumps({"metadata": {}}))
    with pytest.raises(InputError, match="weight_map"):
        open_source(idx)
    idx.write_text("{oops")
    with pytest.raises(InputError, match="not a valid JSON"):
        open_source(idx)


def test_sharded_duplicate_tensor(tmp_path):
    save_file({"a": torch.ones(1)}, tmp_path / "m-00001-of-00002.safetensors")
    save_file({"a": torch.ones(1), "b": torch.ones(1)}, tmp_path / "m-00002-of-00002.safetensors")
    (tmp_path / "m.safetensors.index.json").write_text(json.dumps(
        {"weight_map": {"a": "m-00001-of-00002.safetensors", "b": "m-00002-of-00002.safetensors"}}))
    with pytest.raises(InputError, match="in two files"):
        open_source(tmp_path / "m.safetensors.index.json")


def _diffusers_folder(root: Path) -> dict[str, torch.Tensor]:
    root.mkdir()
    (root / "model_index.json").write_text(json.dumps({"_class_name": "StableDiffusionPipeline"}))
    expected = {}
    for comp, fname, tensors in [
        ("vae", "diffusion_pytorch_model.safetensors", {"decoder.w": torch.ones(2)}),
        ("unet", "diffusion_pytorch_model.safetensors", {"conv_in.weight": torch.randn(4, 4, 3, 3).half()}),
        ("text_encoder", "model.safetensors", {"text_model.embeddings.w": torch.randn(3, 2)}),
    ]:
        (root / comp).mkdir()
        (root / comp / "config.json").write_text("{}")
        save_file(tensors, root / comp / fname, metadata={"from": comp})
        expected.update({f"{comp}.{k}": v for k, v in tensors.items()})
    (root / "tokenizer").mkdir()
    (root / "scheduler").mkdir()
    (root / "scheduler" / "scheduler_config.json").write_text("{}")
    return expected


def test_diffusers_folder(tmp_path):
    root = tmp_path / "pipe"
    expected = _diffusers_folder(root)
    tr = root / "transformer"
    tr.mkdir()
    (tr / "config.json").write_text("{}")
    shard_ts = _make_shards(tr, "diffusion_pytorch_model")
    expected.update({f"transformer.{k}": v for k, v in shard_ts.items()})
    with open_source(root) as src:
        assert src.kind == "diffusers"
        assert src.components == ["unet", "transformer", "text_encoder", "vae"]
        assert src.keys()[0] == "unet.conv_in.weight"
        assert src.keys()[1:5] == ["transformer.a.w", "transformer.z.w", "transformer.m.w", "transformer.b.w"]
        assert set(src.keys()) == set(expected)
        for k, t in expected.items():
            assert same(src.get(k), t)
        assert src.component_of("text_encoder.text_model.embeddings.w") == "text_encoder"
        assert src.info("unet.conv_in.weight").name == "unet.conv_in.weight"
        assert src.metadata["from"] == "unet"
        rel = sorted(src.relative_files())
        assert rel[0].startswith("text_encoder/") and "unet/diffusion_pytorch_model.safetensors" in rel
        joined = "".join(hashlib.sha256((root / r).read_bytes()).hexdigest() for r in rel)
        assert src.sha256() == hashlib.sha256(joined.encode()).hexdigest()


def test_component_folder_has_no_prefix(tmp_path):
    root = tmp_path / "pipe"
    _diffusers_folder(root)
    with open_source(root / "unet") as src:
        assert src.kind == "component" and src.keys() == ["conv_in.weight"]
        assert src.component_of("conv_in.weight") is None


def test_component_variant_file_and_errors(tmp_path):
    c = tmp_path / "unet"
    c.mkdir()
    (c / "config.json").write_text("{}")
    with pytest.raises(InputError, match="no weight file"):
        open_source(c)
    (c / "diffusion_pytorch_model.bin").write_bytes(b"x")
    with pytest.raises(InputError, match="only pickle weights.*never unpickles"):
        open_source(c)
    save_file({"w": torch.ones(1)}, c / "diffusion_pytorch_model.fp16.safetensors")
    with open_source(c) as src:
        assert src.keys() == ["w"]
    save_file({"w": torch.ones(1)}, c / "diffusion_pytorch_model.bf16.safetensors")
    with pytest.raises(InputError, match="several candidate weight files"):
        open_source(c)


def test_folders_that_are_not_models(tmp_path):
    d = tmp_path / "loras"
    d.mkdir()
    save_file({"w": torch.ones(1)}, d / "a.safetensors")
    with pytest.raises(InputError, match="not a diffusers model folder.*a.safetensors"):
        open_source(d)
    e = tmp_path / "empty_pipe"
    e.mkdir()
    (e / "model_index.json").write_text("{}")
    with pytest.raises(InputError, match="without any of the components"):
        open_source(e)
    with pytest.raises(InputError, match="does not exist"):
        open_source(tmp_path / "missing")


def test_corrupt_file_inside_folder_names_that_file(tmp_path):
    root = tmp_path / "pipe"
    _diffusers_folder(root)
    bad = root / "unet" / "diffusion_pytorch_model.safetensors"
    bad.write_bytes(bad.read_bytes()[:-3])
    with pytest.raises(InputError) as ei:
        open_source(root)
    assert str(bad) in str(ei.value)


def test_close_releases_handles_and_tensors_stay_valid(tmp_path):
    p = tmp_path / "m.safetensors"
    save_file({"a": torch.arange(6.0)}, p)
    src = open_source(p)
    with src:
        t = src.get("a")
    assert torch.equal(t, torch.arange(6.0))
    assert isinstance(src.info("a"), TensorInfo) and "tensors=1" in repr(src)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_get_onto_cuda(tmp_path):
    p = tmp_path / "m.safetensors"
    ts = {"bf": torch.randn(4, 4).to(torch.bfloat16), "f8": torch.randn(8).to(torch.float8_e4m3fn)}
    save_file(ts, p)
    with open_source(p) as src:
        for k, t in ts.items():
            got = src.get(k, device="cuda")
            assert got.device.type == "cuda" and same(got.cpu(), t)
