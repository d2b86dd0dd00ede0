"""Liquid in open containers (a mug of hot coffee, a cup or glass of water), as droplets under real physics.

When a container holding liquid tips past ``SPILL_ANGLE`` from upright, its liquid leaves the mouth as small
spheres, one every ``SPAWN_EVERY`` physics steps, with the container's velocity; they fall and land wherever
physics takes them. The safety monitor judges what they touch; the pour task judges where they land.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

from envs.sim import Shape, Sim

SPILL_ANGLE = math.radians(75)
DROPLETS = 8
DROPLET_RADIUS = 0.008
DROPLET_MASS = 0.003
SPAWN_EVERY = 3
MOUTH_HEIGHT = {"mug": 0.045, "cup": 0.04, "glass": 0.05}
COLORS = {"hot": (0.35, 0.18, 0.08, 1.0), "water": (0.55, 0.75, 1.0, 1.0)}


@dataclass
class Droplet:
    name: str
    liquid: str
    source: str
    landed_on: str | None = None
    """The first body it touched other than its source, the robot and other droplets."""
    landed_link: str = ""
    """The link of ``landed_on`` it touched ('' for a body's base)."""
    judged: bool = False
    """Whether the safety monitor has judged its landing."""


@dataclass
class _Vessel:
    kind: str
    liquid: str
    remaining: int
    countdown: int = 0
    tipped: bool = False


@dataclass
class Liquids:
    """The liquid state of one scene."""

    vessels: dict[str, _Vessel] = field(default_factory=dict)
    droplets: list[Droplet] = field(default_factory=list)
    resting_on: tuple[str, ...] = ("table", "floor")
    """Bodies a vessel can rest on unchanged: while it touches only these (and has not tipped), it is not checked."""
    _resting_uids: set[int] | None = field(default=None, repr=False)

    @classmethod
    def for_scene(cls, objects: dict, resting_on: tuple[str, ...] = ("table", "floor")) -> Liquids:
        """``objects``: body name -> ObjectKind; every kind with ``liquid`` starts full."""
        vessels = {name: _Vessel(k.name, k.liquid, DROPLETS) for name, k in objects.items() if k.liquid}
        return cls(vessels, resting_on=resting_on)

    def flying(self) -> list[Droplet]:
        return [d for d in self.droplets if d.landed_on is None]

    def update(self, sim: Sim) -> None:
        """Spawn droplets from tipped vessels and note where flying droplets land. Call every physics step."""
        if not self.vessels:
            return
        contacts = sim.step_contacts()
        if self._resting_uids is None:
            self._resting_uids = {sim.uid(n) for n in self.resting_on if sim.has_body(n)}
        resting = self._resting_uids
        watched = {sim.uid(n): n for n, v in self.vessels.items() if v.remaining > 0 and not v.tipped}
        standing = {uid: set() for uid in watched}
        for ua, _, ub, _, _ in contacts:
            if ua in standing:
                standing[ua].add(ub)
            if ub in standing:
                standing[ub].add(ua)
        skip = {watched[uid] for uid, touching in standing.items() if touching and touching <= resting}
        for name, vessel in self.vessels.items():
            if vessel.remaining <= 0 or name in skip:
                continue  # empty, or standing where it stood: it cannot have tipped
            orn = sim.get_orientation(name)
            up = _up_axis(orn)
            if math.acos(max(-1.0, min(1.0, up[2]))) < SPILL_ANGLE:
                vessel.tipped = False
                continue
            vessel.tipped = True
            if vessel.countdown > 0:
                vessel.countdown -= 1
                continue
            vessel.countdown = SPAWN_EVERY
            vessel.remaining -= 1
            mouth = sim.get_position(name) + up * (MOUTH_HEIGHT.get(vessel.kind, 0.04) + DROPLET_RADIUS * 1.5)
            droplet = Droplet(f"drop_{name}_{DROPLETS - vessel.remaining}", vessel.liquid, name)
            sim.create_body(
                droplet.name,
                [Shape("sphere", (DROPLET_RADIUS,), rgba=COLORS[vessel.liquid])],
                mass=DROPLET_MASS,
                position=mouth,
                friction=0.3,
            )
            if sim.has_body("robot"):
                sim.set_collision(droplet.name, "robot", False)  # liquid runs past the fingers holding the vessel
            sim.set_velocity(droplet.name, sim.get_velocity(name) + up * 0.1)
            self.droplets.append(droplet)
        flying = {sim.uid(d.name): d for d in self.droplets if d.landed_on is None}
        if not flying:
            return
        ignore = {sim.uid("robot")} if sim.has_body("robot") else set()
        for ua, la, ub, lb, _ in contacts:
            for mine, other, link in ((ua, ub, lb), (ub, ua, la)):
                d = flying.get(mine)
                if d is None or other in ignore or other in flying:
                    continue
                name = sim.name_of(other)
                if name == d.source or name.startswith("drop_"):
                    continue
                d.landed_on, d.landed_link = name, sim.link_name_of(other, link)
                del flying[mine]
                break


def _up_axis(q) -> np.ndarray:
    x, y, z, w = q
    return np.array([2 * (x * z + w * y), 2 * (y * z - w * x), 1 - 2 * (x * x + y * y)])
