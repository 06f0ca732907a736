"""LoRA output metadata: network module, dims, hashes of the written bytes."""
import torch

from lorasurgery.delta import parse_module
from lorasurgery.io.hashes import sshs_model_hash
from lorasurgery.io.reader import read_header
from lorasurgery.ops.output import write_lora
from lorasurgery.testing import tiny_lora_deltas, tiny_table


def test_network_module_and_hashes(tmp_path):
    table = tiny_table("sd1")
    items = tiny_lora_deltas(table, rank=2)
    out = write_lora(tmp_path / "plain.safetensors", items, table, "kohya", dtype=torch.float16, inputs=[], options={})
    meta = read_header(out.path).metadata
    assert meta["ss_network_module"] == "networks.lora" and meta["ss_network_dim"] == "2"
    assert meta["sshs_model_hash"] == sshs_model_hash(out.path) == out.model_hash
    k = next(iter(items))
    d = items[k]
    g = torch.Generator().manual_seed(0)
    items[k] = parse_module("x", {"hada_w1_a": torch.randn(d.up.shape[0], 2, generator=g),
                                  "hada_w1_b": torch.randn(2, d.down.shape[1], generator=g),
                                  "hada_w2_a": torch.randn(d.up.shape[0], 2, generator=g),
                                  "hada_w2_b": torch.randn(2, d.down.shape[1], generator=g),
                                  "alpha": torch.tensor(1.0)})
    out = write_lora(tmp_path / "loha.safetensors", items, table, "kohya", dtype=None, inputs=[], options={})
    assert read_header(out.path).metadata["ss_network_module"] == "lycoris.kohya"
