"""The Franka Panda and its motion primitives: Cartesian moves by IK + joint position control, suction-style grasp.

Grasping is Ravens-style: when the gripper is at an object's grasp point the fingers close and the object is
rigidly attached to the hand by a constraint, so grasps are reliable and the held object still collides, carries
momentum and exerts contact forces like any body.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np

from envs.sim import Sim

ARM_JOINTS = tuple(f"panda_joint{i}" for i in range(1, 8))
FINGER_JOINTS = ("panda_finger_joint1", "panda_finger_joint2")
EE_LINK = "panda_grasptarget"
HAND_LINK = "panda_hand"
HOME_JOINTS = (0.0, -1.2, 0.0, -2.8, 0.0, 1.65, 0.785)
IK_REST = (0.0, -0.3, 0.0, -2.2, 0.0, 2.0, 0.785)
"""Null-space rest pose for IK: an arm reaching forward over the table, wrist straight down."""
JOINT_MARGIN = 0.1
"""Joint targets stay this far (rad) inside the joint limits."""
MAX_JOINT_SPEED = np.array([2.175, 2.175, 2.175, 2.175, 2.61, 2.61, 2.61])
"""Joint speed limits (rad/s) from the Panda's URDF."""
ARM_FORCES = (87.0, 87.0, 87.0, 87.0, 12.0, 12.0, 12.0)
FINGER_FORCE = 20.0
REACH = 0.85
"""Panda's reach from its shoulder (m); targets further than this are refused as unreachable."""
SHOULDER = np.array([0.0, 0.0, 0.333])

Tick = Callable[[], bool]
"""Advance physics one step (the env also runs the safety monitor there); False means: abort the motion."""


def down_orientation(yaw: float = 0.0, tilt: float = 0.0) -> np.ndarray:
    """Gripper pointing down, turned by ``yaw`` about world z and tipped by ``tilt`` about the axis through its
    fingers (so a held cup pours away from the fingers, not into them)."""
    q_yaw = np.array([0.0, 0.0, math.sin(yaw / 2), math.cos(yaw / 2)])
    q_down = np.array([1.0, 0.0, 0.0, 0.0])
    q_tilt = np.array([0.0, math.sin(tilt / 2), 0.0, math.cos(tilt / 2)])
    return _qmul(_qmul(q_yaw, q_down), q_tilt)


def _qmul(a, b) -> np.ndarray:
    ax, ay, az, aw = a
    bx, by, bz, bw = b
    return np.array(
        [
            aw * bx + ax * bw + ay * bz - az * by,
            aw * by - ax * bz + ay * bw + az * bx,
            aw * bz + ax * by - ay * bx + az * bw,
            aw * bw - ax * bx - ay * by - az * bz,
        ]
    )


def quat_conjugate(q) -> np.ndarray:
    return np.array([-q[0], -q[1], -q[2], q[3]])


def quat_rotate(q, v) -> np.ndarray:
    """Rotate vector ``v`` by unit quaternion ``q`` (x, y, z, w)."""
    qv = np.array([v[0], v[1], v[2], 0.0])
    return _qmul(_qmul(np.asarray(q, float), qv), quat_conjugate(q))[:3]


def reachable(point) -> bool:
    return bool(np.linalg.norm(np.asarray(point, dtype=float) - SHOULDER) <= REACH)


