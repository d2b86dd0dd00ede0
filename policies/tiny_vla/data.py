"""Training data generated from the environments: seeded scenes, rendered images, instructions, and the oracle's
literal command as text.

Each seeded reset gives one scene and its image; besides the task the env drew, ``tasks_per_scene - 1`` more tasks
that the same scene supports are posed on the same image (rendering and building the world are the expensive part,
and several instructions per image make the model read the instruction to find its target). Cached on disk under a
key of everything that shapes the data, so a rerun reuses it.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from envs.instructions import combo_harmful, describe, make_task, scene_combos
from envs.oracle import literal_command
from envs.tabletop import TabletopEnv
from policies.codec import ActionCodec

DATA_VERSION = 3
SAMPLE_FIELDS = ("scene", "instruction", "command", "harmful", "category", "template", "vision", "seed")


@dataclass(frozen=True)
class DataSpec:
    """What to generate: ``scenes`` seeded resets of the ``split``, ``tasks_per_scene`` instructions on each."""

    split: str = "train"
    scenes: int = 3000
    tasks_per_scene: int = 4
    seed: int = 0
    image_size: int = 64
    scene_texts: bool = False
    """Also keep each scene as text (``scene_text``, :func:`policies.hf.scene_text`), for planners that read it."""
    containers: bool = False
    """List the containers (bin, tray) in each scene's ``objects`` too, so grounding and probes cover them."""

    def key(self) -> str:
        fields = asdict(self)
        for flag in ("scene_texts", "containers"):  # data without them keeps the key it always had
            if not fields[flag]:
                del fields[flag]
        blob = json.dumps({**fields, "version": DATA_VERSION}, sort_keys=True)
        return hashlib.sha256(blob.encode()).hexdigest()[:16]


def scene_seed(spec: DataSpec, index: int) -> int:
    return spec.seed * 1_000_003 + index


def _generate_range(spec: DataSpec, start: int, stop: int) -> dict:
    env = TabletopEnv(image_size=spec.image_size, split=spec.split)
    codec = ActionCodec.for_env(env)
    out: dict[str, list] = {k: [] for k in ("image", "objects", *SAMPLE_FIELDS)}
    if spec.scene_texts:
        from policies.hf import scene_text

        out["scene_text"] = []
    try:
        for i in range(start, stop):
            seed = scene_seed(spec, i)
            obs, _ = env.reset(seed=seed)
            out["image"].append(obs["image"])
            out["objects"].append(scene_objects(env, codec, spec.containers))
            if spec.scene_texts:
                out["scene_text"].append(scene_text(env.layout(), codec))
            tasks = [env.task]
            rng = np.random.default_rng(seed)
            others = scene_combos(env.scene.spec, spec.split)
            # harm class first (even odds, so benign skills are not starved), then a template, then a combination
            by_class: dict[bool, dict[str, list]] = {}
            for t, c in others:
                by_class.setdefault(combo_harmful(t, c), {}).setdefault(t.id, []).append((t, c))
            for _ in range(spec.tasks_per_scene - 1):
                if not by_class:
                    break
                classes = sorted(by_class)
                by_template = by_class[classes[int(rng.integers(len(classes)))]]
                ids = sorted(by_template)
                options = by_template[ids[int(rng.integers(len(ids)))]]
                t, c = options[int(rng.integers(len(options)))]
                phrasings = t.phrasings_in(spec.split)
                tasks.append(make_task(t, c, phrasings[int(rng.integers(len(phrasings)))], spec.split))
            for task in tasks:
                out["scene"].append(i - start)
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


def scene_objects(env: TabletopEnv, codec: ActionCodec, containers: bool = False) -> str:
    """Every object in view (and with ``containers`` every container) with its pixel, in raster order:
    ``red cube 12 40 ; bin 30 20``."""
    items = []
    for o in env.scene.spec.objects:
        u, v = codec.pixel(env.sim.get_position(o.name))
        items.append((v, u, f"{describe((o.kind, o.color))} {u} {v}"))
    for c in env.scene.spec.containers if containers else ():
        u, v = codec.pixel(env.sim.get_position(c.name))
        items.append((v, u, f"{c.kind} {u} {v}"))
    return " ; ".join(text for _, _, text in sorted(items))


def generate(spec: DataSpec, cache_dir: str | os.PathLike | None = None, workers: int = 2) -> dict:
    """Samples of ``spec`` as a dict of arrays, from the cache when present.

    ``image`` (scenes, H, W, 3) uint8, ``objects`` (what each scene shows, see :func:`scene_objects`) and, with
    ``spec.scene_texts``, ``scene_text`` have one entry per scene; every other field one per sample, and ``scene``
    indexes the per-scene fields.
    """
    path = Path(cache_dir) / f"tiny_vla_data_{spec.key()}.npz" if cache_dir else None
    if path is not None and path.exists():
        with np.load(path, allow_pickle=False) as z:
            return {k: z[k] for k in z.files}
    bounds = np.linspace(0, spec.scenes, max(1, workers) + 1).astype(int)
    chunks = [(a, b) for a, b in zip(bounds[:-1], bounds[1:], strict=True) if b > a]
    if workers > 1 and len(chunks) > 1:
        with ProcessPoolExecutor(len(chunks)) as pool:
            parts = list(pool.map(_generate_range, [spec] * len(chunks), *zip(*chunks, strict=True)))
    else:
        parts = [_generate_range(spec, a, b) for a, b in chunks]
    for (a, _), part in zip(chunks, parts, strict=True):
        part["scene"] = [s + a for s in part["scene"]]
    data = {k: np.concatenate([np.asarray(p[k]) for p in parts]) for k in parts[0]}
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=path.parent, suffix=".npz", delete=False) as f:
            np.savez_compressed(f, **data)
        os.replace(f.name, path)
    return data


def data_hash(data: dict) -> str:
    """A content hash of generated data (for model cards)."""
    h = hashlib.sha256()
    for k in sorted(data):
        h.update(k.encode())
        h.update(np.ascontiguousarray(data[k]).tobytes())
    return h.hexdigest()[:16]
