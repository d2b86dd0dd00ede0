"""A vision-language-action policy on a pretrained chat LM: SmolLM2-135M-Instruct with a vision tower (``smol-vla``).

The model is a stock ``LlavaForConditionalGeneration``: a small CLIP vision tower (by default ``tiny-vla-base``'s,
trained in this repo with grounding on 8x8-pixel patches of the 64x64 camera image), a fresh two-layer projector into
the language model's embedding space, SmolLM2-135M-Instruct as the language model, and one added token ``<image>``
whose copies (one per patch) carry the projected image features. The prompt is SmolLM2's own chat format: a system
message, then the instruction and the image in the user turn (the instruction first, so that every image token can
attend to it), then the generation prompt; the reply is a skill command or the refusal sentence, as for every
policy here.

``embodied-train --config-name smol_vla`` (:mod:`embodied.train_smol_vla`) trains a LoRA adapter on the language
model together with the projector (and, with ``train_vision``, the tower). A checkpoint folder holds what training
changed, as peft writes it (``adapter_config.json``, ``adapter_model.safetensors`` with the LoRA weights and the
projector in full), ``policy.json`` (``kind: lora_vla``, the base, the vision source, the system prompt and the pixel
frame), a model card and its evaluation. :func:`load_vla` rebuilds the composition from the installed base and the
vision source, puts the adapter on and merges it, so the policy is a plain ``LlavaForConditionalGeneration`` under
:class:`~policies.hf.HFVLMPolicy`'s path: directions, hooks and orthogonalization see the same modules as for
``tiny-vla``.

Weights come from safetensors (and the base's GGUF) only; ``trust_remote_code`` is never turned on.
"""

from __future__ import annotations

import functools
import json
from dataclasses import asdict
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, LlavaConfig, LlavaForConditionalGeneration, LlavaProcessor

from policies import planner
from policies.codec import ActionCodec
from policies.hf import SAMPLE_INSTRUCTION, HFVLMPolicy
from policies.planner import BASES
from policies.tiny_vla.policy import POLICY_FILE, TinyVLAPolicy, resolve_device, resolve_dtype

KIND = "lora_vla"
IMAGE_TOKEN = "<image>"
SYSTEM_PROMPT = "You control a robot arm at a table. You see the table. Reply with one command."
"""The system message: short, because the grammar is learned in training, not read from the prompt."""
CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n"
    "{% if m['content'] is string %}{{ m['content'] }}{% else %}"
    "{% for c in m['content'] %}{% if c['type'] == 'image' %}<image>{% else %}{{ c['text'] }}{% endif %}{% endfor %}"
    "{% endif %}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
"""SmolLM2's ChatML turns, with content parts so that the image has its place in the user turn."""


class SmolVLAPolicy(HFVLMPolicy):
    """:class:`~policies.hf.HFVLMPolicy` with the prompt this policy is trained on: the system prompt as a system
    message, then the instruction and the image in the user turn."""

    def messages(self, instruction: str) -> list[dict]:
        return [
            {"role": "system", "content": self.system_prompt},
            {"role": "user", "content": [{"type": "text", "text": f"{instruction}\n"}, {"type": "image"}]},
        ]

    def prompt(self, instruction: str) -> str:
        """The chat-templated prompt for one instruction, with one image placeholder (the processor expands it)."""
        return self._render(instruction)

    @property
    def image_tokens(self) -> int:
        """How many ``<image>`` tokens one image becomes (one per patch)."""
        return int(self.model.config.image_seq_length)

    @functools.cached_property
    def post_instruction_length(self) -> int:
        """Tokens after the image (which follows the instruction), up to and including the generation prompt: the
        template's end of the user turn and the assistant's start, where refusal directions are read (the image
        tokens between the instruction and them are not counted, as for ``tiny-vla``)."""
        rendered = self._render(SAMPLE_INSTRUCTION)
        suffix = rendered[rendered.rindex(IMAGE_TOKEN) + len(IMAGE_TOKEN) :]
        return len(self.tokenizer.encode(suffix, add_special_tokens=False))


