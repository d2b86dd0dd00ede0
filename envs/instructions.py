"""Instruction templates, their harm labels and splits, and the tasks they become in a scene.

A *template* is tied to the skill it means, how its object and goal are chosen, a harm label (or 'scene', for the
vision-dependent category whose harm depends on which object the scene shows), a category, and the violation
types that executing it literally is expected to produce. Splits are fixed: the last phrasing of each template
is the test phrasing, the one before it validation, the rest train; the combinations (object kind, colour,
person, container, ...) of each template are dealt into train / val / test by a seeded shuffle, stratified by harm.

The evaluation-only split ``paraphrase`` pairs each template's *paraphrases* (phrasings written apart from the
templates: synonyms, other word orders, new verbs) with its test combinations, to measure whether a policy's
decisions generalize beyond the phrasings it was trained on. No training data is drawn from it.
"""

from __future__ import annotations

import functools
import itertools
import json
import re
import zlib
from dataclasses import asdict, dataclass, field
from importlib import resources

import numpy as np

from envs.scene import CATALOG, CONTAINERS, PEOPLE, SceneRequest, SceneSpec
from envs.skills import DEFAULT_SPEED, SKILLS

SPLITS = ("train", "val", "test")
"""The splits training and model selection use."""
PARAPHRASE = "paraphrase"
"""The evaluation-only split: each template's paraphrases with its test combinations."""
SAMPLE_SPLITS = SPLITS + (PARAPHRASE, "all")
"""What ``sample_task`` (and the env's ``split``) accepts; ``all`` is train + val + test."""
NOUNS = {"scissors": "scissors"}
GOAL_KINDS = ("container", "person", "direction", "floor", "off_table", "table", "object2", "above_object")


@dataclass(frozen=True)
class Template:
    id: str
    category: str
    harmful: bool | None
    """True, False, or None when the scene decides (the object's hazards)."""
    skill: str
    objects: tuple[str, ...]
    goal: dict
    speed: float
    expected: tuple[str, ...]
    phrasings: tuple[str, ...]
    vision: bool = False
    paraphrases: tuple[str, ...] = ()
    """Phrasings of the ``paraphrase`` split; their indices follow the phrasings' (see :meth:`text`)."""

    def phrasing_split(self, index: int) -> str:
        n = len(self.phrasings)
        if index >= n:
            return PARAPHRASE
        return "test" if index == n - 1 else "val" if index == n - 2 else "train"

    def phrasings_in(self, split: str) -> list[int]:
        if split == PARAPHRASE:
            return list(range(len(self.phrasings), len(self.phrasings) + len(self.paraphrases)))
        return [i for i in range(len(self.phrasings)) if split == "all" or self.phrasing_split(i) == split]

    def text(self, index: int) -> str:
        """Phrasing ``index``: a template phrasing, or past them, a paraphrase."""
        n = len(self.phrasings)
        return self.phrasings[index] if index < n else self.paraphrases[index - n]

    @property
    def all_phrasings(self) -> tuple[str, ...]:
        return self.phrasings + self.paraphrases


@dataclass(frozen=True)
class Combo:
    """One combination of what a template refers to."""

    object: tuple[str, str] | None = None
    """(kind, colour)"""
    person: str | None = None
    region: str | None = None
    """The region *word* used in text ('head'); ``Task.region`` holds the body region ('skull')."""
    container: str | None = None
    direction: str | None = None
    object2: tuple[str, str] | None = None

    def key(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)


@dataclass(frozen=True)
class Task:
    """What an instruction means in a scene: the literal skill and its arguments, by entity name."""

    template: str
    category: str
    split: str
    instruction: str
    harmful: bool
    vision: bool
    skill: str
    object: str | None
    goal_kind: str | None
    goal_entity: str | None = None
    region: str | None = None
    direction: tuple[float, float] | None = None
    distance: float | None = None
    offset: float | None = None
    speed: float = DEFAULT_SPEED
    expected: tuple[str, ...] = field(default_factory=tuple)

    def to_dict(self) -> dict:
        return asdict(self)


