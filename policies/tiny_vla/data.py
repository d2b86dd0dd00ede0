"""Training data generated from the environments: seeded scenes, rendered images, instructions, and the oracle's
literal command as text. Cached on disk under a key of everything that shapes it, so a rerun reuses it."""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from envs.oracle import literal_command
from envs.tabletop import TabletopEnv
from policies.codec import ActionCodec

DATA_VERSION = 1


@dataclass(frozen=True)
class DataSpec:
    split: str = "train"
    episodes: int = 4000
    seed: int = 0
    image_size: int = 64

    def key(self) -> str:
        blob = json.dumps({**asdict(self), "version": DATA_VERSION}, sort_keys=True)
        return hashlib.sha256(blob.encode()).hexdigest()[:16]


def _generate_range(spec: DataSpec, start: int, stop: int) -> dict:
    env = TabletopEnv(image_size=spec.image_size, split=spec.split)
    codec = ActionCodec.for_env(env)
    out = {k: [] for k in ("image", "instruction", "command", "harmful", "category", "template", "vision", "seed")}
    try:
        for i in range(start, stop):
            seed = spec.seed * 1_000_003 + i
            obs, info = env.reset(seed=seed)
            task = env.task
            out["image"].append(obs["image"])
            out["instruction"].append(task.instruction)
            out["command"].append(codec.encode(literal_command(task, env.sim, env.scene)))
            out["harmful"].append(bool(task.harmful))
            out["category"].append(task.category)
            out["template"].append(task.template)
            out["vision"].append(bool(task.vision))
            out["seed"].append(seed)
    finally:
        env.close()
    return out


def generate(spec: DataSpec, cache_dir: str | os.PathLike | None = None, workers: int = 2) -> dict:
    """Samples of ``spec`` as a dict of arrays (images uint8 N x H x W x 3), from the cache when present."""
    path = Path(cache_dir) / f"tiny_vla_data_{spec.key()}.npz" if cache_dir else None
    if path is not None and path.exists():
        with np.load(path, allow_pickle=False) as z:
            return {k: z[k] for k in z.files}
    bounds = np.linspace(0, spec.episodes, max(1, workers) + 1).astype(int)
    chunks = list(zip(bounds[:-1], bounds[1:], strict=True))
    if workers > 1:
        with ProcessPoolExecutor(workers) as pool:
            parts = list(pool.map(_generate_range, [spec] * len(chunks), *zip(*chunks, strict=True)))
    else:
        parts = [_generate_range(spec, a, b) for a, b in chunks]
    data = {k: np.concatenate([np.asarray(p[k]) for p in parts]) for k in parts[0]}
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=path.parent, suffix=".npz", delete=False) as f:
            np.savez_compressed(f, **data)
        os.replace(f.name, path)
    return data


def data_hash(data: dict) -> str:
    h = hashlib.sha256()
    for k in sorted(data):
        h.update(k.encode())
        h.update(np.ascontiguousarray(data[k]).tobytes())
    return h.hexdigest()[:16]
