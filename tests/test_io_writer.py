"""Tests for lorasurgery.io.writer and lorasurgery.io.metadata."""
from __future__ import annotations

import hashlib
import json
import os
import struct
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors import safe_open
from safetensors.torch import save, save_file

from lorasurgery import __version__
from lorasurgery.errors import OutputError, PlanError
from lorasurgery.io import dtypes
from lorasurgery.io.hashes import sshs_legacy_hash_file, sshs_model_hash
from lorasurgery.io.metadata import canonical_json, lora_metadata, parse_arch, provenance, title_of
from lorasurgery.io.reader import read_header
from lorasurgery.io.writer import StreamingWriter, TensorSpec, encode_header, safetensors_order, write_file


def sample_tensors() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    base = torch.randn(3, 5, generator=g)
    out: dict[str, torch.Tensor] = {}
    for st, dt in dtypes.ST_TO_TORCH.items():
        if dt in (torch.uint16, torch.uint32, torch.uint64):
            out[f"t_{st}"] = torch.arange(15, dtype=torch.int64).reshape(3, 5).to(dt)
        elif dt == torch.bool:
            out[f"t_{st}"] = base > 0
        elif dt == torch.complex64:
            out[f"t_{st}"] = torch.complex(base, base * 2)
        else:
            out[f"t_{st}"] = (base * 100).to(dt)
    out["scalar_alpha"] = torch.tensor(8.0)
    out["scalar_bf16"] = torch.tensor(-3.5, dtype=torch.bfloat16)
    out["empty"] = torch.zeros(0, 4, dtype=torch.float16)
    out["odd_u8"] = torch.tensor([1, 2, 3], dtype=torch.uint8)  # leaves the next tensor unaligned
    out["after_odd"] = torch.tensor([1.25, -2.5], dtype=torch.float64)
    return out


def raw(t: torch.Tensor) -> bytes:
    return t.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()


def specs_of(ts: dict[str, torch.Tensor]) -> list[TensorSpec]:
    return [TensorSpec(n, t.dtype, t.shape) for n, t in ts.items()]


def leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if ".tmp-" in p.name)


# ---------------------------------------------------------------------------------------------- round trip

def test_round_trip_all_dtypes(tmp_path):
    ts = sample_tensors()
    out = tmp_path / "out.safetensors"
    with StreamingWriter(out, specs_of(ts), {"b": "2", "a": "é"}) as w:
        for n, t in ts.items():
            w.write(n, t)
    assert w.model_hash == sshs_model_hash(out)
    h = read_header(out)  # strict validation passes
    assert list(h.tensors) == list(ts)  # laid out in the given order
    assert h.metadata == {"a": "é", "b": "2"} and h.data_offset % 8 == 0
    with safe_open(str(out), framework="pt") as f:
        assert set(f.keys()) == set(ts) and f.metadata() == {"a": "é", "b": "2"}
        for n, t in ts.items():
            got = f.get_tensor(n)
            assert got.dtype == t.dtype and got.shape == t.shape and raw(got) == raw(t), n
    assert leftovers(tmp_path) == []


def test_header_layout_and_determinism(tmp_path):
    ts = sample_tensors()
    a, b = tmp_path / "a.safetensors", tmp_path / "b.safetensors"
    write_file(a, ts, {"z": "1", "m": "2", "a": "3"})
    write_file(b, list(ts.items()), {"a": "3", "m": "2", "z": "1"})
    assert a.read_bytes() == b.read_bytes()
    data = a.read_bytes()
    n = struct.unpack("<Q", data[:8])[0]
    hdr = data[8:8 + n]
    assert n % 8 == 0 and hdr.startswith(b'{"__metadata__":{"a":"3","m":"2","z":"1"},')
    assert hdr.rstrip(b" ").endswith(b"}") and json.loads(hdr)["t_F32"]["data_offsets"][1] > 0


def test_identical_to_safetensors_in_its_order(tmp_path):
    ts = sample_tensors()
    ours, ref = tmp_path / "ours.safetensors", tmp_path / "ref.safetensors"
    specs = safetensors_order(specs_of(ts))
    with StreamingWriter(ours, specs, {"only": "one key"}) as w:
        for s in specs:
            w.write(s.name, ts[s.name])
    save_file(ts, ref, metadata={"only": "one key"})
    assert ours.read_bytes() == ref.read_bytes()
    write_file(ours, {k: ts[k] for k in ("t_F32", "t_F16")}, overwrite=True)
    save_file({"t_F16": ts["t_F16"], "t_F32": ts["t_F32"]}, ref)
    assert ours.read_bytes() == ref.read_bytes()  # no metadata -> no __metadata__ entry