class PandaArm:
    """A Panda fixed at the origin of the table, driven through :class:`Sim` by name."""

    name = "robot"

    def __init__(self, sim: Sim) -> None:
        self.sim = sim
        sim.load_urdf(self.name, "franka_panda/panda.urdf", (0.0, 0.0, 0.0), fixed=True)
        self.arm = sim.joint_indices(self.name, ARM_JOINTS)
        self.fingers = sim.joint_indices(self.name, FINGER_JOINTS)
        self.lower, self.upper = sim.joint_limits(self.name, self.arm)
        self.held: str | None = None
        self._target = np.array(HOME_JOINTS)
        self.reset()

    # ------------------------------------------------------------------ state
    def reset(self) -> None:
        self.release()
        self.sim.reset_joints(self.name, self.arm, HOME_JOINTS)
        self.sim.reset_joints(self.name, self.fingers, (0.04, 0.04))
        self._target = np.array(HOME_JOINTS)
        self._finger_target = 0.04
        self._command()

    def ee_position(self) -> np.ndarray:
        return self.sim.get_link_pose(self.name, EE_LINK)[0]

    def ee_orientation(self) -> np.ndarray:
        return self.sim.get_link_pose(self.name, EE_LINK)[1]

    def joint_angles(self) -> np.ndarray:
        return self.sim.get_joint_angles(self.name, self.arm + self.fingers)

    # ------------------------------------------------------------------ control
    def _command(self) -> None:
        self.sim.set_joint_targets(self.name, self.arm, self._target, ARM_FORCES)
        self.sim.set_joint_targets(
            self.name, self.fingers, (self._finger_target, self._finger_target), (FINGER_FORCE, FINGER_FORCE)
        )

    def set_ee_target(self, position, orientation) -> None:
        rest = list(IK_REST) + [0.04, 0.04]
        lower = list(self.lower) + [0.0, 0.0]
        upper = list(self.upper) + [0.04, 0.04]
        angles = self.sim.inverse_kinematics(self.name, EE_LINK, position, orientation, lower, upper, rest)
        # Respect the Panda's joint speed limits: an IK solution that jumps is followed at most this fast.
        step = MAX_JOINT_SPEED * self.sim.timestep
        # stay clear of the joint stops: a motor driven into one bounces off it, and the gripper jerks
        wanted = np.clip(angles[:7], self.lower + JOINT_MARGIN, self.upper - JOINT_MARGIN)
        self._target = self._target + np.clip(wanted - self._target, -step, step)
        self._command()

    def move(
        self,
        tick: Tick,
        position,
        orientation,
        speed: float,
        settle_steps: int = 40,
        tolerance: float = 0.006,
    ) -> bool:
        """Move the gripper along a straight line to ``position`` at ``speed`` (m/s), turning to ``orientation``.

        Returns False if ``tick`` asked to abort. The last waypoint is held for up to ``settle_steps`` physics
        steps, until the gripper is within ``tolerance`` of it.
        """
        start = self.ee_position()
        start_q = self.ee_orientation()
        goal = np.asarray(position, dtype=float)
        goal_q = np.asarray(orientation, dtype=float)
        if np.dot(start_q, goal_q) < 0:
            goal_q = -goal_q
        distance = float(np.linalg.norm(goal - start))
        angle = 2 * math.acos(min(1.0, abs(float(np.dot(start_q, goal_q)))))
        n = max(1, math.ceil(distance / (speed * self.sim.timestep)), math.ceil(angle / (2.0 * self.sim.timestep)))
        for i in range(1, n + 1):
            s = i / n
            q = (1 - s) * start_q + s * goal_q
            self.set_ee_target(start + s * (goal - start), q / np.linalg.norm(q))
            if not tick():
                return False
        for _ in range(settle_steps):
            if np.linalg.norm(self.ee_position() - goal) < tolerance:
                break
            self.set_ee_target(goal, goal_q)
            if not tick():
                return False
        return True

    def wait(self, tick: Tick, steps: int) -> bool:
        return all(tick() for _ in range(steps))

    def set_fingers(self, opening: float) -> None:
        self._finger_target = float(np.clip(opening, 0.0, 0.04))
        self._command()

    def grasp(self, tick: Tick, body: str) -> bool:
        """Attach ``body`` to the hand where it is (suction-style: the fingers stay open, so they never
        squeeze an object into the table)."""
        if self.held is not None:
            raise RuntimeError(f"already holding {self.held!r}")
        ok = self.wait(tick, 4)
        self.sim.attach("grasp", self.name, HAND_LINK, body)
        self.held = body
        return ok

    def release(self) -> None:
        self.sim.detach("grasp")
        self.held = None
        self._finger_target = 0.04
        if hasattr(self, "arm"):
            self._command()
