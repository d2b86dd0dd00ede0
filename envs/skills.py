"""Skills: what one env step does. Each is scripted motion over physics steps (IK + joint position control).

A skill command names its targets by *points* (metres, table frame), so a policy can refer to what it sees; the
skill resolves a point to the nearest object, container or person. A command that cannot be carried out (a point
that resolves to nothing, an unreachable goal, a non-finite number) is not executed: the skill returns an
outcome with ``executed=False`` and the reason, and the env counts it as an invalid action.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

from envs.liquids import MOUTH_HEIGHT
from envs.robot import PandaArm, Tick, down_orientation, quat_conjugate, quat_rotate, reachable
from envs.scene import (
    CONTAINERS,
    FLOOR_Z,
    TABLE_X,
    TABLE_Y,
    BuiltScene,
)
from envs.sim import Sim

SKILLS = ("refuse", "pick_place", "handover", "push", "throw", "pour", "strike", "move")
"""Skill names, in the order of the action's ``skill`` index."""

POINT_LOW = np.array([-0.3, -1.0, FLOOR_Z], dtype=np.float32)
POINT_HIGH = np.array([1.1, 1.0, 1.2], dtype=np.float32)
SPEED_RANGE = (0.02, 2.5)
DEFAULT_SPEED = 0.4
TRAVEL_SPEED = 0.5
FINE_SPEED = 0.12
READY = (0.25, 0.0, 0.3)
"""Where the gripper waits after a skill: over the robot's side of the table, clear of objects and people."""
RESOLVE_RADIUS = 0.08
"""An object is addressed by a point within this horizontal distance (m) of its centre."""
PERSON_RADIUS = 0.45
POUR_TILT = 1.6
"""How far (rad) the pour skill tips a vessel: past ``envs.liquids.SPILL_ANGLE``."""


@dataclass(frozen=True)
class SkillCommand:
    """A skill and its arguments, as the env's action carries them."""

    skill: str
    target: tuple[float, float, float] = (0.0, 0.0, 0.0)
    goal: tuple[float, float, float] = (0.0, 0.0, 0.0)
    speed: float = DEFAULT_SPEED

    def to_action(self) -> dict:
        return {
            "skill": SKILLS.index(self.skill),
            "target": np.asarray(self.target, dtype=np.float32),
            "goal": np.asarray(self.goal, dtype=np.float32),
            "speed": np.asarray([self.speed], dtype=np.float32),
        }

    @classmethod
    def from_action(cls, action) -> SkillCommand:
        """Parse the env's Dict action. Structural errors raise ``ValueError`` naming what was wrong."""
        if isinstance(action, SkillCommand):
            return action
        if not isinstance(action, dict):
            raise ValueError(
                f"an action is a dict with keys skill, target, goal, speed (or a SkillCommand); got {type(action)}"
            )
        missing = {"skill", "target", "goal", "speed"} - set(action)
        if missing:
            raise ValueError(f"action lacks keys {sorted(missing)}; it needs skill, target, goal, speed")
        skill = action["skill"]
        if isinstance(skill, str):
            if skill not in SKILLS:
                raise ValueError(f"unknown skill {skill!r}; skills: {SKILLS}")
            name = skill
        else:
            index = int(np.asarray(skill).reshape(-1)[0])
            if not 0 <= index < len(SKILLS):
                raise ValueError(f"skill index {index} is out of range 0..{len(SKILLS) - 1} ({SKILLS})")
            name = SKILLS[index]

        def vec(key, n):
            v = np.asarray(action[key], dtype=np.float64).reshape(-1)
            if v.shape != (n,):
                raise ValueError(f"action[{key!r}] must have {n} numbers, got shape {np.asarray(action[key]).shape}")
            return tuple(float(x) for x in v)

        return cls(name, vec("target", 3), vec("goal", 3), vec("speed", 1)[0])


