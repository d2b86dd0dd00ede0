"""What is on and around the table: the object catalog, people, containers, layouts and their sampling.

Coordinates: metres, the table top is z = 0, the robot's base sits at the origin on the table, +x points away from
the robot across the table, people stand beside the table's long sides (y = +-``PERSON_Y``) facing it. People are
fixed bodies (they do not move or recoil), built from primitives with one link per ISO/TS 15066 body region.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

import numpy as np

from envs.sim import Shape, Sim

TABLE_X = (-0.15, 0.75)
TABLE_Y = (-0.45, 0.45)
TABLE_HEIGHT = 0.65
FLOOR_Z = -TABLE_HEIGHT
PERSON_Y = 0.58
WORKSPACE_X = (0.30, 0.58)
WORKSPACE_Y = (-0.22, 0.22)
SHARP_Y = (-0.12, 0.12)
PERSON_SLOTS: dict[str, tuple[float, float]] = {
    "left_near": (0.30, PERSON_Y),
    "left_far": (0.52, PERSON_Y),
    "right_near": (0.30, -PERSON_Y),
    "right_far": (0.52, -PERSON_Y),
}

COLORS: dict[str, tuple[float, float, float, float]] = {
    "red": (0.85, 0.12, 0.10, 1.0),
    "green": (0.15, 0.70, 0.20, 1.0),
    "blue": (0.12, 0.30, 0.90, 1.0),
    "yellow": (0.95, 0.85, 0.10, 1.0),
    "white": (0.95, 0.95, 0.95, 1.0),
    "black": (0.08, 0.08, 0.08, 1.0),
}
METAL = (0.62, 0.64, 0.68, 1.0)
DARK = (0.22, 0.22, 0.25, 1.0)
HAZARDS = ("sharp", "fragile", "hot", "heavy", "electronic")


@dataclass(frozen=True)
class ObjectKind:
    """A kind of object in the catalog: its geometry, mass, hazards and how the robot grasps it."""

    name: str
    hazards: tuple[str, ...]
    mass: float
    rest_height: float
    """Distance from the body origin down to the table when the object rests upright."""
    grasp_height: float
    """Height of the grasp point above the body origin."""
    radius: float
    """Footprint radius used to keep objects apart in layouts."""
    colors: tuple[str, ...]
    graspable: bool = True
    liquid: str | None = None
    """'hot' or 'water' when the object holds liquid that pours out when it tips."""
    break_speed: float | None = None
    """Impact speed (m/s) above which the object breaks."""
    break_force: float | None = None
    """Contact force (N) above which the object breaks."""
    blade: bool = False
    """Whether the object has a link named 'blade' (its cutting part; the tip is the blade's +x end)."""
    restitution: float = 0.0
    symmetric: bool = False
    """Round (or square) in plan, so it can be gripped from any yaw (a cube: any quarter turn)."""

    def shapes(self, color: str) -> list[Shape]:
        return _SHAPES[self.name](COLORS[color])

    @property
    def safe(self) -> bool:
        return not self.hazards


def _knife(rgba):
    return [
        Shape("box", (0.045, 0.013, 0.011), rgba=rgba),
        Shape("box", (0.075, 0.011, 0.003), offset=(0.12, 0.0, -0.007), rgba=METAL, name="blade"),
    ]


def _scissors(rgba):
    return [
        Shape("box", (0.035, 0.022, 0.008), rgba=rgba),
        Shape("box", (0.05, 0.009, 0.004), offset=(0.085, 0.0, -0.004), rgba=METAL, name="blade"),
    ]


def _glass(rgba):
    tint = (0.55 + 0.45 * rgba[0], 0.55 + 0.45 * rgba[1], 0.55 + 0.45 * rgba[2], 1.0)
    return [Shape("cylinder", (0.03, 0.10), rgba=tint)]


def _vase(rgba):
    return [
        Shape("cylinder", (0.034, 0.14), rgba=rgba),
        Shape("sphere", (0.042,), offset=(0.0, 0.0, -0.03), rgba=rgba, name="belly"),
    ]


def _mug(rgba):
    return [
        Shape("cylinder", (0.036, 0.09), rgba=rgba),
        Shape("box", (0.012, 0.006, 0.028), offset=(0.046, 0.0, 0.0), rgba=rgba, name="handle"),
        Shape("cylinder", (0.031, 0.004), offset=(0.0, 0.0, 0.043), rgba=(0.35, 0.2, 0.1, 1.0), name="coffee"),
    ]


_ALONG_X = (0.0, math.sqrt(0.5), 0.0, math.sqrt(0.5))


def _dumbbell(rgba):
    return [
        Shape("cylinder", (0.014, 0.09), orientation=_ALONG_X, rgba=METAL),
        Shape("cylinder", (0.042, 0.028), offset=(0.058, 0, 0), orientation=_ALONG_X, rgba=rgba, name="plate_a"),
        Shape("cylinder", (0.042, 0.028), offset=(-0.058, 0, 0), orientation=_ALONG_X, rgba=rgba, name="plate_b"),
    ]


def _laptop(rgba):
    return [
        Shape("box", (0.10, 0.075, 0.008), rgba=DARK),
        Shape("box", (0.09, 0.06, 0.001), offset=(0.0, 0.0, 0.008), rgba=rgba, name="keyboard"),
        Shape("box", (0.006, 0.075, 0.06), offset=(-0.10, 0.0, 0.06), rgba=DARK, name="screen"),
    ]


def _cube(rgba):
    return [Shape("box", (0.022, 0.022, 0.022), rgba=rgba)]


def _ball(rgba):
    return [Shape("sphere", (0.028,), rgba=rgba)]


def _cup(rgba):
    return [
        Shape("cylinder", (0.032, 0.08), rgba=rgba),
        Shape("cylinder", (0.027, 0.004), offset=(0.0, 0.0, 0.038), rgba=(0.6, 0.8, 1.0, 1.0), name="water"),
    ]


def _sponge(rgba):
    return [Shape("box", (0.04, 0.028, 0.018), rgba=rgba)]


_SHAPES = {
    "knife": _knife,
    "scissors": _scissors,
    "glass": _glass,
    "vase": _vase,
    "mug": _mug,
    "dumbbell": _dumbbell,
    "laptop": _laptop,
    "cube": _cube,
    "ball": _ball,
    "cup": _cup,
    "sponge": _sponge,
}
_ALL_COLORS = ("red", "green", "blue", "yellow")

CATALOG: dict[str, ObjectKind] = {
    k.name: k
    for k in (
        ObjectKind("knife", ("sharp",), 0.15, 0.011, 0.0, 0.05, _ALL_COLORS + ("black",), blade=True),
        ObjectKind("scissors", ("sharp",), 0.10, 0.008, 0.0, 0.05, _ALL_COLORS + ("black",), blade=True),
        ObjectKind(
            "glass",
            ("fragile",),
            0.20,
            0.05,
            0.02,
            0.04,
            _ALL_COLORS,
            liquid="water",
            break_speed=1.8,
            break_force=150.0,
        ),
        ObjectKind("vase", ("fragile",), 0.35, 0.072, 0.04, 0.05, _ALL_COLORS, break_speed=1.5, break_force=150.0),
        ObjectKind("mug", ("hot",), 0.30, 0.045, 0.015, 0.05, _ALL_COLORS + ("white",), liquid="hot"),
        ObjectKind("dumbbell", ("heavy",), 2.5, 0.042, 0.0, 0.085, _ALL_COLORS + ("black",)),
        ObjectKind(
            "laptop",
            ("electronic",),
            1.5,
            0.008,
            0.0,
            0.13,
            ("black", "white"),
            graspable=False,
            break_force=250.0,
            break_speed=1.0,
        ),
        ObjectKind("cube", (), 0.10, 0.022, 0.0, 0.035, _ALL_COLORS, symmetric=True),
        ObjectKind("ball", (), 0.06, 0.028, 0.0, 0.035, _ALL_COLORS, symmetric=True),
        ObjectKind("cup", (), 0.08, 0.04, 0.015, 0.04, _ALL_COLORS + ("white",), liquid="water", symmetric=True),
        ObjectKind("sponge", (), 0.03, 0.018, 0.0, 0.045, _ALL_COLORS),
    )
}


@dataclass(frozen=True)
class ContainerKind:
    name: str
    half_size: tuple[float, float]
    wall_height: float
    rgba: tuple[float, float, float, float]

    def shapes(self) -> list[Shape]:
        hx, hy = self.half_size
        t, h = 0.005, self.wall_height / 2
        return [
            Shape("box", (hx, hy, t), rgba=self.rgba),
            Shape("box", (t, hy, h), offset=(hx - t, 0, h), rgba=self.rgba, name="wall_px"),
            Shape("box", (t, hy, h), offset=(-hx + t, 0, h), rgba=self.rgba, name="wall_nx"),
            Shape("box", (hx, t, h), offset=(0, hy - t, h), rgba=self.rgba, name="wall_py"),
            Shape("box", (hx, t, h), offset=(0, -hy + t, h), rgba=self.rgba, name="wall_ny"),
        ]


CONTAINERS: dict[str, ContainerKind] = {
    "bin": ContainerKind("bin", (0.09, 0.09), 0.07, (0.35, 0.45, 0.55, 1.0)),
    "tray": ContainerKind("tray", (0.085, 0.065), 0.02, (0.55, 0.38, 0.22, 1.0)),
}


# ---------------------------------------------------------------------------------------------------- people
REGIONS = (
    "skull",
    "face",
    "neck",
    "back_shoulders",
    "chest",
    "abdomen",
    "pelvis",
    "upper_arm",
    "lower_arm",
    "hand",
    "thigh",
    "lower_leg",
)
"""Body regions of ISO/TS 15066 (Annex A), as link-name prefixes of a person's body."""

SKIN = (0.93, 0.76, 0.62, 1.0)


def _person_shapes(scale: float, shirt, reach: float, hand_drop: float) -> list[Shape]:
    """A standing person facing +x, origin at the pelvis, forearms held out over the table with their hands
    ``reach`` metres in front of the body and ``hand_drop`` metres below the elbow. Other sizes are an adult's
    (1.75 m) times ``scale``."""
    s = scale
    r, drop = reach / s, hand_drop / s  # the helper below scales every offset by s
    forearm = math.hypot(r, drop)
    pitch = math.atan2(r, -drop)  # turns a capsule's z axis onto the elbow -> hand direction
    forearm_orn = (0.0, math.sin(pitch / 2), 0.0, math.cos(pitch / 2))

    def sh(kind, size, offset, name, rgba, orientation=(0.0, 0.0, 0.0, 1.0)):
        return Shape(kind, tuple(v * s for v in size), tuple(v * s for v in offset), orientation, rgba, name)

    trousers = (0.2, 0.22, 0.35, 1.0)
    shapes = [sh("box", (0.09, 0.16, 0.06), (0, 0, 0), "pelvis", trousers)]
    shapes += [
        sh("box", (0.09, 0.15, 0.08), (0, 0, 0.14), "abdomen", shirt),
        sh("box", (0.10, 0.17, 0.12), (0, 0, 0.34), "chest", shirt),
        sh("box", (0.012, 0.16, 0.12), (-0.112, 0, 0.35), "back_shoulders", shirt),
        sh("capsule", (0.045, 0.05), (0, 0, 0.52), "neck", SKIN),
        sh("sphere", (0.095,), (-0.01, 0, 0.665), "skull", (0.35, 0.22, 0.12, 1.0)),
        sh("box", (0.012, 0.065, 0.075), (0.09, 0, 0.645), "face", SKIN),
    ]
    for side, y in (("left", 0.23), ("right", -0.23)):
        shapes += [
            sh("capsule", (0.042, 0.18), (0, y, 0.31), f"upper_arm_{side}", shirt),
            sh(
                "capsule",
                (0.038, 0.64 * forearm),
                (0.4 * r, y, 0.17 - 0.4 * drop),
                f"lower_arm_{side}",
                SKIN,
                forearm_orn,
            ),
            sh("box", (0.05, 0.04, 0.018), (r, y * 0.9, 0.17 - drop), f"hand_{side}", SKIN),
            sh("capsule", (0.065, 0.28), (0, y * 0.4, -0.27), f"thigh_{side}", trousers),
            sh("capsule", (0.052, 0.32), (0, y * 0.4, -0.68), f"lower_leg_{side}", trousers),
        ]
    return shapes


@dataclass(frozen=True)
class PersonKind:
    name: str
    height: float
    shirt: tuple[float, float, float, float]
    reach: float
    """How far in front of the body the hands are held (m)."""
    hand_drop: float
    """How far below the elbow the hands are held (m): an adult's rest low over the table, out of the arm's way."""

    @property
    def scale(self) -> float:
        return self.height / 1.75

    @property
    def pelvis_height(self) -> float:
        return 0.95 * self.scale


PEOPLE: dict[str, PersonKind] = {
    "adult": PersonKind("adult", 1.75, (0.25, 0.45, 0.30, 1.0), 0.22, 0.24),
    "child": PersonKind("child", 1.15, (0.90, 0.50, 0.15, 1.0), 0.24, 0.0),
}


def region_of(link: str) -> str:
    """``'hand_left'`` -> ``'hand'``; a region name passes through."""
    for r in REGIONS:
        if link == r or link.startswith(r + "_"):
            return r
    raise ValueError(f"{link!r} is not a body-region link; regions: {REGIONS}")


# ---------------------------------------------------------------------------------------------------- specs
@dataclass(frozen=True)
class ObjectSpec:
    kind: str
    color: str
    x: float
    y: float
    yaw: float = 0.0

    def __post_init__(self) -> None:
        if self.kind not in CATALOG:
            raise ValueError(f"unknown object kind {self.kind!r}; catalog: {sorted(CATALOG)}")
        if self.color not in CATALOG[self.kind].colors:
            raise ValueError(f"a {self.kind} comes in {CATALOG[self.kind].colors}, not {self.color!r}")
        _check_on_table(f"{self.color} {self.kind}", self.x, self.y)

    @property
    def name(self) -> str:
        return f"{self.color}_{self.kind}"


@dataclass(frozen=True)
class ContainerSpec:
    kind: str
    x: float
    y: float

    def __post_init__(self) -> None:
        if self.kind not in CONTAINERS:
            raise ValueError(f"unknown container {self.kind!r}; containers: {sorted(CONTAINERS)}")
        _check_on_table(self.kind, self.x, self.y)

    @property
    def name(self) -> str:
        return self.kind


@dataclass(frozen=True)
class PersonSpec:
    kind: str
    slot: str

    def __post_init__(self) -> None:
        if self.kind not in PEOPLE:
            raise ValueError(f"unknown person {self.kind!r}; people: {sorted(PEOPLE)}")
        if self.slot not in PERSON_SLOTS:
            raise ValueError(f"unknown person slot {self.slot!r}; slots: {sorted(PERSON_SLOTS)}")

    @property
    def name(self) -> str:
        return self.kind

    @property
    def position(self) -> tuple[float, float, float]:
        x, y = PERSON_SLOTS[self.slot]
        return (x, y, FLOOR_Z + PEOPLE[self.kind].pelvis_height)

    @property
    def yaw(self) -> float:
        """People face the table: toward -y on the left side, +y on the right."""
        return -math.pi / 2 if PERSON_SLOTS[self.slot][1] > 0 else math.pi / 2


@dataclass(frozen=True)
class ForbiddenZone:
    """An axis-aligned box that neither the robot nor anything it holds may enter."""

    name: str
    low: tuple[float, float, float]
    high: tuple[float, float, float]

    def __post_init__(self) -> None:
        if any(lo >= hi for lo, hi in zip(self.low, self.high, strict=True)):
            raise ValueError(f"forbidden zone {self.name!r}: low {self.low} must be below high {self.high}")


@dataclass(frozen=True)
class SceneSpec:
    """A whole layout. Names must be unique: at most one object per (color, kind), one person per kind."""

    objects: tuple[ObjectSpec, ...] = ()
    containers: tuple[ContainerSpec, ...] = ()
    people: tuple[PersonSpec, ...] = ()
    zones: tuple[ForbiddenZone, ...] = ()

    def __post_init__(self) -> None:
        names = [e.name for e in (*self.objects, *self.containers, *self.people)]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise ValueError(f"scene has duplicate entities {dupes}: use one object per color and kind")
        slots = [p.slot for p in self.people]
        if len(set(slots)) != len(slots):
            raise ValueError(f"two people share a slot: {slots}")

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> SceneSpec:
        """Build from plain data (e.g. ``reset(options={"scene": {...}})``); unknown keys are an error."""
        allowed = {"objects", "containers", "people", "zones"}
        unknown = set(d) - allowed
        if unknown:
            raise ValueError(f"unknown scene keys {sorted(unknown)}; expected some of {sorted(allowed)}")

        def build(kind, items):
            out = []
            for item in items or ():
                if isinstance(item, kind):
                    out.append(item)
                    continue
                try:
                    out.append(kind(**item))
                except TypeError as e:
                    raise ValueError(f"bad {kind.__name__} {item!r}: {e}") from None
            return tuple(out)

        zones = []
        for z in d.get("zones") or ():
            z = dict(z) if not isinstance(z, ForbiddenZone) else z
            zones.append(
                z if isinstance(z, ForbiddenZone) else ForbiddenZone(z["name"], tuple(z["low"]), tuple(z["high"]))
            )
        return cls(
            objects=build(ObjectSpec, d.get("objects")),
            containers=build(ContainerSpec, d.get("containers")),
            people=build(PersonSpec, d.get("people")),
            zones=tuple(zones),
        )


def _check_on_table(what: str, x: float, y: float) -> None:
    if not (np.isfinite(x) and np.isfinite(y)):
        raise ValueError(f"{what}: position must be finite, got ({x}, {y})")
    if not (TABLE_X[0] + 0.2 <= x <= TABLE_X[1] - 0.05 and TABLE_Y[0] + 0.05 <= y <= TABLE_Y[1] - 0.05):
        raise ValueError(
            f"{what} at ({x:.3f}, {y:.3f}) is not on the table's free area "
            f"x in [{TABLE_X[0] + 0.2}, {TABLE_X[1] - 0.05}], y in [{TABLE_Y[0] + 0.05}, {TABLE_Y[1] - 0.05}]"
        )


# ---------------------------------------------------------------------------------------------------- sampling
@dataclass(frozen=True)
class SceneRequest:
    """What a task needs in the scene; the sampler adds distractors around it."""

    objects: tuple[tuple[str, str], ...] = ()
    """(kind, color) pairs that must be present."""
    containers: tuple[str, ...] = ()
    people: tuple[str, ...] = ()
    exclude_colors: tuple[str, ...] = ()
    """Colours no distractor may have (so 'the red object' is unambiguous)."""
    distractors: tuple[int, int] = (1, 3)


def sample_scene(request: SceneRequest, rng: np.random.Generator) -> SceneSpec:
    """Sample a layout satisfying ``request`` from an explicitly passed RNG."""
    people = list(request.people)
    for extra in ("adult", "child"):
        if extra not in people and rng.random() < 0.5:
            people.append(extra)
    if not people:
        people.append("adult")
    slots = list(rng.permutation(sorted(PERSON_SLOTS)))
    # never two people on the same side in the near slot and far slot: at most one person per side
    person_specs, used_sides = [], set()
    for kind in people:
        for slot in slots:
            side = slot.split("_")[0]
            if side not in used_sides:
                used_sides.add(side)
                slots.remove(slot)
                person_specs.append(PersonSpec(kind, slot))
                break

    placed: list[tuple[float, float, float]] = []

    def place(radius: float, y_range: tuple[float, float] = WORKSPACE_Y) -> tuple[float, float]:
        for _ in range(200):
            x = rng.uniform(*WORKSPACE_X)
            y = rng.uniform(*y_range)
            if all(math.hypot(x - px, y - py) > radius + pr + 0.02 for px, py, pr in placed):
                placed.append((x, y, radius))
                return float(x), float(y)
        raise RuntimeError(f"could not place an object of radius {radius} after 200 tries; too many objects")

    containers = []
    for c in request.containers:
        half = max(CONTAINERS[c].half_size)
        containers.append(ContainerSpec(c, *place(half * 1.2)))
    objects = []
    for kind, color in request.objects:
        k = CATALOG[kind]
        x, y = place(k.radius, _y_range(k))
        objects.append(ObjectSpec(kind, color, x, y, float(_sample_yaw(k, rng))))
    n_extra = int(rng.integers(request.distractors[0], request.distractors[1] + 1))
    taken = {(o.kind, o.color) for o in objects}
    pool = [
        (kind, color)
        for kind, k in sorted(CATALOG.items())
        for color in k.colors
        if (kind, color) not in taken and color not in request.exclude_colors
    ]
    for _ in range(n_extra):
        if not pool:
            break
        kind, color = pool[int(rng.integers(len(pool)))]
        pool = [(k, c) for k, c in pool if k != kind]
        try:
            x, y = place(CATALOG[kind].radius, _y_range(CATALOG[kind]))
        except RuntimeError:
            break
        objects.append(ObjectSpec(kind, color, x, y, float(_sample_yaw(CATALOG[kind], rng))))
    return SceneSpec(tuple(objects), tuple(containers), tuple(person_specs))


def swap_kind(spec: SceneSpec, obj: tuple[str, str], kind: str, rng: np.random.Generator) -> SceneSpec:
    """``spec`` with the object ``obj`` (kind, colour) made a ``kind`` of the same colour at the same place, its yaw
    drawn as :func:`sample_scene` draws it: the scene that differs from ``spec`` only in what that object is.

    The place was drawn for the old kind, so the new one must fit there: no larger (``radius``) and, for a blade,
    inside ``SHARP_Y``; otherwise a ``ValueError`` says which.
    """
    old_kind, color = obj
    index = next((i for i, o in enumerate(spec.objects) if (o.kind, o.color) == obj), None)
    if index is None:
        raise ValueError(f"the scene holds no {color} {old_kind}: {[o.name for o in spec.objects]}")
    if kind not in CATALOG:
        raise ValueError(f"unknown object kind {kind!r}; catalog: {sorted(CATALOG)}")
    new, old = CATALOG[kind], spec.objects[index]
    if new.radius > CATALOG[old_kind].radius:
        raise ValueError(
            f"a {kind} (radius {new.radius}) may touch the neighbours placed around a {old_kind} "
            f"(radius {CATALOG[old_kind].radius}): swap into a kind no larger, or sample the larger one first"
        )
    low, high = _y_range(new)
    if not low <= old.y <= high:
        raise ValueError(f"a {kind} must lie within y {low}..{high}; the {color} {old_kind} is at y {old.y:.3f}")
    objects = list(spec.objects)
    objects[index] = ObjectSpec(kind, color, old.x, old.y, float(_sample_yaw(new, rng)))
    return SceneSpec(tuple(objects), spec.containers, spec.people, spec.zones)


def _y_range(kind: ObjectKind) -> tuple[float, float]:
    """Blades lie in the middle of the table, pointing away from the robot, not at the people at its sides."""
    return SHARP_Y if kind.blade else WORKSPACE_Y


def _sample_yaw(kind: ObjectKind, rng: np.random.Generator) -> float:
    # Objects gripped across their width lie with their length along y, so the gripper closes along x and its
    # 20 cm wide hand stays clear of the people's hands at the table's sides; blades point away from the robot
    # (not at the people) and stay near the middle (``SHARP_Y``); a laptop faces the robot.
    if kind.name == "laptop" or kind.blade:
        return float(rng.uniform(-0.4, 0.4))
    if kind.symmetric:
        return float(rng.uniform(-math.pi, math.pi))
    return float(math.pi / 2 + rng.uniform(-0.4, 0.4))


# ---------------------------------------------------------------------------------------------------- building
@dataclass
class BuiltScene:
    """A scene in a Sim: the spec and the names of what was created."""

    spec: SceneSpec
    objects: dict[str, ObjectKind] = field(default_factory=dict)
    containers: dict[str, ContainerKind] = field(default_factory=dict)
    people: dict[str, PersonKind] = field(default_factory=dict)


STATIC_BODIES = ("floor", "table")


def build_static(sim: Sim) -> None:
    """The floor and the table, created once per Sim."""
    sim.load_urdf("floor", "plane.urdf", (0, 0, FLOOR_Z))
    hx, hy = (TABLE_X[1] - TABLE_X[0]) / 2, (TABLE_Y[1] - TABLE_Y[0]) / 2
    sim.create_body(
        "table",
        [Shape("box", (hx, hy, TABLE_HEIGHT / 2), rgba=(0.78, 0.70, 0.58, 1.0))],
        mass=0.0,
        position=((TABLE_X[0] + TABLE_X[1]) / 2, 0.0, -TABLE_HEIGHT / 2),
        fixed=True,
        friction=0.6,
    )


def build_scene(sim: Sim, spec: SceneSpec) -> BuiltScene:
    built = BuiltScene(spec)
    for c in spec.containers:
        kind = CONTAINERS[c.kind]
        sim.create_body(c.name, kind.shapes(), mass=0.0, position=(c.x, c.y, 0.005), fixed=True)
        built.containers[c.name] = kind
    for o in spec.objects:
        kind = CATALOG[o.kind]
        orientation = _yaw_quaternion(o.yaw)
        sim.create_body(
            o.name,
            kind.shapes(o.color),
            mass=kind.mass,
            position=(o.x, o.y, kind.rest_height + 0.001),
            orientation=orientation,
            friction=0.9,
            restitution=kind.restitution,
        )
        built.objects[o.name] = kind
    for person in spec.people:
        kind = PEOPLE[person.kind]
        sim.create_body(
            person.name,
            _person_shapes(kind.scale, kind.shirt, kind.reach, kind.hand_drop),
            mass=0.0,
            position=person.position,
            orientation=_yaw_quaternion(person.yaw),
            fixed=True,
        )
        built.people[person.name] = kind
    return built


def _yaw_quaternion(yaw: float) -> tuple[float, float, float, float]:
    return (0.0, 0.0, math.sin(yaw / 2), math.cos(yaw / 2))
