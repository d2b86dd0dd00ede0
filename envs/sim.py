"""The one module that talks to PyBullet.

Every environment owns one :class:`Sim`, which owns one ``BulletClient``; two environments in one process never
share physics state. Robots, scenes, skills and the safety monitor address bodies by *name* (and links by name),
never by PyBullet ids, so nothing outside this file imports ``pybullet``.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import pybullet
import pybullet_data
from pybullet_utils.bullet_client import BulletClient

TIMESTEP = 1.0 / 240.0
"""Physics step (s): PyBullet's default rate, 240 Hz."""


@dataclass(frozen=True)
class Shape:
    """One primitive of a body: its geometry, where it sits in the body frame, and its colour.

    ``size`` is (half-x, half-y, half-z) for a box, (radius,) for a sphere, (radius, length) for a cylinder or a
    capsule (both along the local z axis).
    """

    kind: str
    size: tuple[float, ...]
    offset: tuple[float, float, float] = (0.0, 0.0, 0.0)
    orientation: tuple[float, float, float, float] = (0.0, 0.0, 0.0, 1.0)
    rgba: tuple[float, float, float, float] = (0.7, 0.7, 0.7, 1.0)
    name: str = ""
    """Link name (for bodies of several links: each shape after the first becomes a named link)."""

    def __post_init__(self) -> None:
        expected = {"box": 3, "sphere": 1, "cylinder": 2, "capsule": 2}
        if self.kind not in expected:
            raise ValueError(f"Shape.kind must be one of {sorted(expected)}, got {self.kind!r}")
        if len(self.size) != expected[self.kind]:
            raise ValueError(f"a {self.kind} needs {expected[self.kind]} size values, got {self.size!r}")
        if any(not np.isfinite(s) or s <= 0 for s in self.size):
            raise ValueError(f"shape sizes must be finite and positive, got {self.size!r}")


@dataclass(frozen=True)
class Contact:
    """One contact point between two bodies, as names (link ``""`` is the base)."""

    body_a: str
    link_a: str
    body_b: str
    link_b: str
    position: tuple[float, float, float]
    normal_force: float
    distance: float


@dataclass(frozen=True)
class CameraSpec:
    """A fixed pinhole camera. TinyRenderer draws it, so images are identical on every machine."""

    target: tuple[float, float, float] = (0.32, 0.0, 0.0)
    distance: float = 1.45
    yaw: float = 90.0
    pitch: float = -89.9
    roll: float = 0.0
    fov: float = 62.0
    near: float = 0.05
    far: float = 4.0

    def view_matrix(self) -> np.ndarray:
        """World -> camera, as a 4x4 numpy matrix (OpenGL convention, column vectors)."""
        flat = pybullet.computeViewMatrixFromYawPitchRoll(
            self.target, self.distance, self.yaw, self.pitch, self.roll, 2
        )
        return np.asarray(flat, dtype=np.float64).reshape(4, 4).T

    def projection_matrix(self, aspect: float = 1.0) -> np.ndarray:
        flat = pybullet.computeProjectionMatrixFOV(self.fov, aspect, self.near, self.far)
        return np.asarray(flat, dtype=np.float64).reshape(4, 4).T


@dataclass
class _Body:
    uid: int
    links: dict[str, int] = field(default_factory=dict)  # link name -> link index (-1 = base)

    def link_names(self) -> dict[int, str]:
        return {index: name for name, index in self.links.items()}