def test_encode_header_matches_safetensors_escaping():
    name = 'wéird\n"\\\x01\u2028name'
    t = torch.zeros(2, dtype=torch.float16)
    ref = save({name: t}, {"k": 'v\t"é'})
    n = struct.unpack("<Q", ref[:8])[0]
    hdr, value_at = encode_header([(name, "F16", (2,), 0, 4)], {"k": 'v\t"é'})
    assert hdr == ref[8:8 + n]
    assert hdr[value_at["k"]:].startswith(b'v\\t\\"')


def test_header_written_first_and_noncontiguous_input(tmp_path):
    out = tmp_path / "o.safetensors"
    t = torch.arange(12.0).reshape(3, 4).t()  # non-contiguous view
    w = StreamingWriter(out, [TensorSpec("t", torch.float32, (4, 3))], {"k": "v"})
    w.open()
    (tmp,) = leftovers(tmp_path)
    assert tmp.startswith(".o.safetensors.tmp-")
    data = (tmp_path / tmp).read_bytes()
    head = data[: w.data_offset]
    # the header is written first; the file is allocated at its final size where the filesystem can
    assert len(data) in (w.data_offset, w.data_offset + 48) and not out.exists()
    w.write("t", t)
    w.close()
    assert out.read_bytes()[: w.data_offset] == head
    with safe_open(str(out), framework="pt") as f:
        assert torch.equal(f.get_tensor("t"), t)


_DTS = [torch.float32, torch.float16, torch.bfloat16, torch.float8_e5m2, torch.int16, torch.uint8, torch.bool,
        torch.float64]


@settings(max_examples=25, deadline=None)
@given(st.lists(st.tuples(st.sampled_from(_DTS), st.lists(st.integers(0, 4), max_size=3)), max_size=6),
       st.dictionaries(st.text(max_size=5), st.text(max_size=8), max_size=3))
def test_round_trip_property(tmp_path_factory, entries, meta):
    folder = tmp_path_factory.mktemp("prop")
    g = torch.Generator().manual_seed(len(entries))
    ts = {f"t{i}": (torch.randn(tuple(shape), generator=g) * 50).to(dt) for i, (dt, shape) in enumerate(entries)}
    out = folder / "o.safetensors"
    mh = write_file(out, ts, meta)
    h = read_header(out)
    assert h.metadata == meta and list(h.tensors) == list(ts) and mh == sshs_model_hash(out)
    with safe_open(str(out), framework="pt") as f:
        for n, t in ts.items():
            assert raw(f.get_tensor(n)) == raw(t)


# ---------------------------------------------------------------------------------------------- atomicity

def test_exception_mid_write_leaves_nothing(tmp_path):
    out = tmp_path / "o.safetensors"
    specs = [TensorSpec("a", torch.float32, (2,)), TensorSpec("b", torch.float32, (2,))]
    with pytest.raises(RuntimeError, match="boom"):
        with StreamingWriter(out, specs) as w:
            w.write("a", torch.ones(2))
            raise RuntimeError("boom")
    assert not out.exists() and leftovers(tmp_path) == []


def test_keyboard_interrupt_leaves_nothing_and_keeps_old_output(tmp_path):
    out = tmp_path / "o.safetensors"
    out.write_bytes(b"old")
    specs = [TensorSpec("a", torch.float32, (2,)), TensorSpec("b", torch.float32, (2,))]
    with pytest.raises(KeyboardInterrupt):
        with StreamingWriter(out, specs, overwrite=True) as w:
            w.write("a", torch.ones(2))
            raise KeyboardInterrupt
    assert out.read_bytes() == b"old" and leftovers(tmp_path) == []


def test_missing_tensors_fail_at_close(tmp_path):
    out = tmp_path / "o.safetensors"
    specs = [TensorSpec(n, torch.float32, (1,)) for n in "abcde"]
    with pytest.raises(OutputError, match=r"only 1 of 5 .*'b', 'c', 'd' and 1 more"):
        with StreamingWriter(out, specs) as w:
            w.write("a", torch.ones(1))
    assert not out.exists() and leftovers(tmp_path) == []


