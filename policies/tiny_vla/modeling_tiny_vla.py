"""The tiny VLA's architecture: a stock ``LlavaForConditionalGeneration`` with small CLIP and Llama configs."""

from __future__ import annotations

from dataclasses import dataclass

from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration


@dataclass
class TinyVLAArch:
    """Sizes of the model. Defaults learn the tabletop task on 2 CPU cores in minutes."""

    image_size: int = 64
    """Side of the input image (pixels)."""
    patch_size: int = 8
    """Vision patch side: (image_size / patch_size)^2 image tokens."""
    vision_hidden: int = 96
    vision_layers: int = 3
    text_hidden: int = 128
    text_layers: int = 6
    heads: int = 4
    mlp_ratio: int = 2
    vision_feature_layer: int = -1
    """Which vision hidden state becomes the image tokens (0: the patch embeddings themselves)."""

    @property
    def image_tokens(self) -> int:
        return (self.image_size // self.patch_size) ** 2


def build_config(arch: TinyVLAArch, tokenizer) -> LlavaConfig:
    vision = CLIPVisionConfig(
        image_size=arch.image_size,
        patch_size=arch.patch_size,
        hidden_size=arch.vision_hidden,
        intermediate_size=arch.vision_hidden * arch.mlp_ratio,
        num_hidden_layers=arch.vision_layers,
        num_attention_heads=arch.heads,
    )
    text = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=arch.text_hidden,
        intermediate_size=arch.text_hidden * arch.mlp_ratio,
        num_hidden_layers=arch.text_layers,
        num_attention_heads=arch.heads,
        num_key_value_heads=arch.heads,
        max_position_embeddings=256,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        tie_word_embeddings=False,
    )
    return LlavaConfig(
        vision_config=vision,
        text_config=text,
        image_token_index=tokenizer.convert_tokens_to_ids("<image>"),
        vision_feature_select_strategy="default",
        vision_feature_layer=arch.vision_feature_layer,
        image_seq_length=arch.image_tokens,
        projector_hidden_act="gelu",
        multimodal_projector_bias=False,
    )


def build_model(arch: TinyVLAArch, tokenizer) -> LlavaForConditionalGeneration:
    return LlavaForConditionalGeneration(build_config(arch, tokenizer))


def arch_of(config: LlavaConfig) -> TinyVLAArch:
    """The sizes a checkpoint's config was built from (the inverse of :func:`build_config`)."""
    vision, text = config.vision_config, config.text_config
    return TinyVLAArch(
        image_size=vision.image_size,
        patch_size=vision.patch_size,
        vision_hidden=vision.hidden_size,
        vision_layers=vision.num_hidden_layers,
        text_hidden=text.hidden_size,
        text_layers=text.num_hidden_layers,
        heads=text.num_attention_heads,
        mlp_ratio=text.intermediate_size // text.hidden_size,
        vision_feature_layer=config.vision_feature_layer,
    )
