"""Simulation speed: bare physics vs physics + safety monitor on the same scene, then whole skill steps.

Prints, in one run: bare ``stepSimulation`` steps/s, steps/s with the safety monitor (and the liquid model) run
every step, their ratio (target: the monitor costs <= 15%), skill-steps/s and episodes/s with rendering at the
default image size (scripted oracle, every template in turn).

    python bench/env_speed.py [--steps 4000] [--episodes 44]
"""

from __future__ import annotations

import argparse
import math
import platform
import time

import numpy as np

from envs.instructions import templates
from envs.liquids import Liquids
from envs.oracle import OraclePolicy
from envs.robot import HOME_JOINTS, PandaArm
from envs.safety import SafetyMonitor
from envs.scene import ObjectSpec, PersonSpec, SceneSpec, build_scene, build_static
from envs.sim import Sim
from envs.tabletop import TabletopEnv

SCENE = SceneSpec(
    objects=(
        ObjectSpec("knife", "red", 0.35, 0.12),
        ObjectSpec("glass", "blue", 0.50, -0.15),
        ObjectSpec("mug", "white", 0.55, 0.05),
        ObjectSpec("laptop", "black", 0.40, -0.05),
        ObjectSpec("cube", "green", 0.32, -0.2),
    ),
    people=(PersonSpec("adult", "left_far"), PersonSpec("child", "right_near")),
)


def physics_rate(steps: int, with_monitor: bool) -> float:
    sim = Sim()
    try:
        build_static(sim)
        arm = PandaArm(sim)
        scene = build_scene(sim, SCENE)
        liquids = Liquids.for_scene(scene.objects)
        monitor = SafetyMonitor(sim, scene, liquids)
        home = np.array(HOME_JOINTS)
        start = time.perf_counter()
        for i in range(steps):
            if i % 4 == 0:  # the same swinging arm in both runs, so the robot moves near people and objects
                wave = 0.6 * math.sin(i * sim.timestep * 2.0)
                sim.set_joint_targets(
                    arm.name,
                    arm.arm,
                    home + np.array([wave, 0.5 * abs(wave), 0, 0.5 * wave, 0, 0, 0]),
                    [87] * 7,
                )
            sim.step()
            if with_monitor:
                liquids.update(sim)
                monitor.update()
        return steps / (time.perf_counter() - start)
    finally:
        sim.close()


def episode_rate(episodes: int) -> tuple[float, float]:
    env = TabletopEnv()
    policy = OraclePolicy(env)
    ids = [t.id for t in templates()]
    try:
        start = time.perf_counter()
        skill_steps = 0
        for i in range(episodes):
            obs, _ = env.reset(seed=i, options={"template": ids[i % len(ids)], "split": "all"})
            done = False
            while not done:
                obs, _, terminated, truncated, _ = env.step(policy.act(obs))
                skill_steps += 1
                done = terminated or truncated
        elapsed = time.perf_counter() - start
        return skill_steps / elapsed, episodes / elapsed
    finally:
        env.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=4000)
    parser.add_argument("--episodes", type=int, default=44)
    args = parser.parse_args()
    bare = max(physics_rate(args.steps, False) for _ in range(3))
    monitored = max(physics_rate(args.steps, True) for _ in range(3))
    skill_rate, ep_rate = episode_rate(args.episodes)
    print(f"machine: {platform.processor() or platform.machine()}, python {platform.python_version()}")
    print(f"{'bare stepSimulation':32s} {bare:10.0f} steps/s")
    print(f"{'with safety monitor':32s} {monitored:10.0f} steps/s")
    print(
        f"{'monitored / bare':32s} {monitored / bare:10.2f}   (monitor cost {1 - monitored / bare:.0%}; target <= 15%)"
    )
    print(f"{'skill steps (oracle, rendering)':32s} {skill_rate:10.2f} skill-steps/s")
    print(f"{'episodes (oracle, rendering)':32s} {ep_rate:10.2f} episodes/s")


if __name__ == "__main__":
    main()
