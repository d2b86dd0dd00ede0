"""The tiny VLA as a policy: camera image + instruction -> generated text -> the codec's env action."""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path

import torch
from transformers import AutoModelForImageTextToText, AutoProcessor

from envs.sim import CameraSpec
from policies.base import Decision
from policies.codec import ActionCodec
from policies.generation import greedy_decisions
from policies.tiny_vla.processing_tiny_vla import POST_INSTRUCTION, REFUSAL, prompt_text

POLICY_FILE = "policy.json"
"""Beside the weights: what the checkpoint needs to act (its camera frame, image size, decoding length)."""


def resolve_device(device: str | None) -> torch.device:
    """``None`` or ``"auto"``: CUDA when present, else the CPU. Anything else is used as given."""
    if device in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def resolve_dtype(dtype: str | torch.dtype | None) -> torch.dtype:
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype or torch.float32
    table = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
    if dtype not in table:
        raise ValueError(f"dtype must be one of {sorted(table)}, got {dtype!r}")
    return table[dtype]


def write_policy_file(path: str | Path, camera: CameraSpec, image_size: int, max_new_tokens: int = 16) -> None:
    meta = {"policy": "tiny_vla", "camera": asdict(camera), "image_size": image_size, "max_new_tokens": max_new_tokens}
    (Path(path) / POLICY_FILE).write_text(json.dumps(meta, indent=2) + "\n")


class TinyVLAPolicy:
    """Greedy decoding of a LLaVA-style checkpoint; the text is decoded by :class:`ActionCodec`.

    Args:
        model, processor: a loaded model and its processor.
        codec: turns text into the env's action in the frame the model was trained in.
        name: what records call this policy.
        max_new_tokens: decoding length (commands and the refusal sentence are shorter).
    """

    def __init__(self, model, processor, codec: ActionCodec, name: str = "tiny-vla", max_new_tokens: int = 16):
        self.model = model.eval()
        self.processor = processor
        self.codec = codec
        self.name = name
        self.max_new_tokens = max_new_tokens

    @classmethod
    def from_pretrained(
        cls, path: str | Path, name: str | None = None, device: str | None = None, dtype: str | None = None
    ) -> TinyVLAPolicy:
        path = Path(path)
        meta_path = path / POLICY_FILE
        if not meta_path.exists():
            raise FileNotFoundError(f"{path} has no {POLICY_FILE}: not a tiny-VLA checkpoint folder")
        meta = json.loads(meta_path.read_text())
        model = AutoModelForImageTextToText.from_pretrained(
            path, use_safetensors=True, trust_remote_code=False, dtype=resolve_dtype(dtype)
        ).to(resolve_device(device))
        processor = AutoProcessor.from_pretrained(path, trust_remote_code=False)
        codec = ActionCodec(
            CameraSpec(**{k: tuple(v) if isinstance(v, list) else v for k, v in meta["camera"].items()}),
            int(meta["image_size"]),
        )
        return cls(model, processor, codec, name=name or path.name, max_new_tokens=int(meta.get("max_new_tokens", 16)))

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def reset(self) -> None:
        """Stateless: every decision is made from one observation."""

    @property
    def post_instruction_length(self) -> int:
        """Tokens of the chat template's ``POST_INSTRUCTION`` (``<|end|> <|assistant|>``), the prompt's last
        tokens. (The image tokens come between the instruction and them.)"""
        return len(self.processor.tokenizer.encode(POST_INSTRUCTION, add_special_tokens=False))

    @property
    def refusal_token_ids(self) -> list[int]:
        """The first token of the refusal sentence the model was trained to say (``I``)."""
        return self.processor.tokenizer.encode(REFUSAL, add_special_tokens=False)[:1]

    def inputs(self, observations: list[dict]) -> dict:
        """The model's inputs for a batch of observations (left-padded prompts and pixel values)."""
        texts = [prompt_text(self.processor, str(o["instruction"])) for o in observations]
        images = self.codec.images(observations)
        enc = self.processor(images=images, text=texts, return_tensors="pt", padding=True)
        enc = {k: v.to(self.device) for k, v in enc.items()}
        enc["pixel_values"] = enc["pixel_values"].to(self.model.dtype)
        return enc

    def act_batch(self, observations: list[dict]) -> list[Decision]:
        if not observations:
            return []
        return greedy_decisions(
            self.model, self.inputs(observations), self.processor.tokenizer, self.codec, self.max_new_tokens
        )

    def act(self, observation: dict) -> Decision:
        return self.act_batch([observation])[0]
