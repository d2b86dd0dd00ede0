"""Planners safety-tuned in this repo: a pretrained chat LM (SmolLM2-135M-Instruct) with a LoRA adapter.

A checkpoint folder holds the adapter only (``adapter_config.json`` and ``adapter_model.safetensors``, as peft writes
them), ``policy.json`` (``kind: lora_planner``, the base model, the system prompt and the pixel frame), a model card
and its evaluation. Loading puts the adapter on the base weights and merges it, so the policy is a plain
``LlamaForCausalLM`` under :class:`~policies.hf.HFPlannerPolicy`: directions, hooks and weight orthogonalization see
the same modules as for any checkpoint. :func:`export_merged` writes that merged model as a standalone folder.

Weights come from safetensors (and the base's GGUF) only; ``trust_remote_code`` is never turned on.
"""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path

import torch

from envs.sim import CameraSpec
from policies.codec import ActionCodec
from policies.hf import HFPlannerPolicy
from policies.tiny_vla.policy import POLICY_FILE

KIND = "lora_planner"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
SYSTEM_PROMPT = "You control a robot arm at a table. Reply with one command."
"""The planners' system message: short, because the grammar is learned in training, not read from the prompt."""
BASES = {"smollm2": "HuggingFaceTB/SmolLM2-135M-Instruct"}
"""Base models a planner checkpoint may name (the offline ones), with the hub id an adapter's config records."""


def base_planner(
    base: str = "smollm2",
    device: str | None = None,
    dtype: str | torch.dtype | None = "float32",
    system_prompt: str = SYSTEM_PROMPT,
    codec: ActionCodec | None = None,
    name: str | None = None,
) -> HFPlannerPolicy:
    """The base chat model as a planner with the planners' system prompt (what training starts from)."""
    if base not in BASES:
        raise ValueError(f"unknown planner base {base!r}; known: {sorted(BASES)}")
    import policies

    folder, gguf = policies.smollm2_path()
    planner = HFPlannerPolicy.from_pretrained(folder, gguf_file=gguf, device=device, dtype=dtype, name=name or base)
    planner.system_prompt = system_prompt
    if codec is not None:
        planner.codec = codec
    return planner


def write_policy_file(path: str | Path, base: str, codec: ActionCodec, system_prompt: str, max_new_tokens: int) -> None:
    meta = {
        "kind": KIND,
        "base": base,
        "system_prompt": system_prompt,
        "camera": asdict(codec.camera),
        "image_size": codec.size,
        "max_new_tokens": max_new_tokens,
    }
    (Path(path) / POLICY_FILE).write_text(json.dumps(meta, indent=2) + "\n")


def is_planner_checkpoint(path: str | Path, kind: str = KIND) -> bool:
    """Whether ``path``'s ``policy.json`` says ``kind`` (this module's, or another adapter checkpoint's)."""
    meta = Path(path) / POLICY_FILE
    return meta.is_file() and json.loads(meta.read_text()).get("kind") == kind


def read_policy_file(path: str | Path, kind: str = KIND) -> dict:
    """The ``policy.json`` of an adapter checkpoint of ``kind``; a clear error when it is not one."""
    meta_path = Path(path) / POLICY_FILE
    if not meta_path.is_file():
        raise FileNotFoundError(f"{path} has no {POLICY_FILE}: not a {kind} checkpoint (embodied-train writes one)")
    meta = json.loads(meta_path.read_text())
    if meta.get("kind") != kind:
        raise ValueError(f"{meta_path} says kind {meta.get('kind')!r}, not {kind!r}")
    if not (Path(path) / ADAPTER_WEIGHTS).is_file():
        raise FileNotFoundError(f"{path} has no {ADAPTER_WEIGHTS} (a LoRA adapter in safetensors)")
    return meta


def load_planner(
    path: str | Path, device: str | None = None, dtype: str | torch.dtype | None = "float32", name: str | None = None
) -> HFPlannerPolicy:
    """A planner checkpoint: the base model, its adapter merged in, the checkpoint's system prompt and pixel frame."""
    from peft import PeftModel

    path = Path(path)
    meta = read_policy_file(path)
    camera = CameraSpec(**{k: tuple(v) if isinstance(v, list) else v for k, v in meta["camera"].items()})
    codec = ActionCodec(camera, int(meta["image_size"]))
    planner = base_planner(meta["base"], device, dtype, meta["system_prompt"], codec, name=name or path.name)
    model = PeftModel.from_pretrained(planner.model, str(path), use_safetensors=True)
    planner.model = model.merge_and_unload().eval()
    planner.max_new_tokens = int(meta.get("max_new_tokens", planner.max_new_tokens))
    return planner


def export_merged(path: str | Path, out: str | Path) -> Path:
    """Writes the planner at ``path`` with its adapter merged as a standalone model folder (safetensors and the
    tokenizer with its chat template), loadable by ``HFPlannerPolicy.from_pretrained(out)`` or
    ``AutoModelForCausalLM.from_pretrained(out)``; the system prompt goes into ``policy.json`` beside it."""
    planner = load_planner(path, device="cpu")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    planner.model.save_pretrained(out, safe_serialization=True)
    planner.tokenizer.save_pretrained(out)
    meta = read_policy_file(path)
    (out / "planner.json").write_text(json.dumps({**meta, "kind": "merged_planner"}, indent=2) + "\n")
    return out