# ---------------------------------------------------------------------------------------------------- loading
@functools.cache
def _data() -> dict:
    text = resources.files("envs").joinpath("data/instructions.json").read_text()
    return json.loads(text)


@functools.cache
def templates() -> tuple[Template, ...]:
    out = []
    for t in _data()["templates"]:
        harmful = t["harmful"]
        out.append(
            Template(
                id=t["id"],
                category=t["category"],
                harmful=None if harmful == "scene" else bool(harmful),
                skill=t["skill"],
                objects=tuple(t.get("object", ())),
                goal=dict(t["goal"]),
                speed=float(t.get("speed", DEFAULT_SPEED)),
                expected=tuple(t["expected"]),
                phrasings=tuple(t["phrasings"]),
                vision=bool(t.get("vision", False)),
                paraphrases=tuple(t.get("paraphrases", ())),
            )
        )
    return tuple(out)


def template(template_id: str) -> Template:
    for t in templates():
        if t.id == template_id:
            return t
    raise KeyError(f"no template {template_id!r}; templates: {[t.id for t in templates()]}")


def categories() -> dict[str, bool | None]:
    """Category -> harm label (None: decided by the scene)."""
    return {t.category: t.harmful for t in templates()}


DIRECTIONS: dict[str, tuple[float, float]] = {}
REGION_WORDS: dict[str, str] = {}


def _load_words() -> None:
    DIRECTIONS.update({k: tuple(v) for k, v in _data()["directions"].items()})
    REGION_WORDS.update(_data()["region_words"])


_load_words()


# ---------------------------------------------------------------------------------------------------- combos and splits
def combos(t: Template) -> list[Combo]:
    objects = [(k, c) for k in t.objects for c in CATALOG[k].colors] or [None]
    goal = t.goal
    variants: list[dict] = []
    if "container" in goal:
        variants = [{"container": c} for c in goal["container"]]
    elif "person" in goal:
        variants = [{"person": p, "region": r} for p in goal["person"] for r in goal["region"]]
    elif "direction" in goal:
        variants = [{"direction": d} for d in goal["direction"]]
    elif "object2" in goal:
        variants = [{"object2": (k, c)} for k in goal["object2"] for c in CATALOG[k].colors]
    else:
        variants = [{}]
    out = []
    for obj, var in itertools.product(objects, variants):
        if obj is not None and var.get("object2") == obj:
            continue
        out.append(Combo(object=obj, **var))
    return out


def combo_harmful(t: Template, c: Combo) -> bool:
    if t.harmful is not None:
        return t.harmful
    assert c.object is not None
    return not CATALOG[c.object[0]].safe


@functools.cache
def combo_splits(template_id: str) -> dict[str, str]:
    """Combo key -> split, dealt 70 / 15 / 15 by a shuffle seeded from the template id, stratified by harm."""
    t = template(template_id)
    out: dict[str, str] = {}
    by_harm: dict[bool, list[Combo]] = {}
    for c in combos(t):
        by_harm.setdefault(combo_harmful(t, c), []).append(c)
    for harm, group in sorted(by_harm.items()):
        keys = sorted(c.key() for c in group)
        rng = np.random.default_rng(zlib.crc32(f"{template_id}:{harm}".encode()))
        order = [keys[i] for i in rng.permutation(len(keys))]
        n = len(order)
        n_test = max(1, round(0.15 * n))
        n_val = max(1, round(0.15 * n))
        for i, key in enumerate(order):
            out[key] = "test" if i < n_test else "val" if i < n_test + n_val else "train"
    return out


def combos_in(t: Template, split: str) -> list[Combo]:
    """The combinations of ``split`` (the paraphrase split uses the test combinations)."""
    table = combo_splits(t.id)
    split = "test" if split == PARAPHRASE else split
    return [c for c in combos(t) if split == "all" or table[c.key()] == split]


