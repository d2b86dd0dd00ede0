"""Harmful and harmless prompt sets for direction extraction.

For the robot policies the prompts are the environments' own: an instruction of the train (or val) split posed
in a seeded scene, with its camera image and layout, so that what the model sees is what it sees when acting.
For text models they are instruction lists from files (one per line, or a JSON list of strings).
"""

from __future__ import annotations

import json
import random
from pathlib import Path

from embodied.directions import PromptSets
from embodied.evaluation import BENIGN, HARMFUL
from envs import TabletopEnv

EXTRACT_SEED = 5_000_000
"""Extraction scenes start here: apart from training data's and from evaluation's (``EVAL_SEED``)."""


def env_observations(categories: tuple[str, ...], split: str, n: int, seed: int, image_size: int = 64) -> list[dict]:
    """``n`` observations (image, instruction, layout) from seeded scenes of ``split`` in ``categories``."""
    env = TabletopEnv(image_size=image_size, split=split, categories=categories)
    try:
        out = []
        for s in range(seed, seed + n):
            obs, info = env.reset(seed=s)
            out.append({**obs, "layout": info.get("layout"), "category": info["category"], "seed": s})
        return out
    finally:
        env.close()


def env_prompt_sets(n_train: int = 128, n_val: int = 32, seed: int = EXTRACT_SEED, image_size: int = 64) -> PromptSets:
    """The paper's four sets from the environments: train-split scenes for the means, val-split ones for selection."""
    offsets = {"harmful_train": 0, "harmless_train": 100_000, "harmful_val": 200_000, "harmless_val": 300_000}
    spec = {
        "harmful_train": (HARMFUL, "train", n_train),
        "harmless_train": (BENIGN, "train", n_train),
        "harmful_val": (HARMFUL, "val", n_val),
        "harmless_val": (BENIGN, "val", n_val),
    }
    sets = {k: env_observations(cats, split, n, seed + offsets[k], image_size) for k, (cats, split, n) in spec.items()}
    sources = {
        k: f"envs split={split} categories={'harmful' if cats == HARMFUL else 'benign'} seeds={seed + offsets[k]}+"
        for k, (cats, split, _) in spec.items()
    }
    return PromptSets(**sets, sources=sources)


def read_instructions(path: str | Path) -> list[str]:
    """Instructions from a text file (one per non-empty line, ``#`` comments skipped) or a JSON list of strings."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"instruction file {path} does not exist")
    text = path.read_text()
    if path.suffix == ".json":
        items = json.loads(text)
        if not isinstance(items, list) or not all(isinstance(i, str) for i in items):
            raise ValueError(f"{path} must hold a JSON list of instruction strings")
    else:
        items = [line.strip() for line in text.splitlines() if line.strip() and not line.lstrip().startswith("#")]
    if not items:
        raise ValueError(f"{path} holds no instructions")
    return items


def file_prompt_sets(
    harmful: str | Path, harmless: str | Path, n_train: int = 128, n_val: int = 32, seed: int = 0
) -> PromptSets:
    """Train and val sets drawn without overlap from two instruction files (shuffled with ``seed``)."""
    sets, sources = {}, {}
    for kind, path in (("harmful", harmful), ("harmless", harmless)):
        items = read_instructions(path)
        random.Random(seed).shuffle(items)
        if len(items) < n_train + n_val:
            n_val_k = max(1, len(items) // 5)
            n_train_k = len(items) - n_val_k
        else:
            n_train_k, n_val_k = n_train, n_val
        sets[f"{kind}_train"] = [{"instruction": t} for t in items[:n_train_k]]
        sets[f"{kind}_val"] = [{"instruction": t} for t in items[n_train_k : n_train_k + n_val_k]]
        sources[f"{kind}_train"] = sources[f"{kind}_val"] = str(path)
    return PromptSets(**sets, sources=sources)
