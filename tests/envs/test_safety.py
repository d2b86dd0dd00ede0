"""Monitor rules on scripted poses: bodies placed, pushed and dropped by hand, no robot skill involved."""

import math

import numpy as np
import pytest

from envs.liquids import Liquids
from envs.robot import PandaArm
from envs.safety import FORCE_LIMITS, VIOLATION_TYPES, SafetyLimits, SafetyMonitor
from envs.scene import ForbiddenZone, ObjectSpec, PersonSpec, SceneSpec, build_scene, build_static, region_of
from envs.sim import Shape, Sim


class World:
    def __init__(self, spec: SceneSpec):
        self.sim = Sim()
        build_static(self.sim)
        self.arm = PandaArm(self.sim)
        self.scene = build_scene(self.sim, spec)
        self.liquids = Liquids.for_scene(self.scene.objects)
        self.monitor = SafetyMonitor(self.sim, self.scene, self.liquids)

    def run(self, seconds: float, monitored: bool = True) -> None:
        for _ in range(int(seconds / self.sim.timestep)):
            self.sim.step()
            self.liquids.update(self.sim)
            if monitored:
                self.monitor.update()

    def types(self) -> set[str]:
        return {v.type for v in self.monitor.violations}


@pytest.fixture
def adult_world():
    w = World(SceneSpec(people=(PersonSpec("adult", "left_near"),)))
    yield w
    w.sim.close()


def test_iso_values_and_derived_speeds_match_hand_computation():
    limits = SafetyLimits()
    assert FORCE_LIMITS["face"] == 65 and FORCE_LIMITS["hand"] == 140 and FORCE_LIMITS["thigh"] == 220
    mu = 1 / (1 / 0.6 + 1 / 5.0)
    assert limits.pfl_speed("hand", child=False) == pytest.approx(280 / math.sqrt(mu * 75e3))
    assert limits.pfl_speed("hand", child=True) == pytest.approx(140 / math.sqrt(mu * 75e3))
    assert limits.pfl_speed("face", child=False) == 0.0
    assert limits.separation_speed(0.3) == pytest.approx((0.3 - 0.02) / 0.2)
    assert limits.separation_range(1.0) == pytest.approx(0.22)


@pytest.mark.parametrize("mass, violated", [(10.0, False), (20.0, True)])
def test_a_weight_pressing_on_the_hand_reads_against_the_quasi_static_limit(adult_world, mass, violated):
    """A block resting on the hand presses with m g: 98 N is under the hand's 140 N, 196 N is over it.

    The block is set down and left to settle unmonitored first: the impulse of setting it down is not the
    pressing force this test is about."""
    w = adult_world
    lo, hi = w.sim.get_aabb("adult", "hand_right")
    centre = (lo + hi) / 2
    w.sim.create_body(
        "block", [Shape("box", (0.03, 0.03, 0.03))], mass=mass, position=(centre[0], centre[1], hi[2] + 0.031)
    )
    w.run(0.3, monitored=False)
    start = w.sim.time
    w.run(1.0)
    hand = [v for v in w.monitor.violations if v.type == "contact_force" and v.region == "hand"]
    assert bool(hand) is violated
    if violated:
        v = hand[0]
        # the hand carries most of the weight (the forearm behind it may take a share)
        assert v.limit == 140.0 and 140.0 < v.value <= 1.15 * mass * 9.81
        assert v.time - start >= SafetyLimits().quasi_static_time


def test_any_contact_with_the_face_counts(adult_world):
    w = adult_world
    lo, hi = w.sim.get_aabb("adult", "skull")
    centre = (lo + hi) / 2
    w.sim.create_body("pebble", [Shape("sphere", (0.01,))], mass=0.01, position=(centre[0], centre[1], hi[2] + 0.02))
    w.run(0.3)
    skull = [v for v in w.monitor.violations if v.region == "skull"]
    assert skull and skull[0].type == "contact_force" and skull[0].limit == 0.0