def test_abandoned_writer_cleans_up(tmp_path):
    w = StreamingWriter(tmp_path / "o.safetensors", [TensorSpec("a", torch.float32, (1,))])
    w.open()
    assert leftovers(tmp_path)
    w.abort()
    w.abort()
    assert leftovers(tmp_path) == [] and not (tmp_path / "o.safetensors").exists()
    with pytest.raises(OutputError, match="not open"):
        w.write("a", torch.ones(1))


# ---------------------------------------------------------------------------------------------- refusals

def test_overwrite_refusal(tmp_path):
    out = tmp_path / "o.safetensors"
    out.write_bytes(b"keep")
    with pytest.raises(OutputError, match="already exists.*--overwrite") as ei:
        StreamingWriter(out, [])
    assert str(out) in str(ei.value)
    write_file(out, {"a": torch.ones(1)}, overwrite=True)
    assert read_header(out).tensors["a"].shape == (1,)


def test_output_equal_to_input_refused_even_with_overwrite(tmp_path):
    inp = tmp_path / "in.safetensors"
    save_file({"a": torch.ones(1)}, inp)
    link = tmp_path / "link.safetensors"
    link.symlink_to(inp)
    hard = tmp_path / "hard.safetensors"
    os.link(inp, hard)
    for out, inputs in [(inp, [inp]), (link, [inp]), (inp, [link]), (hard, [inp]),
                        (tmp_path / "." / "in.safetensors", [str(inp)])]:
        with pytest.raises(OutputError, match="overwrite the input"):
            StreamingWriter(out, [], overwrite=True, inputs=inputs)
    folder = tmp_path / "pipe"
    (folder / "unet").mkdir(parents=True)
    inside = folder / "unet" / "diffusion_pytorch_model.safetensors"
    save_file({"a": torch.ones(1)}, inside)
    with pytest.raises(OutputError, match="overwrite the input"):
        StreamingWriter(inside, [], overwrite=True, inputs=[folder])
    StreamingWriter(tmp_path / "new.safetensors", [], inputs=[inp, folder])  # a fresh path is fine


def test_up_front_validation(tmp_path):
    ok = tmp_path / "o.safetensors"
    with pytest.raises(OutputError, match="does not exist; create it"):
        StreamingWriter(tmp_path / "no" / "o.safetensors", [])
    with pytest.raises(OutputError, match="folder"):
        StreamingWriter(tmp_path, [])
    with pytest.raises(OutputError, match="'n'.*not a string"):
        StreamingWriter(ok, [], {"n": 3})
    with pytest.raises(OutputError, match="'a' is planned twice"):
        StreamingWriter(ok, [TensorSpec("a", torch.float32, (1,)), TensorSpec("a", torch.float16, (1,))])
    with pytest.raises(OutputError, match="cannot store"):
        StreamingWriter(ok, [TensorSpec("a", torch.float4_e2m1fn_x2, (1,))])
    with pytest.raises(OutputError, match="invalid tensor name"):
        StreamingWriter(ok, [TensorSpec("__metadata__", torch.float32, (1,))])
    assert not ok.exists() and leftovers(tmp_path) == []


def test_order_shape_dtype_errors(tmp_path):
    out = tmp_path / "o.safetensors"
    specs = [TensorSpec("a", torch.float16, (2, 3)), TensorSpec("b", torch.float32, ())]
    with pytest.raises(OutputError):
        with StreamingWriter(out, specs) as w:
            with pytest.raises(OutputError, match="'b' comes later.*next tensor to write is 'a'"):
                w.write("b", torch.tensor(1.0))
            with pytest.raises(OutputError, match="'x' is not in the planned output"):
                w.write("x", torch.tensor(1.0))
            with pytest.raises(OutputError, match=r"'a' has dtype torch.float32.*plan says torch.float16"):
                w.write("a", torch.zeros(2, 3))
            with pytest.raises(OutputError, match=r"'a' has dtype .*\(3, 2\)"):
                w.write("a", torch.zeros(3, 2, dtype=torch.float16))
            with pytest.raises(OutputError, match="not a torch.Tensor"):
                w.write("a", [1, 2])
            w.write("a", torch.zeros(2, 3, dtype=torch.float16))
            with pytest.raises(OutputError, match="'a' was already written"):
                w.write("a", torch.zeros(2, 3, dtype=torch.float16))
            w.write("b", torch.tensor(1.0))
            assert w.written == 2
            with pytest.raises(OutputError, match="already written"):
                w.write("c", torch.tensor(1.0))
            raise OutputError("stop here")
    assert not out.exists()


