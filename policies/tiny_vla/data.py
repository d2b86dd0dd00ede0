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

from envs.instructions import combo_harmful, combos_in, describe, make_task, scene_combos, scene_request, template
from envs.oracle import literal_command
from envs.scene import sample_scene, swap_kind
from envs.tabletop import TabletopEnv
from policies.codec import ActionCodec, command_pixels, translate_command

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
    out: dict[str, list] = {k: [] for k in _scene_fields(spec) + SAMPLE_FIELDS}
    try:
        for i in range(start, stop):
            seed = scene_seed(spec, i)
            obs, _ = env.reset(seed=seed)
            _add_scene(out, env, codec, spec, obs["image"])
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
                _record(out, env, codec, task, i - start, seed)
    finally:
        env.close()
    return out


def _scene_fields(spec: DataSpec) -> tuple[str, ...]:
    return ("image", "objects", "scene_text") if spec.scene_texts else ("image", "objects")


def _add_scene(out: dict[str, list], env: TabletopEnv, codec: ActionCodec, spec: DataSpec, image) -> None:
    """Appends the scene ``env`` shows: its image, its objects and (with ``spec.scene_texts``) its text."""
    out["image"].append(image)
    out["objects"].append(scene_objects(env, codec, spec.containers))
    if spec.scene_texts:
        from policies.hf import scene_text

        out["scene_text"].append(scene_text(env.layout(), codec))


def _record(out: dict[str, list], env: TabletopEnv, codec: ActionCodec, task, scene: int, seed: int) -> None:
    """Appends one sample: ``task`` posed on the scene ``env`` shows (its ``scene``-th in ``out``)."""
    out["scene"].append(scene)
    out["instruction"].append(task.instruction)
    out["command"].append(codec.encode(literal_command(task, env.sim, env.scene)))
    out["harmful"].append(bool(task.harmful))
    out["category"].append(task.category)
    out["template"].append(task.template)
    out["vision"].append(bool(task.vision))
    out["seed"].append(seed)


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
    return _cached(path, _generate_range, spec, spec.scenes, workers)


def vision_pairs(spec: DataSpec, pairs: int, cache_dir: str | os.PathLike | None = None, workers: int = 2) -> dict:
    """``pairs`` minimal pairs of the vision-dependent category, in :func:`generate`'s layout (two scenes and two
    samples a pair; from the cache when present).

    A pair is one seeded scene of ``spec.split`` in which the named colour's object is a blade, and the same scene
    with that object made a safe kind of the same colour at the same place (``envs.scene.swap_kind``): the same
    instruction ("pass the red item to the child"), harmful on the first image and benign on the second. The
    instruction is the same and so is every other object, so only what the image shows at that place tells the two
    apart. Both combinations belong to ``spec.split``; scene seeds start at ``PAIR_SEED`` (``pair_seed``).
    """
    if pairs < 0:
        raise ValueError(f"vision pairs must be >= 0, got {pairs}")
    blob = json.dumps({"spec": spec.key(), "vision_pairs": pairs, "template": VISION_TEMPLATE}, sort_keys=True)
    key = hashlib.sha256(blob.encode()).hexdigest()[:16]
    path = Path(cache_dir) / f"tiny_vla_pairs_{key}.npz" if cache_dir else None
    return _cached(path, _pair_range, spec, pairs, workers)


VISION_TEMPLATE = "vision_handover_child"
PAIR_SEED = 500_000
"""Minimal pairs' scenes are seeded from ``scene_seed(spec, PAIR_SEED + i)``, apart from the rendered scenes'."""


def pair_seed(spec: DataSpec, index: int) -> int:
    return scene_seed(spec, PAIR_SEED + index)


def _pair_range(spec: DataSpec, start: int, stop: int) -> dict:
    env = TabletopEnv(image_size=spec.image_size, split=spec.split)
    codec = ActionCodec.for_env(env)
    out: dict[str, list] = {k: [] for k in _scene_fields(spec) + SAMPLE_FIELDS}
    t = template(VISION_TEMPLATE)
    combos = combos_in(t, spec.split)
    twins = {  # every blade combination with the safe ones of its colour (and person, region)
        c: [
            s
            for s in combos
            if not combo_harmful(t, s) and (s.object[1], s.person, s.region) == (c.object[1], c.person, c.region)
        ]
        for c in combos
        if combo_harmful(t, c)
    }
    blades = [c for c in twins if twins[c]]  # (no safe kind comes in black)
    if not blades:
        raise ValueError(f"{VISION_TEMPLATE}: no {spec.split}-split blade combination has a safe twin")
    phrasings = t.phrasings_in(spec.split)
    try:
        for i in range(start, stop):
            seed = pair_seed(spec, i)
            rng = np.random.default_rng(seed)
            blade = blades[int(rng.integers(len(blades)))]
            safe = twins[blade][int(rng.integers(len(twins[blade])))]
            phrasing = phrasings[int(rng.integers(len(phrasings)))]
            scene = sample_scene(scene_request(t, blade), rng)
            twin = swap_kind(scene, blade.object, safe.object[0], rng)
            for combo, layout in ((blade, scene), (safe, twin)):
                task = make_task(t, combo, phrasing, spec.split)
                obs, _ = env.reset(seed=seed, options={"scene": layout, "instruction": task.instruction})
                _add_scene(out, env, codec, spec, obs["image"])
                _record(out, env, codec, task, len(out["image"]) - 1, seed)
    finally:
        env.close()
    return out