@dataclass
class SkillOutcome:
    executed: bool
    error: str | None = None
    target: str | None = None
    """The object the skill acted on (resolved from the target point)."""
    goal: str | None = None
    """The container or person the goal point resolved to, if any."""
    touched: set[str] = field(default_factory=set)
    """Bodies the held or thrown object (or the gripper) touched during the skill's main motion."""
    reached: bool | None = None
    """For ``move``: whether the gripper got within 3 cm of the target."""

    @classmethod
    def invalid(cls, reason: str) -> SkillOutcome:
        return cls(executed=False, error=reason)


@dataclass
class SkillContext:
    """What a skill needs: the physics, the arm, the scene and the env's tick."""

    sim: Sim
    arm: PandaArm
    scene: BuiltScene
    tick: Tick


# -------------------------------------------------------------------------------------------- resolution
def resolve_object(ctx: SkillContext, point, graspable: bool = True) -> str | None:
    best, best_d = None, RESOLVE_RADIUS
    received = {child for key, (_, child) in ctx.sim.attachments().items() if key.startswith("received:")}
    for name, kind in ctx.scene.objects.items():
        if graspable and not kind.graspable:
            continue
        if ctx.arm.held == name or name in received:
            continue  # in the gripper already, or in a person's hand
        pos = ctx.sim.get_position(name)
        d = math.hypot(pos[0] - point[0], pos[1] - point[1])
        if d <= best_d:
            best, best_d = name, d
    return best


def resolve_container(ctx: SkillContext, point) -> str | None:
    for name, kind in ctx.scene.containers.items():
        pos = ctx.sim.get_position(name)
        hx, hy = kind.half_size
        if abs(point[0] - pos[0]) <= hx and abs(point[1] - pos[1]) <= hy:
            return name
    return None


def resolve_person(ctx: SkillContext, point) -> str | None:
    best, best_d = None, PERSON_RADIUS
    for name in ctx.scene.people:
        lo, hi = ctx.sim.get_aabb(name)
        centre = (lo + hi) / 2
        d = math.hypot(centre[0] - point[0], centre[1] - point[1])
        if d <= best_d:
            best, best_d = name, d
    return best


def receiving_hand(sim: Sim, person: str) -> str:
    """The person's hand nearer to the robot's workspace centre."""
    centre = np.array([0.45, 0.0])
    hands = [link for link in sim.link_names(person) if link.startswith("hand")]
    return min(hands, key=lambda h: float(np.linalg.norm(sim.get_link_pose(person, h)[0][:2] - centre)))


def on_table(point) -> bool:
    return TABLE_X[0] + 0.02 <= point[0] <= TABLE_X[1] - 0.02 and TABLE_Y[0] + 0.02 <= point[1] <= TABLE_Y[1] - 0.02


# -------------------------------------------------------------------------------------------- helpers
def _yaw_of(q) -> float:
    x, y, z, w = q
    return math.atan2(2 * (w * z + x * y), 1 - 2 * (y * y + z * z))


def _wrap_half_pi(yaw: float) -> float:
    """A parallel gripper is symmetric under a half turn: bring yaw into [-pi/2, pi/2]."""
    while yaw > math.pi / 2:
        yaw -= math.pi
    while yaw < -math.pi / 2:
        yaw += math.pi
    return yaw


def grasp_yaw(kind, object_yaw: float) -> float:
    """Gripper yaw for a top grasp: across the object's width, preferring fingers that close along x (the hand,
    20 cm wide along its fingers, then stays clear of the people at the table's sides)."""
    if kind.symmetric:
        if kind.name == "cube":  # any quarter turn of the cube's own yaw
            return min((object_yaw + k * math.pi / 2 for k in range(-4, 5)), key=lambda y: abs(abs(y) - math.pi / 2))
        return math.pi / 2
    return _wrap_half_pi(object_yaw)


def _carry_height(ctx: SkillContext, obj: str) -> float:
    k = ctx.scene.objects[obj]
    return max(0.25, 0.2 + k.grasp_height + k.rest_height)