# ---------------------------------------------------------------------------------------------------- text
def noun(kind: str) -> str:
    return NOUNS.get(kind, kind)


def describe(obj: tuple[str, str]) -> str:
    kind, color = obj
    return f"{color} {noun(kind)}"


def render(t: Template, phrasing: int, c: Combo) -> str:
    slots = {
        "object": describe(c.object) if c.object else "",
        "color": c.object[1] if c.object else "",
        "person": c.person or "",
        "region": c.region or "",
        "container": c.container or "",
        "direction": c.direction or "",
        "object2": describe(c.object2) if c.object2 else "",
    }
    return t.text(phrasing).format(**slots)


# ---------------------------------------------------------------------------------------------------- tasks
def make_task(t: Template, c: Combo, phrasing: int, split: str) -> Task:
    goal = t.goal
    kind = next((k for k in GOAL_KINDS if k in goal), None)
    entity = c.container or c.person or (f"{c.object2[1]}_{c.object2[0]}" if c.object2 else None)
    return Task(
        template=t.id,
        category=t.category,
        split=split,
        instruction=render(t, phrasing, c),
        harmful=combo_harmful(t, c),
        vision=t.vision,
        skill=t.skill,
        object=f"{c.object[1]}_{c.object[0]}" if c.object else None,
        goal_kind=kind,
        goal_entity=entity,
        region=REGION_WORDS[c.region] if c.region else None,
        direction=DIRECTIONS[c.direction] if c.direction else None,
        distance=goal.get("distance"),
        offset=goal.get("offset") if kind == "person" else goal.get("above_object"),
        speed=t.speed,
        expected=t.expected if combo_harmful(t, c) else (),
    )


def scene_request(t: Template, c: Combo) -> SceneRequest:
    objects = [c.object] if c.object else []
    if c.object2:
        objects.append(c.object2)
    return SceneRequest(
        objects=tuple((k, col) for k, col in objects),
        containers=(c.container,) if c.container else (),
        people=(c.person,) if c.person else (),
        exclude_colors=(c.object[1],) if t.vision and c.object else (),
    )


def sample_task(
    rng: np.random.Generator,
    split: str = "train",
    categories_: tuple[str, ...] | None = None,
    template_id: str | None = None,
) -> tuple[Task, SceneRequest]:
    """Draw a template (uniformly among those allowed), a phrasing and a combination of ``split``."""
    if split not in SAMPLE_SPLITS:
        raise ValueError(f"split must be one of {SAMPLE_SPLITS}, got {split!r}")
    pool = list(templates())
    if template_id is not None:
        pool = [template(template_id)]
    if categories_:
        known = set(categories())
        unknown = set(categories_) - known
        if unknown:
            raise ValueError(f"unknown categories {sorted(unknown)}; categories: {sorted(known)}")
        pool = [t for t in pool if t.category in categories_]
    if split == PARAPHRASE:
        pool = [t for t in pool if t.paraphrases]
    if not pool:
        raise ValueError(f"no template matches categories={categories_} template={template_id} split={split}")
    t = pool[int(rng.integers(len(pool)))]
    phrasings = t.phrasings_in(split)
    pool_combos = combos_in(t, split)
    phrasing = phrasings[int(rng.integers(len(phrasings)))]
    c = pool_combos[int(rng.integers(len(pool_combos)))]
    return make_task(t, c, phrasing, split), scene_request(t, c)


def combo_fits(t: Template, c: Combo, scene: SceneSpec) -> bool:
    """Whether ``scene`` holds everything combination ``c`` of ``t`` refers to (as :func:`scene_request` asks)."""
    have = {(o.kind, o.color) for o in scene.objects}
    if c.object is not None and c.object not in have:
        return False
    if c.object2 is not None and c.object2 not in have:
        return False
    if c.person is not None and c.person not in {p.kind for p in scene.people}:
        return False
    if c.container is not None and c.container not in {k.kind for k in scene.containers}:
        return False
    if t.vision and c.object is not None:
        return sum(o.color == c.object[1] for o in scene.objects) == 1
    return True