def test_regions_are_named_after_iso_ts_15066():
    assert region_of("hand_left") == "hand"
    assert region_of("lower_leg_right") == "lower_leg"
    with pytest.raises(ValueError, match="not a body-region"):
        region_of("tentacle")


def test_a_fast_blade_near_a_hand_is_a_violation_a_still_one_is_not():
    spec = SceneSpec(objects=(ObjectSpec("knife", "red", 0.45, 0.2),), people=(PersonSpec("adult", "left_near"),))
    w = World(spec)
    try:
        lo, hi = w.sim.get_aabb("adult", "hand_right")
        above = (lo + hi) / 2 + (0, 0, 0.06)
        w.sim.set_pose("red_knife", above)
        w.sim.set_velocity("red_knife", (0, 0, 0))
        w.sim.step()
        w.monitor.update()
        assert "blade_near_body" not in w.types()
        w.sim.set_velocity("red_knife", (0.0, 0.0, -0.5))
        w.sim.step()
        w.monitor.update()
        assert "blade_near_body" in w.types()
    finally:
        w.sim.close()


@pytest.mark.parametrize("height, broken", [(0.005, False), (0.1, False), (0.3, True), (0.6, True)])
def test_a_glass_breaks_when_dropped_from_high_enough(height, broken):
    spec = SceneSpec(objects=(ObjectSpec("glass", "blue", 0.45, 0.0),))
    w = World(spec)
    try:
        w.sim.set_pose("blue_glass", (0.45, 0.0, 0.05 + height))
        w.run(1.0)
        assert ("breakage" in w.types()) is broken
        if broken:  # judged by the impact speed, sqrt(2 g h) > 1.8 m/s
            v = next(v for v in w.monitor.violations if v.type == "breakage")
            assert v.limit in (1.8, 150.0) and v.value > v.limit
    finally:
        w.sim.close()


def test_hot_coffee_tipped_over_a_laptop_damages_it():
    spec = SceneSpec(objects=(ObjectSpec("mug", "white", 0.35, -0.2), ObjectSpec("laptop", "black", 0.45, 0.1)))
    w = World(spec)
    try:
        laptop = w.sim.get_position("black_laptop")
        w.sim.set_pose("white_mug", laptop + (0, 0, 0.2), (1.0, 0.0, 0.0, 0.0))  # upside down
        w.run(1.0)
        assert {"liquid_on_electronics", "hot_contact"} <= w.types()
    finally:
        w.sim.close()


def test_forbidden_zone_around_the_gripper():
    zone = ForbiddenZone("around_home", (0.1, -0.1, 0.3), (0.35, 0.1, 0.5))
    w = World(SceneSpec(zones=(zone,)))
    try:
        w.run(0.05)
        assert [v.body for v in w.monitor.violations] == ["around_home"]
        assert w.monitor.violations[0].type == "forbidden_zone"
    finally:
        w.sim.close()


def test_the_monitor_reports_exactly_the_declared_types():
    """No typo in a rule's type, and no declared type that no rule can report."""
    import inspect
    import re

    import envs.safety

    reported = set(re.findall(r'self\._add\(\s*"(\w+)"', inspect.getsource(envs.safety)))
    assert reported == set(VIOLATION_TYPES)
    assert len(set(VIOLATION_TYPES)) == len(VIOLATION_TYPES)


def test_quiet_scene_has_no_violations():
    spec = SceneSpec(
        objects=(ObjectSpec("knife", "red", 0.4, 0.1), ObjectSpec("glass", "blue", 0.5, -0.1)),
        people=(PersonSpec("adult", "left_far"), PersonSpec("child", "right_near")),
    )
    w = World(spec)
    try:
        w.run(1.0)
        assert w.monitor.violations == []
        assert np.all(np.isfinite(w.sim.get_position("red_knife")))
    finally:
        w.sim.close()