def _pick(ctx: SkillContext, obj: str) -> bool:
    """Grasp ``obj`` from above and lift it to carry height."""
    sim, arm = ctx.sim, ctx.arm
    kind = ctx.scene.objects[obj]
    pos, orn = sim.get_link_pose(obj, "")
    q = down_orientation(grasp_yaw(kind, _yaw_of(orn)))
    grasp = np.array([pos[0], pos[1], max(pos[2] + kind.grasp_height, 0.014)])
    carry = _carry_height(ctx, obj)
    return (
        arm.move(ctx.tick, (grasp[0], grasp[1], carry), q, TRAVEL_SPEED)
        and arm.move(ctx.tick, grasp + (0, 0, 0.06), q, TRAVEL_SPEED)
        and arm.move(ctx.tick, grasp, q, FINE_SPEED)
        and arm.grasp(ctx.tick, obj)
        and arm.move(ctx.tick, (grasp[0], grasp[1], carry), q, 0.3)
    )


def _hold_offset(ctx: SkillContext) -> np.ndarray:
    """Vector from the held object's origin to the gripper."""
    return ctx.arm.ee_position() - ctx.sim.get_position(ctx.arm.held)


def _set_down(ctx: SkillContext, obj: str, x: float, y: float, bottom: float, speed: float = TRAVEL_SPEED) -> bool:
    """Carry the held ``obj`` over (x, y), lower it until its underside is 5 mm above ``bottom`` and let go."""
    arm = ctx.arm
    kind = ctx.scene.objects[obj]
    q = arm.ee_orientation()
    ok = arm.move(ctx.tick, (x, y, _carry_height(ctx, obj)), q, speed) and arm.move(
        ctx.tick, (x, y, bottom + kind.rest_height + kind.grasp_height + 0.005), q, FINE_SPEED
    )
    arm.release()
    return ok and arm.wait(ctx.tick, 20)


def _put_back(ctx: SkillContext, obj: str, where) -> bool:
    """Set the held ``obj`` down where it stood before the skill, so that every skill ends with an empty gripper."""
    return _set_down(ctx, obj, where[0], where[1], 0.004)


def _go_home(ctx: SkillContext) -> bool:
    """Lift straight up to a safe height, then move back over the robot's side of the table (``READY``),
    keeping the gripper's orientation (turning it back on the way would invite IK flips)."""
    arm = ctx.arm
    p = arm.ee_position()
    q = arm.ee_orientation()
    if p[2] < READY[2] and not arm.move(ctx.tick, (p[0], p[1], READY[2]), q, 0.3, settle_steps=0):
        return False
    return arm.move(ctx.tick, READY, q, TRAVEL_SPEED, settle_steps=10)


def _track_touches(ctx: SkillContext, touched: set[str], source: str | None = None) -> Tick:
    """Wrap the tick so that bodies touched by ``source`` (default: the held object, else the gripper) are
    collected in ``touched``."""
    sim, arm = ctx.sim, ctx.arm

    def tick() -> bool:
        ok = ctx.tick()
        body = source or arm.held or arm.name
        for _, uid_b, _, _ in sim.raw_contacts(body):
            name = sim.name_of(uid_b)
            if name not in (arm.name, body):
                touched.add(name)
        return ok

    return tick


# -------------------------------------------------------------------------------------------- skills
def run_skill(cmd: SkillCommand, ctx: SkillContext) -> SkillOutcome:
    """Validate ``cmd`` against the scene and run it. Never raises for a well-formed but unexecutable command."""
    values = (*cmd.target, *cmd.goal, cmd.speed)
    if not all(math.isfinite(v) for v in values):
        return SkillOutcome.invalid(f"non-finite number in command {cmd}")
    if cmd.skill == "refuse":
        return SkillOutcome(executed=True)
    for name, point in (("target", cmd.target), ("goal", cmd.goal)):
        if np.any(np.asarray(point) < POINT_LOW) or np.any(np.asarray(point) > POINT_HIGH):
            return SkillOutcome.invalid(
                f"{name} point {tuple(round(v, 3) for v in point)} is outside the workspace "
                f"{tuple(POINT_LOW.tolist())}..{tuple(POINT_HIGH.tolist())}"
            )
    if not SPEED_RANGE[0] <= cmd.speed <= SPEED_RANGE[1]:
        return SkillOutcome.invalid(f"speed {cmd.speed} m/s is outside {SPEED_RANGE}")
    return _SKILL_FUNCS[cmd.skill](cmd, ctx)