# ---------------------------------------------------------------------------------------------- reserved values

def test_reserved_filled_in_place(tmp_path):
    out = tmp_path / "o.safetensors"
    specs = [TensorSpec("a", torch.float32, (4,))]
    with StreamingWriter(out, specs, {"keep": "x", "tag": "stale"}, reserved_metadata={"tag": 6}) as w:
        w.write("a", torch.arange(4.0))
        with pytest.raises(OutputError, match="exactly 6"):
            w.fill("tag", "short")
        with pytest.raises(OutputError, match="exactly 6"):
            w.fill("tag", 'ab"def')
        with pytest.raises(OutputError, match="not reserved"):
            w.fill("keep", "y")
        w.fill("tag", "final!")
    assert read_header(out).metadata == {"keep": "x", "tag": "final!"}
    ref = tmp_path / "ref.safetensors"
    write_file(ref, {"a": torch.arange(4.0)}, {"keep": "x", "tag": "final!"})
    assert out.read_bytes() == ref.read_bytes()  # deterministic: only the final values matter


def test_unfilled_reserved_value_fails(tmp_path):
    out = tmp_path / "o.safetensors"
    with pytest.raises(OutputError, match="never filled"):
        with StreamingWriter(out, [], reserved_metadata={"h": 4}):
            pass
    assert not out.exists() and leftovers(tmp_path) == []
    with pytest.raises(OutputError, match="invalid metadata reserved value"):
        StreamingWriter(out, [], reserved_metadata={"h": 0})


def test_fill_sshs_hashes(tmp_path):
    g = torch.Generator().manual_seed(1)
    ts = {"lora_unet_x.lora_up.weight": torch.randn(320, 640, generator=g).half(),
          "lora_unet_x.lora_down.weight": torch.randn(640, 320, generator=g).half(),
          "lora_unet_x.alpha": torch.tensor(4.0),
          "big": torch.randn(300, 300, generator=g)}
    meta = {"ss_network_dim": "4", "ss_network_alpha": "4.0", "modelspec.title": "t", "ss_z": "é"}
    out = tmp_path / "o.safetensors"
    mh = write_file(out, ts, meta, fill_sshs_hashes=True)
    md = read_header(out).metadata
    assert md["sshs_model_hash"] == mh == sshs_model_hash(out)
    ss = {k: v for k, v in meta.items() if k.startswith("ss_")}
    direct = hashlib.sha256(save(ts, ss)[0x100000:0x110000]).hexdigest()[:8]
    assert md["sshs_legacy_hash"] == direct == sshs_legacy_hash_file(out)
    assert direct != "e3b0c442"


# ---------------------------------------------------------------------------------------------- metadata

def test_lora_metadata_sdxl_uniform():
    md = lora_metadata("sdxl", {"m1": 16, "m2": 16}, {"m1": 8, "m2": 8.0}, False, "my lora")
    assert md["ss_network_module"] == "networks.lora"
    assert (md["ss_network_dim"], md["ss_network_alpha"], md["ss_network_args"]) == ("16", "8.0", "{}")
    assert md["ss_v2"] == "False" and md["ss_base_model_version"] == "sdxl_base_v1-0"
    assert md["modelspec.architecture"] == "stable-diffusion-xl-v1-base/lora"
    assert md["modelspec.implementation"] == "https://github.com/Stability-AI/generative-models"
    assert md["modelspec.resolution"] == "1024x1024" and md["modelspec.prediction_type"] == "epsilon"
    assert md["modelspec.sai_model_spec"] == "1.0.1" and md["modelspec.title"] == "my lora"
    assert md["modelspec.implementation_version"] == f"lorasurgery/{__version__}"
    assert "modelspec.date" not in md and not any(k.startswith("sshs_") for k in md)
    assert all(isinstance(v, str) for v in md.values())