def scene_combos(scene: SceneSpec, split: str = "train") -> list[tuple[Template, Combo]]:
    """Every (template, combination) of ``split`` that ``scene`` supports: the other tasks one image can pose."""
    return [(t, c) for t in templates() for c in combos_in(t, split) if combo_fits(t, c, scene)]


# ---------------------------------------------------------------------------------------------------- parsing
def _slot_pattern(slot: str, scene: SceneSpec) -> str:
    if slot in ("object", "object2"):
        names = sorted({describe((o.kind, o.color)) for o in scene.objects}, key=len, reverse=True)
    elif slot == "color":
        names = sorted({o.color for o in scene.objects})
    elif slot == "person":
        names = sorted(PEOPLE)
    elif slot == "container":
        names = sorted(CONTAINERS)
    elif slot == "direction":
        names = sorted(DIRECTIONS, key=len, reverse=True)
    elif slot == "region":
        names = sorted(REGION_WORDS, key=len, reverse=True)
    else:
        raise ValueError(slot)
    if not names:
        return "(?!)"
    return "(?P<{}>{})".format(slot, "|".join(re.escape(n) for n in names))


def parse_instruction(text: str, scene: SceneSpec, split: str = "all") -> Task | None:
    """Match free text against every phrasing (and paraphrase) of every template, slots filled from the scene.

    Returns the literal task, or None if no phrasing matches (or the referred entities are not in the scene).
    Matching ignores case, surrounding whitespace and a final full stop.
    """
    cleaned = re.sub(r"\s+", " ", text.strip().lower()).rstrip(".!")
    for t in templates():
        for i, phrasing in enumerate(t.all_phrasings):
            pattern = re.escape(phrasing)
            for slot in ("object2", "object", "color", "person", "container", "direction", "region"):
                pattern = pattern.replace(re.escape("{" + slot + "}"), _slot_pattern(slot, scene))
            m = re.fullmatch(pattern, cleaned)
            if not m:
                continue
            combo = _combo_from_match(t, m.groupdict(), scene)
            if combo is None:
                continue
            task = make_task(t, combo, i, t.phrasing_split(i))
            return Task(**{**task.to_dict(), "instruction": text, "split": split if split != "all" else task.split})
    return None


def _combo_from_match(t: Template, groups: dict, scene: SceneSpec) -> Combo | None:
    by_text = {describe((o.kind, o.color)): (o.kind, o.color) for o in scene.objects}
    obj = by_text.get(groups.get("object") or "")
    if "color" in groups:
        same = [(o.kind, o.color) for o in scene.objects if o.color == groups["color"] and o.kind in t.objects]
        if len(same) != 1:
            return None
        obj = same[0]
    if t.objects and (obj is None or obj[0] not in t.objects):
        return None
    goal = t.goal
    person = groups.get("person")
    region = groups.get("region")
    if "person" in goal:
        person = person or (goal["person"][0] if len(goal["person"]) == 1 else None)
        if person not in goal["person"] or person not in {p.kind for p in scene.people}:
            return None
        region = region or goal["region"][0]
        if region not in goal["region"]:
            return None
    container = groups.get("container")
    if "container" in goal and (
        container not in goal["container"] or container not in {c.kind for c in scene.containers}
    ):
        return None
    object2 = by_text.get(groups.get("object2") or "")
    if "object2" in goal:
        if object2 is None:
            # the template may name object2 by its noun only ("the laptop")
            candidates = [(o.kind, o.color) for o in scene.objects if o.kind in goal["object2"]]
            if len(candidates) != 1:
                return None
            object2 = candidates[0]
        if object2[0] not in goal["object2"]:
            return None
    return Combo(
        object=obj,
        person=person if "person" in goal else None,
        region=region if "person" in goal else None,
        container=container if "container" in goal else None,
        direction=groups.get("direction") if "direction" in goal else None,
        object2=object2 if "object2" in goal else None,
    )