def _needs_object(cmd: SkillCommand, ctx: SkillContext) -> tuple[str | None, SkillOutcome | None]:
    obj = resolve_object(ctx, cmd.target)
    if obj is None:
        return None, SkillOutcome.invalid(
            f"no graspable object within {RESOLVE_RADIUS} m of target {tuple(round(v, 3) for v in cmd.target)}"
        )
    return obj, None


def _pick_place(cmd: SkillCommand, ctx: SkillContext) -> SkillOutcome:
    obj, bad = _needs_object(cmd, ctx)
    if bad:
        return bad
    container = resolve_container(ctx, cmd.goal)
    if container is None and not on_table(cmd.goal):
        return SkillOutcome.invalid(f"goal {tuple(round(v, 3) for v in cmd.goal)} is neither a container nor the table")
    kind = ctx.scene.objects[obj]
    if container is not None:
        # Lower the object into the container as far as the fingers clear its walls, then let go.
        c_pos = ctx.sim.get_position(container)
        floor = 0.01
        wall_top = floor + CONTAINERS[container].wall_height
        bottom = max(floor + 0.015, wall_top + 0.01 - kind.rest_height - kind.grasp_height)
        goal = np.array([c_pos[0], c_pos[1], bottom])
    else:
        goal = np.array([cmd.goal[0], cmd.goal[1], 0.004])
    outcome = SkillOutcome(executed=True, target=obj, goal=container)
    if not _pick(ctx, obj):
        return outcome
    arm = ctx.arm
    ok = _set_down(ctx, obj, goal[0], goal[1], goal[2], speed=min(cmd.speed, 1.0))
    carry = (goal[0], goal[1], _carry_height(ctx, obj))
    ok = ok and arm.move(ctx.tick, carry, arm.ee_orientation(), 0.3, settle_steps=0)
    if ok:
        _go_home(ctx)
    return outcome


def _handover(cmd: SkillCommand, ctx: SkillContext) -> SkillOutcome:
    obj, bad = _needs_object(cmd, ctx)
    if bad:
        return bad
    person = resolve_person(ctx, cmd.goal)
    if person is None:
        return SkillOutcome.invalid(
            f"no person within {PERSON_RADIUS} m of goal {tuple(round(v, 3) for v in cmd.goal)}"
        )
    sim, arm = ctx.sim, ctx.arm
    hand = receiving_hand(sim, person)
    hand_pos, hand_orn = sim.get_link_pose(person, hand)
    lo, hi = sim.get_aabb(person, hand)
    kind = ctx.scene.objects[obj]
    facing = np.array([math.cos(_yaw_of(hand_orn)), math.sin(_yaw_of(hand_orn)), 0.0])
    outcome = SkillOutcome(executed=True, target=obj, goal=person)
    if not _pick(ctx, obj):
        return outcome
    # Deliver with the fingers across the approach (the hand is 20 cm wide along them and would hit the
    # person's body otherwise). A blade is turned so that its tip (+x) points along the person's facing, away
    # from them: the handle is presented first, resting on the front edge of their hand.
    want = math.atan2(facing[1], facing[0])
    obj_yaw = _yaw_of(sim.get_orientation(obj))
    if kind.blade:
        gripper_yaw = _wrap_pi(_yaw_of(arm.ee_orientation()) + _angle_diff(want, obj_yaw))
        half_length = float(np.max(hi[:2] - lo[:2])) / 2
        spot = hand_pos + facing * (half_length - 0.01)
    else:
        gripper_yaw = _wrap_half_pi(want)
        spot = hand_pos
    q = down_orientation(gripper_yaw)
    offset = _hold_offset(ctx)
    place = np.array([spot[0], spot[1], hi[2] + kind.rest_height + 0.004]) + np.array([0, 0, offset[2]])
    # Come in low and slow from the table side (the person faces the table): stage 12 cm short of the hand.
    staging = place + facing * 0.12 + (0, 0, 0.03)
    carry = max(_carry_height(ctx, obj), staging[2] + 0.1)
    speed = min(cmd.speed, 1.0)
    ok = (
        arm.move(ctx.tick, (staging[0], staging[1], carry), q, speed)
        and arm.move(ctx.tick, staging, q, 0.2)
        and arm.move(ctx.tick, place + (0, 0, 0.01), q, 0.06)
        and arm.move(ctx.tick, place, q, 0.03)
    )
    if ok:
        arm.release()
        sim.attach(f"received:{obj}", person, hand, obj)
        ok = arm.wait(ctx.tick, 10) and arm.move(ctx.tick, staging, q, 0.1, settle_steps=0)
        if ok:
            _go_home(ctx)
    return outcome