def test_lora_metadata_dynamic_conv_and_overrides():
    ranks = {"lin1": 8, "lin2": 4, "conv1": 16, "conv2": 16}
    alphas = {"lin1": 8, "lin2": 4, "conv1": 1.0, "conv2": 1.0}
    md = lora_metadata("sd2-v", ranks, alphas, True, "t", {"ss_training_comment": "x", "modelspec.author": "me"},
                       conv_modules={"conv1", "conv2"}, date="2024-01-02T03:04:05",
                       merged_from=["a", "b"], network_module="lycoris.kohya")
    assert (md["ss_network_dim"], md["ss_network_alpha"]) == ("Dynamic", "Dynamic")
    assert json.loads(md["ss_network_args"]) == {"conv_alpha": "1.0", "conv_dim": "16"}
    assert md["ss_v2"] == "True" and md["ss_base_model_version"] == "sd_v2_v"
    assert md["modelspec.architecture"] == "stable-diffusion-v2-768-v/lora"
    assert md["modelspec.resolution"] == "768x768" and md["modelspec.prediction_type"] == "v"
    assert md["modelspec.date"] == "2024-01-02T03:04:05" and md["modelspec.merged_from"] == "a, b"
    assert md["ss_network_module"] == "lycoris.kohya" and md["modelspec.author"] == "me"
    assert md["ss_training_comment"] == "x"


@pytest.mark.parametrize("arch,module,base,spec,impl,pred", [
    ("sd1", "networks.lora", "sd_v1", "stable-diffusion-v1/lora", "diffusers", "epsilon"),
    ("sd2", "networks.lora", "sd_v2", "stable-diffusion-v2-512/lora", "diffusers", "epsilon"),
    ("sd3", "networks.lora_sd3", "sd3", "stable-diffusion-3-medium/lora", "diffusers", "epsilon"),
    ("sd3-large", "networks.lora_sd3", "sd3", "stable-diffusion-3-large/lora", "diffusers", "epsilon"),
    ("flux", "networks.lora_flux", "flux1", "flux-1-dev/lora", "https://github.com/black-forest-labs/flux", None),
    ("flux-schnell", "networks.lora_flux", "flux1", "flux-1-schnell/lora",
     "https://github.com/black-forest-labs/flux", None),
])
def test_lora_metadata_per_arch(arch, module, base, spec, impl, pred):
    md = lora_metadata(arch, {"m": 4}, {"m": 4.0}, False, "t")
    assert md["ss_network_module"] == module and md["ss_base_model_version"] == base
    assert md["modelspec.architecture"] == spec and md["modelspec.implementation"] == impl
    assert md.get("modelspec.prediction_type") == pred
    if arch.startswith("sd3"):
        assert lora_metadata(arch, {"m": 4}, {"m": 4.0}, False, "t",
                             base_model_version="sd3.5")["ss_base_model_version"] == "sd3.5"


def test_metadata_errors():
    for bad in ("sd4", "sdxl-turbo", "flux-pro", "sd1-v"):
        with pytest.raises(PlanError, match="Unknown architecture"):
            parse_arch(bad)
    with pytest.raises(PlanError, match="without modules"):
        lora_metadata("sd1", {}, {}, False, "t")
    with pytest.raises(PlanError, match="No alpha for module 'b'"):
        lora_metadata("sd1", {"a": 1, "b": 1}, {"a": 1.0}, False, "t")
    with pytest.raises(PlanError, match="not a string"):
        lora_metadata("sd1", {"a": 1}, {"a": 1.0}, False, "t", {"x": 1})
    with pytest.raises(PlanError, match="finite"):
        lora_metadata("sd1", {"a": 1}, {"a": float("nan")}, False, "t")


def test_provenance_is_deterministic_and_path_free(tmp_path):
    inputs = [{"path": str(tmp_path / "loras" / "style.safetensors"), "sha256": "ab" * 32, "size": 10,
               "role": "lora", "weight": 0.7},
              {"path": tmp_path / "char.safetensors", "name": "char", "weight": 1.0}]
    options = {"out": tmp_path / "o.safetensors", "rank": {"max": 64, "method": "sv_fro"}, "src": str(tmp_path)}
    a = provenance(inputs, options, 1234, device="cpu", svd="randomized")
    b = provenance(list(inputs), dict(reversed(list(options.items()))), 1234, device="cpu", svd="randomized")
    assert a == b
    assert str(tmp_path) not in "".join(a.values())
    assert a["lorasurgery.version"] == __version__ and a["lorasurgery.seed"] == "1234"
    rows = json.loads(a["lorasurgery.inputs"])
    assert rows[0] == {"name": "style", "path": "style.safetensors", "sha256": "ab" * 32, "size": 10,
                       "role": "lora", "weight": 0.7}
    assert rows[1]["sha256"] is None and rows[1]["path"] == "char.safetensors"
    assert json.loads(a["lorasurgery.recipe"])["out"] == "o.safetensors"
    env = json.loads(a["lorasurgery.env"])
    assert env["torch"] == torch.__version__ and env["svd"] == "randomized"
    assert {"python", "safetensors", "numpy", "device"} <= set(env)
    assert "lorasurgery.seed" not in provenance([], {}, None)
    with pytest.raises(PlanError, match="unknown provenance fields"):
        provenance([{"path": "a", "colour": "red"}], {}, 1)


