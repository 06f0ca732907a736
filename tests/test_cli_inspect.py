"""`lorasurgery inspect` and the CLI's error handling, end to end."""
import json
import struct

import pytest
from click.testing import CliRunner

from lorasurgery.cli import main
from lorasurgery.testing import save, tiny_checkpoint, tiny_lora


def run(*args):
    return CliRunner().invoke(main, list(map(str, args)))


def test_version_and_help():
    r = run("--version")
    assert r.exit_code == 0 and "lorasurgery" in r.output
    r = run("--help")
    assert r.exit_code == 0 and "Examples" in r.output and "inspect" in r.output


@pytest.mark.parametrize("arch", ["sd1", "sdxl", "flux"])
def test_inspect_lora_json(tmp_path, arch):
    p = save(tiny_lora(arch, "kohya", rank=4, alpha=2.0), tmp_path / "l.safetensors")
    r = run("inspect", p, "--json")
    assert r.exit_code == 0, r.output
    rep = json.loads(r.output)
    assert rep["kind"] == "lora" and rep["architecture"] == arch and rep["key_format"] == "kohya"
    assert rep["algorithms"] == {"lora": rep["modules"]} and rep["ranks"] == {"4": rep["modules"]}
    assert "uninterpreted" not in rep


def test_inspect_blocks(tmp_path):
    p = save(tiny_lora("sdxl", "kohya"), tmp_path / "l.safetensors")
    rep = json.loads(run("inspect", p, "--json", "--blocks").output)
    blocks = {b["block"]: b for b in rep["blocks"]}
    assert len(blocks) == 20  # the SDXL full layout; no module in OTHER
    assert blocks["IN01"]["modules"] == 0 and blocks["IN01"]["norm"] == 0
    assert blocks["OUT00"]["modules"] > 0 and blocks["OUT00"]["norm"] > 0
    r = run("inspect", p, "--blocks")
    assert r.exit_code == 0 and "per block" in r.output


def test_inspect_checkpoint(tmp_path):
    p = save(tiny_checkpoint("flux", "comfy"), tmp_path / "c.safetensors")
    rep = json.loads(run("inspect", p, "--json").output)
    assert (rep["kind"], rep["architecture"], rep["layout"]) == ("checkpoint", "flux", "comfy")
    assert rep["unmapped_keys"] == 0 and rep["confidence"] == 1.0
    r = run("inspect", p)
    assert r.exit_code == 0 and "comfy" in r.output


def test_inspect_reports_uninterpreted_keys(tmp_path):
    tensors = dict(tiny_lora("sd1", "kohya"))
    import torch
    tensors["lora_unet_not_a_module.lora_down.weight"] = torch.zeros(2, 4)
    tensors["lora_unet_not_a_module.lora_up.weight"] = torch.zeros(4, 2)
    p = save(tensors, tmp_path / "l.safetensors")
    rep = json.loads(run("inspect", p, "--json").output)
    assert rep["uninterpreted_keys"] == 2
    assert any("lora_unet_not_a_module" in line for line in rep["uninterpreted"])


def _bad_files(tmp_path):
    ok = save(tiny_lora("sd1"), tmp_path / "ok.safetensors").read_bytes()
    n = struct.unpack("<Q", ok[:8])[0]
    cases = {
        "empty.safetensors": b"",
        "truncated.safetensors": ok[: len(ok) // 2],
        "header-too-long.safetensors": struct.pack("<Q", 10 ** 7) + ok[8:100],
        "corrupt-json.safetensors": ok[:8] + b"{" * n + ok[8 + n:],
        "model.ckpt": b"PK\x03\x04" + b"\x00" * 64,
    }
    for name, data in cases.items():
        (tmp_path / name).write_bytes(data)
    return list(cases)


def test_bad_inputs_exit_1_with_one_paragraph(tmp_path):
    for name in _bad_files(tmp_path) + ["missing.safetensors"]:
        r = run("inspect", tmp_path / name)
        assert r.exit_code == 1, (name, r.output)
        assert "error:" in r.output and name in r.output.replace("\n", "")
        assert "Traceback" not in r.output
    r = run("inspect", tmp_path)  # a folder that is no diffusers folder
    assert r.exit_code == 1 and "folder" in r.output


def test_pickle_never_unpickled(tmp_path):
    p = tmp_path / "model.ckpt"
    p.write_bytes(b"PK\x03\x04" + b"\x00" * 64)
    r = run("inspect", p)
    assert r.exit_code == 1 and "unpickl" in r.output.lower() and "safetensors" in r.output


def test_debug_shows_traceback(tmp_path):
    r = run("--debug", "inspect", tmp_path / "missing.safetensors")
    assert r.exit_code == 1 and "Traceback" in (r.output + str(r.stderr_bytes or b""))