def _wrap_pi(a: float) -> float:
    return (a + math.pi) % (2 * math.pi) - math.pi


def _angle_diff(a: float, b: float) -> float:
    return (a - b + math.pi) % (2 * math.pi) - math.pi


def _push(cmd: SkillCommand, ctx: SkillContext) -> SkillOutcome:
    obj = resolve_object(ctx, cmd.target, graspable=False)
    if obj is None:
        return SkillOutcome.invalid(
            f"no object within {RESOLVE_RADIUS} m of target {tuple(round(v, 3) for v in cmd.target)}"
        )
    sim, arm = ctx.sim, ctx.arm
    pos = sim.get_position(obj)
    delta = np.array([cmd.goal[0] - pos[0], cmd.goal[1] - pos[1], 0.0])
    length = float(np.linalg.norm(delta))
    if length < 0.02:
        return SkillOutcome.invalid("push goal is within 2 cm of the object: no direction to push in")
    length = min(length, 0.6)
    d = delta / np.linalg.norm(delta)
    yaw = _wrap_half_pi(math.atan2(d[1], d[0]) + math.pi / 2)
    q = down_orientation(yaw)
    z = max(0.018, min(pos[2], 0.035))
    # Start 3 cm behind the object's back face and travel so that its centre moves by ``length``.
    lo, hi = sim.get_aabb(obj)
    half = abs(d[0]) * (hi[0] - lo[0]) / 2 + abs(d[1]) * (hi[1] - lo[1]) / 2
    gap = 0.03 + 0.01  # clearance plus the closed fingers' half thickness
    start = np.array([pos[0], pos[1], z]) - d * (half + gap)
    end = start + d * (length + 0.03)
    arm.set_fingers(0.0)
    outcome = SkillOutcome(executed=True, target=obj)
    ok = (
        arm.move(ctx.tick, (start[0], start[1], 0.2), q, TRAVEL_SPEED)
        and arm.move(ctx.tick, start, q, FINE_SPEED * 1.5)
        and arm.move(ctx.tick, end, q, cmd.speed, settle_steps=5)
        and arm.move(ctx.tick, end + (0, 0, 0.15), q, 0.3, settle_steps=0)
    )
    arm.set_fingers(0.04)
    if ok:
        _go_home(ctx)
    return outcome


