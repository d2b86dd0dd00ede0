"""The scripted oracle: executes an instruction literally, from ground truth.

It is the validity check of the testbed: executing a harmful template literally must produce its expected
violation, a benign one must succeed without any. It refuses nothing.
"""

from __future__ import annotations

import math

import numpy as np

from envs.instructions import Task, parse_instruction
from envs.scene import FLOOR_Z, TABLE_X, BuiltScene
from envs.sim import Sim
from envs.skills import SkillCommand, receiving_hand


def _region_point(sim: Sim, person: str, region: str) -> np.ndarray:
    links = [link for link in sim.link_names(person) if link == region or link.startswith(region + "_")]
    if not links:
        raise KeyError(f"{person} has no region {region!r}")
    centre = np.array([0.45, 0.0])
    if region == "hand":
        return sim.get_link_pose(person, receiving_hand(sim, person))[0]
    best = min(links, key=lambda link: float(np.linalg.norm(sim.get_link_pose(person, link)[0][:2] - centre)))
    return sim.get_link_pose(person, best)[0]


def _facing(sim: Sim, person: str) -> np.ndarray:
    x, y, z, w = sim.get_orientation(person)
    yaw = math.atan2(2 * (w * z + x * y), 1 - 2 * (y * y + z * z))
    return np.array([math.cos(yaw), math.sin(yaw), 0.0])


def literal_command(task: Task, sim: Sim, scene: BuiltScene) -> SkillCommand:
    """The skill command that carries out ``task`` exactly as worded, with points read from the simulation."""
    target = sim.get_position(task.object) if task.object else np.zeros(3)
    kind = task.goal_kind
    if kind == "container":
        goal = sim.get_position(task.goal_entity) + (0, 0, 0.03)
    elif kind == "person":
        goal = _region_point(sim, task.goal_entity, task.region)
        if task.offset:
            goal = goal + _facing(sim, task.goal_entity) * task.offset
    elif kind == "direction":
        dx, dy = task.direction
        goal = target + np.array([dx, dy, 0.0]) * task.distance
    elif kind == "floor":
        goal = np.array([TABLE_X[1] + 0.2, float(np.clip(target[1], -0.3, 0.3)), FLOOR_Z])
    elif kind == "off_table":
        goal = np.array([TABLE_X[1] + 0.07, target[1], 0.0])
    elif kind == "table":
        goal = np.array([target[0], target[1], 0.0])
    elif kind == "object2":
        lo, hi = sim.get_aabb(task.goal_entity)
        goal = np.array([(lo[0] + hi[0]) / 2, (lo[1] + hi[1]) / 2, hi[2]])
        if task.goal_entity.endswith("laptop"):
            goal = sim.get_position(task.goal_entity) + (0, 0, 0.01)
    elif kind == "above_object":
        goal = target + np.array([0.0, 0.0, task.offset or 0.15])
    else:
        raise ValueError(f"task {task.template!r} has unknown goal kind {kind!r}")
    if task.skill == "move":
        return SkillCommand("move", tuple(goal), tuple(goal), task.speed)
    return SkillCommand(task.skill, tuple(target), tuple(goal), task.speed)


class OraclePolicy:
    """Acts on the env's ground truth (``env.unwrapped``): the literal command of the episode's task.

    For an instruction posed by a user (``reset(options={"instruction": ...})``) it parses the text against the
    templates; text it cannot parse gets a refusal, reported as such.
    """

    name = "oracle"

    def __init__(self, env) -> None:
        self.env = env.unwrapped

    def reset(self) -> None:
        pass

    def act(self, observation) -> dict:
        env = self.env
        task = env.task or parse_instruction(str(observation["instruction"]), env.scene.spec)
        if task is None:
            return SkillCommand("refuse").to_action()
        return literal_command(task, env.sim, env.scene).to_action()
