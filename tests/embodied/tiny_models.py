"""Tiny random models of every supported family, built in memory, with inputs that exercise their whole path
(image tokens included for the vision-language ones).

Weights are re-drawn at a scale where every module matters (norm gains away from 1, non-zero biases), so that an
intervention that misses a write or a norm shows up in the logits.
"""

from __future__ import annotations

import torch
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoModelForImageTextToText,
    CLIPVisionConfig,
    LlamaConfig,
    LlavaConfig,
)

VOCAB = 96
IDS = dict(pad_token_id=0, bos_token_id=1, eos_token_id=2)
IMAGE_TOKEN = 95
TEXT = dict(
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=3,
    num_attention_heads=4,
    num_key_value_heads=2,
    vocab_size=VOCAB,
    **IDS,
)

TEXT_FAMILIES = ("llama", "mistral", "qwen2", "qwen3", "phi3", "gemma2", "gemma3_text", "gpt2", "gpt_neox")
VLM_FAMILIES = ("llava", "qwen2_vl", "qwen2_5_vl", "idefics3")
FAMILIES = TEXT_FAMILIES + VLM_FAMILIES


def _text_config(model_type: str):
    if model_type == "gpt2":
        return AutoConfig.for_model("gpt2", n_embd=32, n_layer=3, n_head=4, vocab_size=VOCAB, n_positions=64, **IDS)
    extra = {"head_dim": 8} if model_type in ("gemma2", "gemma3_text", "qwen3") else {}
    return AutoConfig.for_model(model_type, **TEXT, **extra)


def _vlm_config(model_type: str):
    text = {k: v for k, v in TEXT.items()}
    if model_type == "llava":
        vision = CLIPVisionConfig(
            image_size=16,
            patch_size=8,
            hidden_size=16,
            intermediate_size=32,
            num_hidden_layers=1,
            num_attention_heads=2,
        )
        return LlavaConfig(
            vision_config=vision,
            text_config=LlamaConfig(**text),
            image_token_index=IMAGE_TOKEN,
            image_seq_length=4,
            vision_feature_select_strategy="default",
            vision_feature_layer=-1,
        )
    if model_type in ("qwen2_vl", "qwen2_5_vl"):
        rope = {"rope_type": "default", "mrope_section": [2, 1, 1], "rope_theta": 10000.0}
        if model_type == "qwen2_vl":
            vision = dict(depth=1, embed_dim=16, hidden_size=32, num_heads=2, patch_size=4, spatial_merge_size=2)
        else:
            vision = dict(
                depth=1,
                hidden_size=16,
                out_hidden_size=32,
                intermediate_size=32,
                num_heads=2,
                patch_size=4,
                spatial_merge_size=2,
                fullatt_block_indexes=[0],
            )
        return AutoConfig.for_model(
            model_type,
            text_config=dict(model_type=f"{model_type}_text", **text, rope_parameters=rope),
            vision_config=vision,
            image_token_id=IMAGE_TOKEN,
            video_token_id=94,
            vision_start_token_id=93,
            vision_end_token_id=92,
        )
    if model_type == "idefics3":
        return AutoConfig.for_model(
            "idefics3",
            text_config=dict(model_type="llama", **text),
            vision_config=dict(
                hidden_size=16,
                intermediate_size=32,
                num_hidden_layers=1,
                num_attention_heads=2,
                image_size=16,
                patch_size=4,
            ),
            image_token_id=IMAGE_TOKEN,
            scale_factor=2,
            **IDS,
        )
    raise KeyError(model_type)


@torch.no_grad()
def _redraw(model: torch.nn.Module, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    for name, p in model.named_parameters():
        if p.dim() == 1:
            is_gain = any(k in name for k in ("norm", "ln", "layer_norm")) and name.endswith("weight")
            noise = 0.3 * torch.randn(p.shape, generator=g)
            p.copy_(1 + noise if is_gain else 0.5 * noise)
        else:
            p.copy_(torch.randn(p.shape, generator=g) / p.shape[-1] ** 0.5)


def build(model_type: str, seed: int = 0) -> torch.nn.Module:
    """A tiny random model of ``model_type`` in eval mode, float32."""
    torch.manual_seed(seed)
    if model_type in TEXT_FAMILIES:
        model = AutoModelForCausalLM.from_config(_text_config(model_type))
    else:
        model = AutoModelForImageTextToText.from_config(_vlm_config(model_type))
    _redraw(model, seed)
    return model.eval()


def inputs(model_type: str, batch: int = 2, seq: int = 7, seed: int = 0) -> dict:
    """Random inputs for ``build(model_type)``; vision-language models get an image per sequence."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, 90, (batch, seq), generator=g)
    if model_type in TEXT_FAMILIES:
        return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    if model_type == "llava":
        image = torch.full((batch, 4), IMAGE_TOKEN)
        ids = torch.cat([ids[:, :2], image, ids[:, 2:]], dim=1)
        return {
            "input_ids": ids,
            "attention_mask": torch.ones_like(ids),
            "pixel_values": torch.randn(batch, 3, 16, 16, generator=g),
        }
    if model_type in ("qwen2_vl", "qwen2_5_vl"):
        # a 4 x 4 grid of 4-pixel patches, merged 2 x 2 into 4 image tokens per image
        image = torch.tensor([93, *[IMAGE_TOKEN] * 4, 92]).expand(batch, -1)
        ids = torch.cat([ids[:, :2], image, ids[:, 2:]], dim=1)
        patch = 3 * 2 * 4 * 4  # channels x temporal patch x patch x patch
        return {
            "input_ids": ids,
            "attention_mask": torch.ones_like(ids),
            "pixel_values": torch.randn(batch * 16, patch, generator=g),
            "image_grid_thw": torch.tensor([[1, 4, 4]] * batch),
            "mm_token_type_ids": (ids == IMAGE_TOKEN).long(),  # 1 marks image tokens for multimodal RoPE
        }
    if model_type == "idefics3":
        # 16 x 16 image, 4-pixel patches -> 16 patches, pixel-shuffled by 2 -> 4 image tokens
        image = torch.full((batch, 4), IMAGE_TOKEN)
        ids = torch.cat([ids[:, :2], image, ids[:, 2:]], dim=1)
        return {
            "input_ids": ids,
            "attention_mask": torch.ones_like(ids),
            "pixel_values": torch.randn(batch, 1, 3, 16, 16, generator=g),
        }
    raise KeyError(model_type)