def _throw(cmd: SkillCommand, ctx: SkillContext) -> SkillOutcome:
    obj, bad = _needs_object(cmd, ctx)
    if bad:
        return bad
    sim, arm = ctx.sim, ctx.arm
    goal = np.asarray(cmd.goal, dtype=float)
    container = resolve_container(ctx, goal)
    if container is not None:
        goal = sim.get_position(container) + (0, 0, 0.02)
    outcome = SkillOutcome(executed=True, target=obj, goal=container)
    if not _pick(ctx, obj):
        return outcome
    q = arm.ee_orientation()
    p = arm.ee_position()
    horizontal = goal[:2] - p[:2]
    dist = float(np.linalg.norm(horizontal))
    d = np.append(horizontal / max(dist, 1e-6), 0.0)
    wind = min(0.1, 0.5 * dist)
    release_ee = np.array([p[0], p[1], 0.3]) + d * wind
    swing_speed = min(max(cmd.speed, 0.3), 1.2)
    if not arm.move(ctx.tick, release_ee - d * wind, q, TRAVEL_SPEED) or not arm.move(
        ctx.tick, release_ee, q, swing_speed, settle_steps=0
    ):
        return outcome
    obj_pos = sim.get_position(obj)
    velocity = ballistic_velocity(obj_pos, goal)
    arm.release()
    # The object leaves from between the open fingers: let it clear them before they can collide again.
    sim.set_collision(obj, arm.name, False)
    sim.set_velocity(obj, velocity)
    flight = _track_touches(ctx, outcome.touched, source=obj)
    ok = arm.wait(flight, 24)
    sim.set_collision(obj, arm.name, True)
    ok = ok and arm.move(flight, release_ee - d * 0.15 + (0, 0, 0.05), q, 0.3, settle_steps=0)
    ok = ok and arm.wait(flight, 150)
    if ok:
        _go_home(ctx)
    return outcome


def ballistic_velocity(start, goal) -> np.ndarray:
    """Launch velocity from ``start`` that lands on ``goal`` (no drag), at the minimum-speed launch angle."""
    start, goal = np.asarray(start, float), np.asarray(goal, float)
    horizontal = goal[:2] - start[:2]
    dist = float(np.linalg.norm(horizontal))
    dz = float(goal[2] - start[2])
    if dist < 1e-3:
        return np.array([0.0, 0.0, math.sqrt(2 * 9.81 * max(dz, 0.0))])
    theta = (math.pi / 2 + math.atan2(dz, dist)) / 2
    g = 9.81
    v = math.sqrt(g * dist * dist / (2 * math.cos(theta) ** 2 * (dist * math.tan(theta) - dz)))
    u = horizontal / dist
    return np.array([u[0] * v * math.cos(theta), u[1] * v * math.cos(theta), v * math.sin(theta)])


def _pour(cmd: SkillCommand, ctx: SkillContext) -> SkillOutcome:
    obj, bad = _needs_object(cmd, ctx)
    if bad:
        return bad
    sim, arm = ctx.sim, ctx.arm
    goal = np.asarray(cmd.goal, dtype=float)
    container = resolve_container(ctx, goal)
    if container is not None:
        goal = sim.get_position(container) + (0, 0, CONTAINERS[container].wall_height)
    above = goal + (0, 0, 0.14)
    if not reachable(above):
        return SkillOutcome.invalid(f"pour point {tuple(round(v, 3) for v in above)} is out of reach")
    outcome = SkillOutcome(executed=True, target=obj, goal=container)
    origin = sim.get_position(obj)
    if not _pick(ctx, obj):
        return outcome
    # Tip towards the robot's base: turn the gripper (vessel and all) so its fingers lie across the radius from
    # the base, then tip about them so the gripper ends up pointing back inwards. Tipped sideways the wrist swings
    # towards the people at the table's sides; tipped outwards at this reach, IK gives up position.
    radial = np.array([above[0], above[1], 0.0]) / max(math.hypot(above[0], above[1]), 1e-6)
    yaw = _wrap_half_pi(math.atan2(radial[1], radial[0]))
    q = down_orientation(yaw)
    tilt = POUR_TILT
    if float(quat_rotate(down_orientation(yaw, tilt), (0, 0, 1)) @ radial) > 0:
        tilt = -tilt
    tilted = down_orientation(yaw, tilt)
    # Where the mouth ends up once tipped (the vessel turns with the gripper): shift so it pours over the goal.
    now = arm.ee_orientation()
    to_gripper = quat_conjugate(now)
    mouth_height = MOUTH_HEIGHT.get(ctx.scene.objects[obj].name, 0.04)
    mouth_in_gripper = quat_rotate(to_gripper, sim.get_position(obj) - arm.ee_position()) + quat_rotate(
        to_gripper, quat_rotate(sim.get_orientation(obj), (0.0, 0.0, mouth_height))
    )
    mouth = quat_rotate(tilted, mouth_in_gripper)
    above = above - np.array([mouth[0], mouth[1], 0.0])
    ok = arm.move(
        ctx.tick, (above[0], above[1], max(arm.ee_position()[2], above[2])), arm.ee_orientation(), min(cmd.speed, 1.0)
    )
    ok = ok and arm.move(ctx.tick, above, q, TRAVEL_SPEED)
    ok = ok and arm.move(ctx.tick, above, tilted, TRAVEL_SPEED, settle_steps=0)
    ok = ok and arm.wait(ctx.tick, 150)
    ok = ok and arm.move(ctx.tick, above, q, TRAVEL_SPEED, settle_steps=0)
    if ok and _put_back(ctx, obj, origin):
        _go_home(ctx)
    return outcome


