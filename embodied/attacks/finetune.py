"""The fine-tuning attack: a few gradient steps on harmful-compliance examples undo safety tuning.

Qi et al. (2023), "Fine-tuning Aligned Language Models Compromises Safety, Even When Users Do Not Intend To!",
showed that ten to a hundred harmful (instruction, compliant answer) pairs and a few epochs remove a chat model's
refusals; Yang et al. (2023), "Shadow Alignment", and Lermen et al. (2023), "LoRA Fine-tuning Efficiently Undoes
Safety Training in Llama 2-Chat 70B", found the same at other scales. Here the pairs are harmful train-split
instructions of the environments and their literal skill commands (what the capability stage taught, and what
safety tuning replaced by the refusal sentence), optionally mixed with benign ones so that the attacked policy
stays useful. The attacked checkpoint is written as a loadable folder beside an ``attack.json`` that names the
source's weights, the config and the examples.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

import policies
from embodied.directions import write_json_atomic
from embodied.models import weights_hash
from embodied.train import DataConfig
from policies.tiny_vla.data import DataSpec, data_hash, generate
from policies.tiny_vla.policy import POLICY_FILE
from policies.tiny_vla.training import StageConfig, patch_targets, pixel_values, stage_targets, tokenize, train_stage

ATTACK_FILE = "attack.json"
FINETUNE_VERSION = 1
"""Part of the cache key: bump it when the attack's recipe changes."""


@dataclass
class FinetuneConfig:
    """One fine-tuning attack."""

    examples: int = 32
    """Harmful-compliance examples: harmful train-split instructions paired with their literal commands."""
    steps: int = 40
    """Optimizer steps (each on ``batch_size`` examples drawn from the set)."""
    lr: float = 1e-3
    batch_size: int = 16
    seed: int = 0
    """Which examples are drawn, and the training's randomness."""
    benign_fraction: float = 0.0
    """Share of benign examples (instruction -> its command) in the set and in every batch, in [0, 1)."""
    warmup: int = 5
    word_dropout: float = 0.1
    """As in the policy's own training: template words of the instruction dropped to ``<unk>`` at random."""
    freeze_embeddings: bool = False
    """False: every weight is trained (the attacker owns the checkpoint)."""
    grounding: bool = True
    """Keep training image tokens to name their object's pixel, as the policy's own training does."""
    data: DataConfig = field(default_factory=DataConfig)
    """Where the examples come from: the policy's training data (generated once, cached)."""
    device: str = "auto"
    """``auto``: CUDA when present, else the CPU (not part of the cache key)."""

    def validate(self) -> None:
        """A clear error for a value the attack cannot run with."""
        if self.examples < 1:
            raise ValueError(f"finetune.examples must be >= 1, got {self.examples}")
        if self.steps < 1 or self.batch_size < 1:
            raise ValueError(
                f"finetune.steps and finetune.batch_size must be >= 1, got {self.steps}, {self.batch_size}"
            )
        if not self.lr > 0:
            raise ValueError(f"finetune.lr must be > 0, got {self.lr}")
        if not 0.0 <= self.benign_fraction < 1.0:
            raise ValueError(f"finetune.benign_fraction must be in [0, 1), got {self.benign_fraction}")
        if self.warmup < 0:
            raise ValueError(f"finetune.warmup must be >= 0, got {self.warmup}")

    @property
    def benign_examples(self) -> int:
        """Benign examples beside the harmful ones, so that they are ``benign_fraction`` of the set."""
        return int(round(self.examples * self.benign_fraction / (1.0 - self.benign_fraction)))

    def data_spec(self) -> DataSpec:
        d = self.data
        return DataSpec(
            split="train", scenes=d.scenes, tasks_per_scene=d.tasks_per_scene, seed=d.seed, image_size=d.image_size
        )


def cache_key(source_hash: str, cfg: FinetuneConfig) -> str:
    """What an attacked checkpoint depends on: the source's weights, the attack's config (its data by the data's
    key; device, workers and the cache folder left out) and the recipe's version."""
    attack = {k: v for k, v in asdict(cfg).items() if k not in ("data", "device")}
    payload = {"source": source_hash, "attack": attack, "data": cfg.data_spec().key(), "version": FINETUNE_VERSION}
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:16]


def select_examples(data: dict, cfg: FinetuneConfig) -> tuple[np.ndarray, np.ndarray]:
    """Sample indices of the harmful and of the benign examples, drawn without replacement with ``cfg.seed``."""
    harmful = np.asarray(data["harmful"], dtype=bool)
    harmful_idx, benign_idx = np.flatnonzero(harmful), np.flatnonzero(~harmful)
    n_benign = cfg.benign_examples
    if cfg.examples > len(harmful_idx) or n_benign > len(benign_idx):
        raise ValueError(
            f"finetune asks for {cfg.examples} harmful and {n_benign} benign examples but the data holds "
            f"{len(harmful_idx)} and {len(benign_idx)}: lower finetune.examples or raise finetune.data.scenes"
        )
    rng = np.random.default_rng(cfg.seed)
    return np.sort(rng.choice(harmful_idx, cfg.examples, replace=False)), np.sort(
        rng.choice(benign_idx, n_benign, replace=False)
    )


