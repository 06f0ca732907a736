"""Suffix splitting for every LoRA key convention."""
import pytest

from lorasurgery.formats.keys import looks_like_lora, split_key, split_keys


@pytest.mark.parametrize("key, module, suffix", [
    ("lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight", "lora_unet_down_blocks_0_attentions_0_proj_in", "lora_down.weight"),
    ("lora_te1_text_model_encoder_layers_0_self_attn_q_proj.alpha", "lora_te1_text_model_encoder_layers_0_self_attn_q_proj", "alpha"),
    ("unet.down_blocks.0.attentions.0.proj_in.lora_A.weight", "unet.down_blocks.0.attentions.0.proj_in", "lora_down.weight"),
    ("transformer.transformer_blocks.0.attn.to_q.lora_B.weight", "transformer.transformer_blocks.0.attn.to_q", "lora_up.weight"),
    ("unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.processor.to_q_lora.down.weight",
     "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q", "lora_down.weight"),
    ("unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.processor.to_out_lora.up.weight",
     "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_out.0", "lora_up.weight"),
    ("text_encoder.text_model.encoder.layers.0.self_attn.q_proj.lora_linear_layer.down.weight",
     "text_encoder.text_model.encoder.layers.0.self_attn.q_proj", "lora_down.weight"),
    ("unet.mid_block.attentions.0.proj_in.lora.up.weight", "unet.mid_block.attentions.0.proj_in", "lora_up.weight"),
    ("double_blocks.0.processor.qkv_lora1.down.weight", "double_blocks.0.processor.qkv_lora1", "lora_down.weight"),
    ("lycoris_single_transformer_blocks_17_attn_to_q.lokr_w1", "lycoris_single_transformer_blocks_17_attn_to_q", "lokr_w1"),
    ("lora_unet_x.hada_w1_a", "lora_unet_x", "hada_w1_a"),
    ("lora_unet_x.diff_b", "lora_unet_x", "diff_b"),
    ("lora_unet_x.b1.weight", "lora_unet_x", "b1.weight"),
    ("lora_unet_x.lora_mid.weight", "lora_unet_x", "lora_mid.weight"),
])
def test_split_key(key, module, suffix):
    s = split_key(key)
    assert (s.module, s.suffix) == (module, suffix)


def test_ia3_weight_only_with_on_input():
    keys = ["lora_unet_a.weight", "lora_unet_a.on_input", "model.diffusion_model.x.weight"]
    done, unknown = split_keys(keys)
    assert {(s.module, s.suffix) for s in done} == {("lora_unet_a", "weight"), ("lora_unet_a", "on_input")}
    assert unknown == ["model.diffusion_model.x.weight"]


def test_foreign_tensors_are_reported():
    s = split_key("double_blocks.0.img_attn.qkv.lora_B.bias")
    assert s.foreign and "bias" in s.foreign


def test_looks_like_lora():
    assert looks_like_lora(["a.lora_down.weight", "a.lora_up.weight", "a.alpha"])
    assert not looks_like_lora(["model.diffusion_model.input_blocks.0.0.weight", "first_stage_model.x.bias"])
    assert not looks_like_lora([])