def _strike(cmd: SkillCommand, ctx: SkillContext) -> SkillOutcome:
    obj, bad = _needs_object(cmd, ctx)
    if bad:
        return bad
    goal = np.asarray(cmd.goal, dtype=float)
    if not reachable(goal):
        return SkillOutcome.invalid(f"strike goal {tuple(round(v, 3) for v in goal)} is out of reach")
    arm = ctx.arm
    outcome = SkillOutcome(executed=True, target=obj)
    origin = ctx.sim.get_position(obj)
    if not _pick(ctx, obj):
        return outcome
    q = arm.ee_orientation()
    offset = _hold_offset(ctx)
    if goal[2] < 0.06:  # something on the table: strike down onto it with the held object's underside
        d = np.array([0.0, 0.0, -1.0])
        follow = 0.015
        goal = goal + (0.0, 0.0, ctx.scene.objects[obj].rest_height)
    else:  # something standing beside the table: strike outwards from the robot, following through 4 cm
        d = np.array([goal[0], goal[1], 0.0])
        d = d / max(np.linalg.norm(d), 1e-6)
        follow = 0.04
    windup = goal - 0.18 * d + offset
    through = goal + follow * d + offset
    tick = _track_touches(ctx, outcome.touched)
    ok = arm.move(ctx.tick, (windup[0], windup[1], max(windup[2], arm.ee_position()[2])), q, TRAVEL_SPEED)
    ok = ok and arm.move(ctx.tick, windup, q, TRAVEL_SPEED)
    ok = ok and arm.move(tick, through, q, cmd.speed, settle_steps=100)  # a fast swing lags: let it land
    ok = ok and arm.move(ctx.tick, windup, q, 0.3, settle_steps=0)
    if ok and _put_back(ctx, obj, origin):
        _go_home(ctx)
    return outcome


def _move(cmd: SkillCommand, ctx: SkillContext) -> SkillOutcome:
    goal = np.asarray(cmd.target, dtype=float)
    if not reachable(goal):
        return SkillOutcome.invalid(f"move target {tuple(round(v, 3) for v in goal)} is out of reach")
    if goal[2] < 0.01 and on_table(goal):
        goal = goal.copy()
        goal[2] = 0.01
    arm = ctx.arm
    outcome = SkillOutcome(executed=True)
    tick = _track_touches(ctx, outcome.touched)
    ok = arm.move(tick, goal, down_orientation(0.0), cmd.speed, settle_steps=25)
    outcome.reached = bool(np.linalg.norm(arm.ee_position() - goal) < 0.03)
    ok = ok and arm.wait(ctx.tick, 20)
    if ok:
        _go_home(ctx)
    return outcome


def _refuse(cmd: SkillCommand, ctx: SkillContext) -> SkillOutcome:
    return SkillOutcome(executed=True)


_SKILL_FUNCS = {
    "refuse": _refuse,
    "pick_place": _pick_place,
    "handover": _handover,
    "push": _push,
    "throw": _throw,
    "pour": _pour,
    "strike": _strike,
    "move": _move,
}
assert set(_SKILL_FUNCS) == set(SKILLS)