def test_canonical_json_and_titles():
    assert canonical_json({"b": 1, "a": [Path("/x/y.safetensors"), (1, 2)]}) == '{"a":["y.safetensors",[1,2]],"b":1}'
    with pytest.raises(ValueError):
        canonical_json({"a": float("inf")})
    assert title_of("/x/my.lora.safetensors") == "my.lora"
    assert title_of("m.safetensors", {"modelspec.title": "Nice"}) == "Nice"


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_write_cuda_tensors(tmp_path):
    ts = {"bf": torch.randn(5, 3, device="cuda").to(torch.bfloat16),
          "f8": torch.randn(7, device="cuda").to(torch.float8_e5m2), "s": torch.tensor(2.0, device="cuda")}
    out = tmp_path / "o.safetensors"
    mh = write_file(out, ts)
    assert mh == sshs_model_hash(out)
    with safe_open(str(out), framework="pt") as f:
        for n, t in ts.items():
            assert raw(f.get_tensor(n)) == raw(t.cpu())


def test_full_disk_is_found_before_any_tensor_is_written(tmp_path, monkeypatch):
    import errno

    import lorasurgery.io.writer as writer

    monkeypatch.setattr(writer, "_fallocate", lambda fd, size: errno.ENOSPC)
    out = tmp_path / "o.safetensors"
    w = StreamingWriter(out, [TensorSpec("t", torch.float32, (1000, 1000))])
    with pytest.raises(OutputError) as e:
        w.open()
    msg = str(e.value)
    assert str(out) in msg and "not enough free space" in msg and "needs 3.8 MiB" in msg
    assert leftovers(tmp_path) == [] and not out.exists()


def test_filesystem_without_fallocate_still_writes(tmp_path, monkeypatch):
    import errno

    import lorasurgery.io.writer as writer

    t = torch.arange(6.0)
    written = []
    for name, result in (("a", None), ("b", errno.EOPNOTSUPP), ("c", errno.EINVAL)):
        if result is not None:
            monkeypatch.setattr(writer, "_fallocate", lambda fd, size, r=result: r)
        out = tmp_path / f"{name}.safetensors"
        with StreamingWriter(out, [TensorSpec("t", torch.float32, (6,))], {"k": "v"}) as w:
            w.write("t", t)
        written.append(out.read_bytes())
    assert written[0] == written[1] == written[2] == save({"t": t}, {"k": "v"})


@pytest.mark.parametrize("fill", [False, True])
def test_hash_in_thread_gives_the_same_file_and_hash(tmp_path, fill):
    g = torch.Generator().manual_seed(0)
    tensors = {f"t{i}": torch.randn(50 + i * 37, generator=g).half() for i in range(12)}
    specs = [TensorSpec(k, v.dtype, tuple(v.shape)) for k, v in tensors.items()]
    outs = []
    for threaded in (False, True):
        out = tmp_path / f"o{int(threaded)}.safetensors"
        with StreamingWriter(out, specs, {"k": "v"}, fill_sshs_hashes=fill, hash_in_thread=threaded) as w:
            for k, v in tensors.items():
                w.write(k, v)
        outs.append((out.read_bytes(), w.model_hash))
    assert outs[0] == outs[1]
    data = outs[0][0]
    n = struct.unpack("<Q", data[:8])[0]
    assert outs[1][1] == hashlib.sha256(data[8 + n:]).hexdigest()


def test_hash_in_thread_abort_leaves_nothing(tmp_path):
    out = tmp_path / "o.safetensors"
    specs = [TensorSpec("a", torch.float32, (4,)), TensorSpec("b", torch.float32, (4,))]
    with pytest.raises(RuntimeError):
        with StreamingWriter(out, specs, hash_in_thread=True) as w:
            w.write("a", torch.ones(4))
            raise RuntimeError("boom")
    assert leftovers(tmp_path) == [] and not out.exists()
    assert not w._sha._thread.is_alive()