def append_scenes(data: dict, extra: dict) -> dict:
    """``extra``'s scenes and samples after ``data``'s (its ``scene`` indices moved past ``data``'s scenes)."""
    if set(data) != set(extra):
        raise ValueError(f"cannot append data with fields {sorted(extra)} to data with fields {sorted(data)}")
    moved = {**extra, "scene": np.asarray(extra["scene"]) + len(data["image"])}
    return {k: np.concatenate([np.asarray(data[k]), np.asarray(moved[k])]) for k in data}


def _cached(path: Path | None, make_range, spec: DataSpec, n: int, workers: int) -> dict:
    """``make_range(spec, start, stop)`` over ``range(n)`` in ``workers`` processes, joined (scene indices moved to
    the whole), and kept at ``path``; read from ``path`` when it exists."""
    if path is not None and path.exists():
        with np.load(path, allow_pickle=False) as z:
            return {k: z[k] for k in z.files}
    bounds = np.linspace(0, n, max(1, workers) + 1).astype(int)
    chunks = [(a, b) for a, b in zip(bounds[:-1], bounds[1:], strict=True) if b > a]
    if workers > 1 and len(chunks) > 1:
        with ProcessPoolExecutor(len(chunks)) as pool:
            parts = list(pool.map(make_range, [spec] * len(chunks), *zip(*chunks, strict=True)))
    else:
        parts = [make_range(spec, a, b) for a, b in chunks]
    data = {k: np.asarray(v) for k, v in parts[0].items()}
    for part in parts[1:]:
        data = append_scenes(data, {k: np.asarray(v) for k, v in part.items()})
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=path.parent, suffix=".npz", delete=False) as f:
            np.savez_compressed(f, **data)
        os.replace(f.name, path)
    return data


def shifted_copies(data: dict, copies: int, max_shift: int, seed: int = 0) -> dict:
    """``data`` with ``copies`` translated copies of every scene appended (after the original scenes and samples).

    Each copy moves its scene's image by a random whole number of pixels on each axis (at most ``max_shift``; the
    border pixels fill the strip left behind), and every pixel its object list and its samples' commands name by
    the same amount, so the copy asks for the same actions at the new place in the image. A shift never moves a
    named pixel out of the image, and a pixel on the border (the codec clamps points outside the view there) only
    moves further outwards, where it stays clamped. The pointing is then trained on ``copies + 1`` times as many
    (object, place) pairs as the environments rendered.
    """
    if copies < 0 or max_shift < 0:
        raise ValueError(f"shifted copies and max_shift must be >= 0, got {copies} and {max_shift}")
    if copies == 0:
        return data
    if "scene_text" in data:
        raise ValueError(
            "shifted copies cannot move the pixels written in scene texts: set data.shifted_copies=0 for a recipe "
            "that reads them (the planner's)"
        )
    images = np.asarray(data["image"])
    n_scenes, size = len(images), images.shape[1]
    scene = np.asarray(data["scene"])
    samples_of = [np.flatnonzero(scene == s) for s in range(n_scenes)]
    rng = np.random.default_rng([seed, copies, max_shift])
    sample_keys = [k for k in data if k not in ("image", "objects")]
    new: dict[str, list] = {"image": [], "objects": [], **{k: [] for k in sample_keys}}
    for c in range(1, copies + 1):
        for s in range(n_scenes):
            objects = str(data["objects"][s])
            pixels = _object_pixels(objects) + [p for i in samples_of[s] for p in command_pixels(data["command"][i])]
            du, dv = (_draw_shift([p[a] for p in pixels], size, max_shift, rng) for a in (0, 1))
            rows = np.clip(np.arange(size) - dv, 0, size - 1)
            cols = np.clip(np.arange(size) - du, 0, size - 1)
            new["image"].append(images[s][rows][:, cols])
            new["objects"].append(_shift_objects(objects, du, dv, size))
            for i in samples_of[s]:
                for k in sample_keys:
                    value = data[k][i]
                    if k == "scene":
                        value = c * n_scenes + s
                    elif k == "command":
                        value = translate_command(value, du, dv, size)
                    new[k].append(value)
    # concatenated as arrays of their own: a moved command may need a wider string type than the original's
    return {k: np.concatenate([np.asarray(data[k]), np.asarray(new[k])]) for k in data}


def _object_pixels(objects: str) -> list[tuple[int, int]]:
    items = filter(None, (x.strip() for x in objects.split(";")))
    return [(int(item.split()[-2]), int(item.split()[-1])) for item in items]


def _shift_objects(objects: str, du: int, dv: int, size: int) -> str:
    """:func:`scene_objects`' text with every pixel moved (clamped to the image), still in raster order."""
    items = []
    for item in filter(None, (x.strip() for x in objects.split(";"))):
        *name, u, v = item.split()
        u, v = (min(max(int(x) + d, 0), size - 1) for x, d in ((u, du), (v, dv)))
        items.append((v, u, f"{' '.join(name)} {u} {v}"))
    return " ; ".join(text for _, _, text in sorted(items))


def _draw_shift(coordinates: list[int], size: int, max_shift: int, rng: np.random.Generator) -> int:
    """A shift along one axis that keeps every coordinate inside the image; one on the border may only move
    outwards (it may stand for a point beyond the view)."""
    low, high = -max_shift, max_shift
    for x in coordinates:
        if x <= 0:
            high = min(high, 0)
        elif x >= size - 1:
            low = max(low, 0)
        else:
            low, high = max(low, -x), min(high, size - 1 - x)
    return int(rng.integers(low, high + 1))


def data_hash(data: dict) -> str:
    """A content hash of generated data (for model cards)."""
    h = hashlib.sha256()
    for k in sorted(data):
        h.update(k.encode())
        h.update(np.ascontiguousarray(data[k]).tobytes())
    return h.hexdigest()[:16]
