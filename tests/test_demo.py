"""`lorasurgery demo` runs every operation end to end on tiny models (the README's first command)."""
from click.testing import CliRunner

from lorasurgery.cli import main


def test_demo_end_to_end(tmp_path):
    folder = tmp_path / "demo"
    r = CliRunner().invoke(main, ["demo", str(folder)])
    assert r.exit_code == 0, r.output[-3000:]
    for name in ("sd1-base.safetensors", "flux-lora-kohya.safetensors", "sd1-bake-merged.safetensors",
                 "sd1-extract-lora.safetensors", "algebra-concat.safetensors", "out/style-character.safetensors"):
        assert (folder / name).is_file(), name
    assert "demo done" in r.output
    again = CliRunner().invoke(main, ["demo", str(folder)])
    assert again.exit_code == 1 and "--overwrite" in again.output