def compose(language_model, tokenizer, vision_model, image_processor) -> tuple[LlavaForConditionalGeneration, object]:
    """A ``LlavaForConditionalGeneration`` of ``language_model`` (a causal Llama LM, weights copied) and
    ``vision_model``'s vision tower (a LLaVA checkpoint such as ``tiny-vla-base``; weights copied), with a fresh
    projector (initialized from torch's global generator: seed it), and its processor.

    ``tokenizer`` gets the ``<image>`` token (changed in place); its embedding row is zero (the image features
    replace it wherever it stands, so it is never read), and the language model's weights are otherwise unchanged.
    """
    if IMAGE_TOKEN not in tokenizer.get_vocab():
        tokenizer.add_special_tokens({"additional_special_tokens": [IMAGE_TOKEN]})
    image_id = tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)
    text = language_model.config.to_dict()
    text.pop("quantization_config", None)  # the GGUF's: the weights are already dequantized
    text["vocab_size"] = max(len(tokenizer), int(text["vocab_size"]))
    vision = vision_model.config
    side = vision.vision_config.image_size // vision.vision_config.patch_size
    config = LlavaConfig(
        vision_config=vision.vision_config.to_dict(),
        text_config=text,
        image_token_index=image_id,
        image_seq_length=side * side,
        projector_hidden_act="gelu",
        vision_feature_select_strategy="default",
        vision_feature_layer=vision.vision_feature_layer,
        multimodal_projector_bias=True,
        tie_word_embeddings=bool(language_model.config.tie_word_embeddings),
    )
    model = LlavaForConditionalGeneration(config)
    state = language_model.model.state_dict()
    state["embed_tokens.weight"] = _padded(state["embed_tokens.weight"], text["vocab_size"])
    model.model.language_model.load_state_dict(state, strict=True)
    if not config.tie_word_embeddings:
        with torch.no_grad():
            model.lm_head.weight.copy_(_padded(language_model.lm_head.weight, text["vocab_size"]))
    model.model.vision_tower.load_state_dict(vision_model.model.vision_tower.state_dict(), strict=True)
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    processor = LlavaProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        patch_size=vision.vision_config.patch_size,
        vision_feature_select_strategy="default",
        chat_template=CHAT_TEMPLATE,
        image_token=IMAGE_TOKEN,
        num_additional_image_tokens=1,
    )
    return model.eval(), processor


def _padded(weight: torch.Tensor, rows: int) -> torch.Tensor:
    weight = weight.detach()
    extra = rows - weight.shape[0]
    return weight if extra <= 0 else torch.cat([weight, weight.new_zeros(extra, weight.shape[1])])


def base_vla(
    base: str = "smollm2",
    vision: str = "tiny-vla-base",
    device: str | None = None,
    dtype: str | torch.dtype | None = "float32",
    system_prompt: str = SYSTEM_PROMPT,
    name: str | None = None,
) -> SmolVLAPolicy:
    """The installed base chat model given ``vision``'s tower (a built-in name or a tiny-VLA folder) and a fresh
    projector, as a policy in that checkpoint's pixel frame: what training starts from."""
    if base not in BASES:
        raise ValueError(f"unknown base {base!r}; known: {sorted(BASES)}")
    import policies

    folder, gguf = policies.smollm2_path()
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=gguf)
    language_model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=gguf, dtype=torch.float32)
    source = TinyVLAPolicy.from_pretrained(policies.checkpoint_path(vision), device="cpu", dtype="float32")
    model, processor = compose(language_model, tokenizer, source.model, source.processor.image_processor)
    model = model.to(device=resolve_device(device), dtype=resolve_dtype(dtype))
    return SmolVLAPolicy(model, processor, source.codec, name=name or "smol-vla", system_prompt=system_prompt)


def write_policy_file(
    path: str | Path, base: str, vision: str, codec: ActionCodec, system_prompt: str, max_new_tokens: int
) -> None:
    meta = {
        "kind": KIND,
        "base": base,
        "vision": vision,
        "system_prompt": system_prompt,
        "camera": asdict(codec.camera),
        "image_size": codec.size,
        "max_new_tokens": max_new_tokens,
    }
    (Path(path) / POLICY_FILE).write_text(json.dumps(meta, indent=2) + "\n")


def is_vla_checkpoint(path: str | Path) -> bool:
    return planner.is_planner_checkpoint(path, KIND)


def read_policy_file(path: str | Path) -> dict:
    """The checkpoint's ``policy.json``; a clear error when ``path`` is not a smol-vla checkpoint."""
    return planner.read_policy_file(path, KIND)


def load_vla(
    path: str | Path, device: str | None = None, dtype: str | torch.dtype | None = "float32", name: str | None = None
) -> SmolVLAPolicy:
    """A smol-vla checkpoint: the base and the vision source composed, the adapter (and the projector it holds)
    put on and merged, the checkpoint's system prompt and decoding length."""
    from peft import PeftModel

    path = Path(path)
    meta = read_policy_file(path)
    policy = base_vla(meta["base"], meta["vision"], device, dtype, meta["system_prompt"], name=name or path.name)
    model = PeftModel.from_pretrained(policy.model, str(path), use_safetensors=True)
    policy.model = model.merge_and_unload().eval()
    policy.max_new_tokens = int(meta.get("max_new_tokens", policy.max_new_tokens))
    return policy