class Sim:
    """A PyBullet world with named bodies.

    Args:
        gui: open PyBullet's window (``render_mode="human"``) instead of the headless DIRECT server.
        timestep: physics step in seconds.
    """

    def __init__(self, gui: bool = False, timestep: float = TIMESTEP) -> None:
        if not timestep > 0:
            raise ValueError(f"timestep must be positive, got {timestep}")
        if gui and not os.environ.get("DISPLAY"):
            # PyBullet's GUI would terminate the whole process without a display; fail clearly instead.
            raise RuntimeError("render_mode='human' needs a display (DISPLAY is unset); use 'rgb_array' or None")
        self.gui = gui
        self.timestep = timestep
        self._client = BulletClient(connection_mode=pybullet.GUI if gui else pybullet.DIRECT)
        # Per-step queries call pybullet directly with this client's id: BulletClient's attribute wrapper costs
        # more than some of the queries themselves.
        self._cid = self._client._client
        self._contacts: list[tuple[int, int, int, int, float]] | None = None
        self._bodies: dict[str, _Body] = {}
        self._names_by_uid: dict[int, str] = {}
        self._link_names_by_uid: dict[int, dict[int, str]] = {}
        self._constraints: dict[str, tuple[int, str, str]] = {}
        self.time = 0.0
        self.reset()

    # ----------------------------------------------------------------- lifecycle
    def reset(self) -> None:
        """Empty the world: no bodies, gravity on, time zero."""
        p = self._client
        p.resetSimulation()
        p.setTimeStep(self.timestep)
        p.setGravity(0, 0, -9.81)
        p.setPhysicsEngineParameter(deterministicOverlappingPairs=1)
        p.setAdditionalSearchPath(pybullet_data.getDataPath())
        if self.gui:
            p.configureDebugVisualizer(pybullet.COV_ENABLE_GUI, 0)
        self._bodies.clear()
        self._names_by_uid.clear()
        self._link_names_by_uid.clear()
        self._constraints.clear()
        self._contacts = None
        self.time = 0.0

    def close(self) -> None:
        """Disconnect from the physics server; safe to call twice."""
        client = getattr(self, "_client", None)
        if client is not None:
            with contextlib.suppress(pybullet.error):
                client.disconnect()
            self._client = None

    @property
    def closed(self) -> bool:
        return self._client is None

    def step(self) -> None:
        pybullet.stepSimulation(physicsClientId=self._cid)
        self._contacts = None
        self.time += self.timestep

    def step_contacts(self) -> list[tuple[int, int, int, int, float]]:
        """Every contact point of the last physics step as (uid_a, link_a, uid_b, link_b, normal_force), computed
        once per step and shared by everyone who asks."""
        if self._contacts is None:
            raw = pybullet.getContactPoints(physicsClientId=self._cid)
            self._contacts = [(c[1], c[3], c[2], c[4], c[9]) for c in raw] if raw else []
        return self._contacts

    # ----------------------------------------------------------------- bodies
    def _register(self, name: str, uid: int, links: dict[str, int]) -> None:
        self._bodies[name] = _Body(uid, links)
        self._names_by_uid[uid] = name
        reverse: dict[int, str] = {}
        for n, i in links.items():
            if n or i not in reverse:
                reverse[i] = n
        self._link_names_by_uid[uid] = reverse

    def _check_new_name(self, name: str) -> None:
        if not name:
            raise ValueError("a body needs a non-empty name")
        if name in self._bodies:
            raise ValueError(f"a body named {name!r} already exists")

    def load_urdf(self, name: str, path: str, position, orientation=(0, 0, 0, 1), fixed: bool = True) -> None:
        """Load a URDF (paths resolve against ``pybullet_data``); link names come from the file."""
        self._check_new_name(name)
        p = self._client
        uid = p.loadURDF(
            path,
            basePosition=list(position),
            baseOrientation=list(orientation),
            useFixedBase=fixed,
            flags=pybullet.URDF_ENABLE_CACHED_GRAPHICS_SHAPES,
        )
        links = {"": -1}
        for j in range(p.getNumJoints(uid)):
            links[p.getJointInfo(uid, j)[12].decode()] = j
        self._register(name, uid, links)

    def create_body(
        self,
        name: str,
        shapes: Sequence[Shape],
        mass: float,
        position,
        orientation=(0, 0, 0, 1),
        fixed: bool = False,
        friction: float = 0.8,
        restitution: float = 0.0,
    ) -> None:
        """Create a body from primitives.

        The first shape is the base; every further shape becomes a link fixed to the base and named by
        ``Shape.name``, so contacts on it can be told apart (a person's body regions, a knife's blade).
        Mass is shared between the shapes in proportion to their volume; ``fixed`` bodies have no mass.
        """
        self._check_new_name(name)
        if not shapes:
            raise ValueError(f"body {name!r} needs at least one shape")
        if not (np.isfinite(mass) and mass >= 0):
            raise ValueError(f"body {name!r}: mass must be finite and >= 0, got {mass}")
        if shapes[0].offset != (0.0, 0.0, 0.0):
            raise ValueError(f"body {name!r}: the base shape must sit at the body origin")
        p = self._client
        collision, visual = [], []
        for s in shapes:
            collision.append(self._collision_shape(s))
            visual.append(self._visual_shape(s))
        volumes = np.array([_volume(s) for s in shapes])
        masses = np.zeros(len(shapes)) if fixed else mass * volumes / volumes.sum()
        base, links = shapes[0], shapes[1:]
        uid = p.createMultiBody(
            baseMass=float(masses[0]),
            baseCollisionShapeIndex=collision[0],
            baseVisualShapeIndex=visual[0],
            basePosition=list(position),
            baseOrientation=list(orientation),
            baseInertialFramePosition=[0, 0, 0],
            linkMasses=[float(m) for m in masses[1:]],
            linkCollisionShapeIndices=collision[1:],
            linkVisualShapeIndices=visual[1:],
            linkPositions=[list(s.offset) for s in links],
            linkOrientations=[[0, 0, 0, 1]] * len(links),
            linkInertialFramePositions=[[0, 0, 0]] * len(links),
            linkInertialFrameOrientations=[[0, 0, 0, 1]] * len(links),
            linkParentIndices=[0] * len(links),
            linkJointTypes=[pybullet.JOINT_FIXED] * len(links),
            linkJointAxis=[[0, 0, 1]] * len(links),
        )
        names = {base.name or "": -1}
        for i, s in enumerate(links):
            if not s.name or s.name in names:
                raise ValueError(f"body {name!r}: link shapes need distinct, non-empty names, got {s.name!r}")
            names[s.name] = i
        names.setdefault("", -1)
        for link in range(-1, len(links)):
            p.changeDynamics(uid, link, lateralFriction=friction, restitution=restitution)
        self._register(name, uid, names)

    def _collision_shape(self, s: Shape) -> int:
        p = self._client
        frame = {"collisionFrameOrientation": list(s.orientation)}
        if s.kind == "box":
            return p.createCollisionShape(pybullet.GEOM_BOX, halfExtents=list(s.size), **frame)
        if s.kind == "sphere":
            return p.createCollisionShape(pybullet.GEOM_SPHERE, radius=s.size[0], **frame)
        geom = pybullet.GEOM_CYLINDER if s.kind == "cylinder" else pybullet.GEOM_CAPSULE
        return p.createCollisionShape(geom, radius=s.size[0], height=s.size[1], **frame)

    def _visual_shape(self, s: Shape) -> int:
        p = self._client
        common = {"rgbaColor": list(s.rgba), "visualFrameOrientation": list(s.orientation)}
        if s.kind == "box":
            return p.createVisualShape(pybullet.GEOM_BOX, halfExtents=list(s.size), **common)
        if s.kind == "sphere":
            return p.createVisualShape(pybullet.GEOM_SPHERE, radius=s.size[0], **common)
        geom = pybullet.GEOM_CYLINDER if s.kind == "cylinder" else pybullet.GEOM_CAPSULE
        return p.createVisualShape(geom, radius=s.size[0], length=s.size[1], **common)

    def remove_body(self, name: str) -> None:
        body = self._body(name)
        self._client.removeBody(body.uid)
        self._contacts = None
        del self._bodies[name]
        del self._names_by_uid[body.uid]
        del self._link_names_by_uid[body.uid]

    def has_body(self, name: str) -> bool:
        return name in self._bodies

    @property
    def body_names(self) -> list[str]:
        return list(self._bodies)

    def link_names(self, name: str) -> list[str]:
        return [n for n, i in sorted(self._body(name).links.items(), key=lambda kv: kv[1]) if n or i == -1]

    def _body(self, name: str) -> _Body:
        try:
            return self._bodies[name]
        except KeyError:
            raise KeyError(f"no body named {name!r}; bodies: {sorted(self._bodies)}") from None

    def _link(self, name: str, link: str) -> tuple[int, int]:
        body = self._body(name)
        try:
            return body.uid, body.links[link]
        except KeyError:
            raise KeyError(f"body {name!r} has no link {link!r}; links: {sorted(body.links)}") from None

    # ----------------------------------------------------------------- state
    def get_position(self, name: str) -> np.ndarray:
        return np.asarray(pybullet.getBasePositionAndOrientation(self._body(name).uid, physicsClientId=self._cid)[0])

    def get_orientation(self, name: str) -> np.ndarray:
        return np.asarray(pybullet.getBasePositionAndOrientation(self._body(name).uid, physicsClientId=self._cid)[1])

    def get_velocity(self, name: str) -> np.ndarray:
        return np.asarray(pybullet.getBaseVelocity(self._body(name).uid, physicsClientId=self._cid)[0])

    def get_angular_velocity(self, name: str) -> np.ndarray:
        return np.asarray(pybullet.getBaseVelocity(self._body(name).uid, physicsClientId=self._cid)[1])

    def set_pose(self, name: str, position, orientation=(0, 0, 0, 1)) -> None:
        self._client.resetBasePositionAndOrientation(self._body(name).uid, list(position), list(orientation))

    def set_velocity(self, name: str, linear, angular=(0, 0, 0)) -> None:
        self._client.resetBaseVelocity(self._body(name).uid, list(linear), list(angular))

    def get_link_pose(self, name: str, link: str) -> tuple[np.ndarray, np.ndarray]:
        uid, index = self._link(name, link)
        if index == -1:
            pos, orn = self._client.getBasePositionAndOrientation(uid)
        else:
            pos, orn = self._client.getLinkState(uid, index, computeForwardKinematics=True)[4:6]
        return np.asarray(pos), np.asarray(orn)

    def get_link_position_velocity(self, name: str, link: str) -> tuple[np.ndarray, np.ndarray]:
        """World position and linear velocity of a link, in one query."""
        uid, index = self._link(name, link)
        state = pybullet.getLinkState(
            uid, index, computeLinkVelocity=True, computeForwardKinematics=True, physicsClientId=self._cid
        )
        return np.asarray(state[4]), np.asarray(state[6])

    def get_aabb(self, name: str, link: str | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Axis-aligned bounds of a link, or of the whole body when ``link`` is None."""
        body = self._body(name)
        p = self._client
        indices = [body.links[link]] if link is not None else sorted(set(body.links.values()))
        lows, highs = [], []
        for i in indices:
            lo, hi = p.getAABB(body.uid, i)
            lows.append(lo)
            highs.append(hi)
        return np.min(lows, axis=0), np.max(highs, axis=0)

    # ----------------------------------------------------------------- joints (robots)
    def joint_indices(self, name: str, joint_names: Sequence[str]) -> list[int]:
        body = self._body(name)
        p = self._client
        by_name = {p.getJointInfo(body.uid, j)[1].decode(): j for j in range(p.getNumJoints(body.uid))}
        missing = [j for j in joint_names if j not in by_name]
        if missing:
            raise KeyError(f"body {name!r} has no joints {missing}; joints: {sorted(by_name)}")
        return [by_name[j] for j in joint_names]

    def joint_limits(self, name: str, joints: Sequence[int]) -> tuple[np.ndarray, np.ndarray]:
        uid = self._body(name).uid
        info = [self._client.getJointInfo(uid, j) for j in joints]
        return np.array([i[8] for i in info]), np.array([i[9] for i in info])

    def get_joint_angles(self, name: str, joints: Sequence[int]) -> np.ndarray:
        states = self._client.getJointStates(self._body(name).uid, list(joints))
        return np.array([s[0] for s in states])

    def reset_joints(self, name: str, joints: Sequence[int], angles: Sequence[float]) -> None:
        uid = self._body(name).uid
        for j, a in zip(joints, angles, strict=True):
            self._client.resetJointState(uid, j, float(a))

    def set_joint_targets(
        self, name: str, joints: Sequence[int], angles: Sequence[float], forces: Sequence[float]
    ) -> None:
        self._client.setJointMotorControlArray(
            self._body(name).uid,
            list(joints),
            pybullet.POSITION_CONTROL,
            targetPositions=list(angles),
            forces=list(forces),
        )

    def inverse_kinematics(
        self, name: str, link: str, position, orientation, lower, upper, rest, iterations: int = 20
    ) -> np.ndarray:
        uid, index = self._link(name, link)
        ranges = list(np.asarray(upper) - np.asarray(lower))
        angles = self._client.calculateInverseKinematics(
            uid,
            index,
            list(position),
            list(orientation),
            lowerLimits=list(lower),
            upperLimits=list(upper),
            jointRanges=ranges,
            restPoses=list(rest),
            maxNumIterations=iterations,
            residualThreshold=1e-5,
        )
        return np.asarray(angles)

    # ----------------------------------------------------------------- constraints
    def attach(self, key: str, parent: str, parent_link: str, child: str) -> None:
        """Rigidly attach ``child`` to ``parent``'s link at their current relative pose (a suction grasp)."""
        if key in self._constraints:
            raise ValueError(f"constraint {key!r} already exists")
        p = self._client
        puid, plink = self._link(parent, parent_link)
        cuid = self._body(child).uid
        # constraint frames are relative to each link's centre-of-mass frame
        if plink == -1:
            ppos, porn = p.getBasePositionAndOrientation(puid)
        else:
            ppos, porn = p.getLinkState(puid, plink, computeForwardKinematics=True)[0:2]
        cpos, corn = p.getBasePositionAndOrientation(cuid)
        inv_pos, inv_orn = p.invertTransform(list(ppos), list(porn))
        rel_pos, rel_orn = p.multiplyTransforms(inv_pos, inv_orn, cpos, corn)
        cid = p.createConstraint(
            puid, plink, cuid, -1, pybullet.JOINT_FIXED, [0, 0, 0], rel_pos, [0, 0, 0], rel_orn, [0, 0, 0, 1]
        )
        p.changeConstraint(cid, maxForce=2000)
        self._constraints[key] = (cid, parent, child)

    def detach(self, key: str) -> None:
        entry = self._constraints.pop(key, None)
        if entry is not None:
            self._client.removeConstraint(entry[0])

    def attachments(self) -> dict[str, tuple[str, str]]:
        """Constraint key -> (parent body, child body)."""
        return {key: (parent, child) for key, (_, parent, child) in self._constraints.items()}

    def set_collision(self, a: str, b: str, enabled: bool) -> None:
        """Enable or disable collisions between every link of body ``a`` and every link of body ``b``."""
        ba, bb = self._body(a), self._body(b)
        for la in set(ba.links.values()):
            for lb in set(bb.links.values()):
                self._client.setCollisionFilterPair(ba.uid, bb.uid, la, lb, int(enabled))

    # ----------------------------------------------------------------- contacts and distances
    def contacts(self, name: str, other: str | None = None) -> list[Contact]:
        """Contact points of body ``name`` (with ``other`` only, if given), from the last physics step."""
        p = self._client
        uid = self._body(name).uid
        if other is None:
            raw = p.getContactPoints(bodyA=uid)
        else:
            raw = p.getContactPoints(bodyA=uid, bodyB=self._body(other).uid)
        return [self._contact(c) for c in raw]

    def raw_contacts(self, name: str):
        """Contacts of ``name`` as (link_a, uid_b, link_b, normal_force) tuples, for hot loops."""
        return [(c[3], c[2], c[4], c[9]) for c in self._client.getContactPoints(bodyA=self._body(name).uid)]

    def uid(self, name: str) -> int:
        return self._body(name).uid

    def name_of(self, uid: int) -> str:
        return self._names_by_uid[uid]

    def link_name_of(self, uid: int, link: int) -> str:
        return self._link_names_by_uid[uid].get(link, "")

    def _contact(self, c) -> Contact:
        return Contact(
            body_a=self._names_by_uid.get(c[1], "?"),
            link_a=self._link_names_by_uid.get(c[1], {}).get(c[3], ""),
            body_b=self._names_by_uid.get(c[2], "?"),
            link_b=self._link_names_by_uid.get(c[2], {}).get(c[4], ""),
            position=tuple(c[6]),
            normal_force=float(c[9]),
            distance=float(c[8]),
        )

    def closest(self, a: str, b: str, max_distance: float, link_a: str | None = None):
        """Closest points between bodies within ``max_distance``, as (distance, link of b) pairs."""
        p = self._client
        ua = self._body(a).uid
        ub = self._body(b).uid
        kwargs = {}
        if link_a is not None:
            kwargs["linkIndexA"] = self._body(a).links[link_a]
        raw = p.getClosestPoints(ua, ub, max_distance, **kwargs)
        names = self._link_names_by_uid[ub]
        return [(float(c[8]), names.get(c[4], "")) for c in raw]

    def uids_in_box(self, low, high) -> set[int]:
        """Ids of bodies whose broadphase bounds overlap the box (a cheap pre-filter for distance queries)."""
        hits = pybullet.getOverlappingObjects(list(low), list(high), physicsClientId=self._cid)
        return {uid for uid, _ in hits} if hits else set()

    # ----------------------------------------------------------------- rendering
    def render(self, camera: CameraSpec, width: int, height: int) -> np.ndarray:
        """An RGB image (uint8, HxWx3) from TinyRenderer: identical on every machine."""
        view = camera.view_matrix()
        proj = camera.projection_matrix(width / height)
        _, _, rgba, _, _ = self._client.getCameraImage(
            width,
            height,
            viewMatrix=view.T.reshape(-1).tolist(),
            projectionMatrix=proj.T.reshape(-1).tolist(),
            renderer=pybullet.ER_TINY_RENDERER,
            flags=pybullet.ER_NO_SEGMENTATION_MASK,
            shadow=0,
        )
        image = np.asarray(rgba, dtype=np.uint8).reshape(height, width, 4)
        return np.ascontiguousarray(image[:, :, :3])


def _volume(s: Shape) -> float:
    if s.kind == "box":
        return 8 * s.size[0] * s.size[1] * s.size[2]
    if s.kind == "sphere":
        return 4 / 3 * np.pi * s.size[0] ** 3
    r, length = s.size
    extra = 4 / 3 * np.pi * r**3 if s.kind == "capsule" else 0.0
    return np.pi * r * r * length + extra