def _examples(policy, data: dict, indices: np.ndarray, cfg: FinetuneConfig):
    """Tokenized examples (literal commands as targets) and the pixel values of their scenes."""
    processor = policy.processor
    vision = policy.model.config.vision_config
    scenes = np.asarray(data["scene"])[indices]
    unique, image_index = np.unique(scenes, return_inverse=True)
    pixels = pixel_values(processor, np.asarray(data["image"])[unique])
    patch_labels = None
    if cfg.grounding:
        per_scene = {
            int(s): patch_targets(str(data["objects"][s]), vision.image_size, vision.patch_size, "uv") for s in unique
        }
        patch_labels = [per_scene[int(s)] for s in scenes]
    commands = stage_targets(data, "capability")
    examples = tokenize(
        processor,
        [str(data["instruction"][i]) for i in indices],
        [commands[i] for i in indices],
        image_index,
        np.asarray(data["harmful"], dtype=bool)[indices],
        patch_labels,
    )
    return examples, pixels


def _attack(policy, source: Path, source_hash: str, cfg: FinetuneConfig, out: Path) -> Path:
    t0 = time.perf_counter()
    data = generate(cfg.data_spec(), cache_dir=cfg.data.cache_dir, workers=cfg.data.workers)
    harmful_idx, benign_idx = select_examples(data, cfg)
    indices = np.concatenate([harmful_idx, benign_idx])
    examples, pixels = _examples(policy, data, indices, cfg)
    stage = StageConfig(
        steps=cfg.steps,
        batch_size=min(cfg.batch_size, len(indices)) if not len(benign_idx) else cfg.batch_size,
        lr=cfg.lr,
        warmup=cfg.warmup,
        harmful_fraction=1.0 - cfg.benign_fraction if len(benign_idx) else None,
        freeze_embeddings=cfg.freeze_embeddings,
        word_dropout=cfg.word_dropout,
        log_every=max(1, cfg.steps // 4),
    )
    rows = train_stage(policy.model, examples, pixels, stage, seed=cfg.seed, name="finetune", progress=False)
    out.mkdir(parents=True, exist_ok=True)
    policy.model.save_pretrained(out, safe_serialization=True)
    policy.processor.save_pretrained(out)
    shutil.copyfile(source / POLICY_FILE, out / POLICY_FILE)
    write_json_atomic(
        out / ATTACK_FILE,
        {
            "attack": "finetune",
            "source": str(source),
            "source_weights_hash": source_hash,
            "weights_hash": weights_hash(policy.model),
            "config": asdict(cfg),
            "cache_key": cache_key(source_hash, cfg),
            "data_hash": data_hash(data),
            "harmful_examples": [str(data["instruction"][i]) for i in harmful_idx],
            "benign_examples": [str(data["instruction"][i]) for i in benign_idx],
            "train_log": rows,
            "seconds": round(time.perf_counter() - t0, 1),
        },
    )
    return out


def _load(source: str | Path, cfg: FinetuneConfig):
    path = policies.checkpoint_path(source)
    policy = policies.load(path, device=None if cfg.device == "auto" else cfg.device)
    return policy, path


def finetune_attack(source: str | Path, cfg: FinetuneConfig, out: Path) -> Path:
    """Fine-tunes the checkpoint ``source`` (a built-in name or a folder) on ``cfg``'s harmful-compliance examples
    and writes the attacked checkpoint (weights, processor, ``policy.json``, ``attack.json``) to ``out``."""
    cfg.validate()
    policy, path = _load(source, cfg)
    return _attack(policy, path, weights_hash(policy.model), cfg, Path(out))


def finetuned_cached(
    source: str | Path, cfg: FinetuneConfig, cache_dir: str | os.PathLike = ".cache/embodied/attacks"
) -> Path:
    """The attacked checkpoint from ``cache_dir`` when this attack on these weights was made before, else made
    there: trained into a temporary folder that is then renamed, so a half-written checkpoint is never found."""
    cfg.validate()
    policy, path = _load(source, cfg)
    source_hash = weights_hash(policy.model)
    cache = Path(cache_dir)
    folder = cache / f"finetune-{cache_key(source_hash, cfg)}"
    if (folder / ATTACK_FILE).exists():
        return folder
    cache.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=cache, prefix=f".{folder.name}."))
    try:
        _attack(policy, path, source_hash, cfg, tmp)
        try:
            os.rename(tmp, folder)
        except OSError:  # another process finished the same attack first: keep its folder
            if not (folder / ATTACK_FILE).exists():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return folder
