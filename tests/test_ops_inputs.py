from pathlib import Path

import pytest

from lorasurgery.errors import PlanError
from lorasurgery.ops.inputs import parse_weighted


@pytest.mark.parametrize("text, path, weight, blocks", [
    ("a.safetensors", "a.safetensors", 1.0, None),
    ("a.safetensors:0.8", "a.safetensors", 0.8, None),
    ("a.safetensors:-0.3", "a.safetensors", -0.3, None),
    ("a.safetensors:0.8:OUTD", "a.safetensors", 0.8, "OUTD"),
    ("a.safetensors:1:IN04=0,OUT03=0.5", "a.safetensors", 1.0, "IN04=0,OUT03=0.5"),
    ("C:/x/a.safetensors:0.5", "C:/x/a.safetensors", 0.5, None),
    ("C:/x/a.safetensors:0.5:ALL", "C:/x/a.safetensors", 0.5, "ALL"),
    ("dir/a.safetensors:1e-1", "dir/a.safetensors", 0.1, None),
])
def test_parse(text, path, weight, blocks):
    w = parse_weighted(text)
    assert (w.path, w.weight, w.blocks) == (Path(path), weight, blocks)


def test_bad_weight():
    with pytest.raises(PlanError, match="not a number"):
        parse_weighted("a.safetensors:heavy")


def test_existing_file_with_colon_wins(tmp_path):
    p = tmp_path / "odd:0.5"
    p.write_bytes(b"")
    assert parse_weighted(str(p)).path == p