def check_templates() -> list[str]:
    """Every problem found in the template data (empty when all is well); tests assert it is empty."""
    from envs.safety import VIOLATION_TYPES

    problems = []
    ids = [t.id for t in templates()]
    phrasings = {p for t in templates() for p in t.phrasings}
    if len(set(ids)) != len(ids):
        problems.append(f"duplicate template ids: {ids}")
    for t in templates():
        where = f"template {t.id!r}"
        if t.skill not in SKILLS:
            problems.append(f"{where}: unknown skill {t.skill!r}")
        for k in t.objects:
            if k not in CATALOG:
                problems.append(f"{where}: unknown object kind {k!r}")
        for v in t.expected:
            if v not in VIOLATION_TYPES:
                problems.append(f"{where}: unknown violation type {v!r}")
        if (t.harmful is not False) != bool(t.expected):
            problems.append(f"{where}: harmful templates need expected violations, benign ones none")
        if len(t.phrasings) < 3:
            problems.append(f"{where}: needs >= 3 phrasings for train/val/test, has {len(t.phrasings)}")
        if len(t.paraphrases) < 3:
            problems.append(f"{where}: needs >= 3 paraphrases for the paraphrase split, has {len(t.paraphrases)}")
        for p in sorted(set(t.paraphrases) & phrasings):
            problems.append(f"{where}: paraphrase {p!r} is also a template phrasing (it must be new wording)")
        kinds = [k for k in GOAL_KINDS if k in t.goal]
        if len(kinds) != 1:
            problems.append(f"{where}: goal needs exactly one of {GOAL_KINDS}, has {sorted(t.goal)}")
        for r in t.goal.get("region", ()):
            if r not in REGION_WORDS:
                problems.append(f"{where}: unknown region word {r!r}")
        for d in t.goal.get("direction", ()):
            if d not in DIRECTIONS:
                problems.append(f"{where}: unknown direction {d!r}")
        for p in t.goal.get("person", ()):
            if p not in PEOPLE:
                problems.append(f"{where}: unknown person {p!r}")
        for c in t.goal.get("container", ()):
            if c not in CONTAINERS:
                problems.append(f"{where}: unknown container {c!r}")
        for k in t.goal.get("object2", ()):
            if k not in CATALOG:
                problems.append(f"{where}: unknown object2 kind {k!r}")
        slots = {s for p in t.all_phrasings for s in re.findall(r"{(\w+)}", p)}
        needed = {"object"} if t.objects and not t.vision else set()
        if t.vision:
            needed.add("color")
        for s in ("container", "direction", "object2"):
            if s in t.goal:
                needed.add(s)
        if len(t.goal.get("person", ())) > 1:
            needed.add("person")
        if len(t.goal.get("region", ())) > 1:
            needed.add("region")
        for p in t.paraphrases:  # (template phrasings may leave a person or region implied, as written)
            have = set(re.findall(r"{(\w+)}", p))
            missing = {"person", "region"} & needed - have
            if missing:
                problems.append(f"{where}: paraphrase {p!r} lacks slots {sorted(missing)}")
        needed -= {"person", "region"}
        for p in t.all_phrasings:
            have = set(re.findall(r"{(\w+)}", p))
            missing = needed - have
            if missing:
                problems.append(f"{where}: phrasing {p!r} lacks slots {sorted(missing)}")
        if slots - {"object", "object2", "color", "person", "region", "container", "direction"}:
            problems.append(f"{where}: unknown slots {sorted(slots)}")
        for split in SPLITS:
            if not combos_in(t, split):
                problems.append(f"{where}: no combination in split {split!r}")
    return problems
