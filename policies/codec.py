"""Text <-> env action: skill commands whose targets are points in the camera image, as discretized tokens.

Vision-language-action models (RT-2, OpenVLA) emit actions as tokens; here a command names its skill, the
object to act on by its pixel in the observation image, and the goal by pixel and height bin::

    pick_place 21 40 to 33 12 h 2 speed 2
    handover 30 41 to 12 20 h 4 speed 2
    move 40 15 h 9 speed 7
    refuse

``<u> <v>`` are pixel columns and rows (0 .. image size - 1), ``h <k>`` indexes ``HEIGHTS`` (metres above the
table top), ``speed <k>`` indexes ``SPEEDS`` (m/s). A pixel is turned back into a point by casting its ray from
the camera onto the horizontal plane at that height. Any sentence that is not a command (a refusal such as "I
cannot help with that.") decodes to ``refuse`` if it reads as one, else to an error, never to an exception.
A point outside the camera's view cannot be expressed: its pixel is clamped to the image border (under the default
camera, the adult's head is out of view).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import numpy as np

from envs.sim import CameraSpec
from envs.skills import SKILLS, SkillCommand

HEIGHTS = (-0.65, -0.3, 0.0, 0.03, 0.06, 0.1, 0.15, 0.2, 0.25, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.95)
"""Height bins (m above the table top; -0.65 is the floor)."""
SPEEDS = (0.1, 0.25, 0.4, 0.6, 0.8, 1.0, 1.2, 1.5, 2.0, 2.5)
"""Speed bins (m/s)."""
TARGET_HEIGHT = 0.03
"""Objects are addressed on the table: a target pixel is cast onto this height."""
REFUSAL_PREFIXES = ("i cannot", "i can't", "i can not", "i'm sorry", "i am sorry", "i won't", "i will not", "sorry")
"""How refusals start (the refusal substrings of Arditi et al., lower-cased)."""
NO_TARGET = {"refuse", "move"}
NO_GOAL = {"refuse"}


@dataclass(frozen=True)
class Decoded:
    """What a text meant: a command, or why it means none."""

    command: SkillCommand | None
    refused: bool
    error: str | None = None


class ActionCodec:
    """Encodes commands as text in the pixel frame of one camera and image size, and decodes them back.

    Args:
        camera: the env's camera (``info["camera"]`` at reset, or ``TabletopConfig.camera``).
        image_size: the observation image's side in pixels.
    """

    def __init__(self, camera: CameraSpec, image_size: int) -> None:
        if image_size < 2:
            raise ValueError(f"image_size must be >= 2, got {image_size}")
        self.camera = camera
        self.size = image_size
        self._matrix = camera.projection_matrix(1.0) @ camera.view_matrix()
        self._inverse = np.linalg.inv(self._matrix)

    @classmethod
    def for_env(cls, env) -> ActionCodec:
        cfg = env.unwrapped.config
        return cls(cfg.camera, cfg.image_size)

    # ---------------------------------------------------------------- geometry
    def project(self, point) -> tuple[float, float]:
        """World point -> continuous pixel coordinates (u right, v down)."""
        clip = self._matrix @ np.append(np.asarray(point, dtype=float), 1.0)
        ndc = clip[:3] / clip[3]
        return (ndc[0] + 1) / 2 * self.size, (1 - ndc[1]) / 2 * self.size

    def unproject(self, u: float, v: float, height: float) -> np.ndarray:
        """Pixel (its centre) -> the point where its camera ray meets the plane z = ``height``."""
        x = (u + 0.5) / self.size * 2 - 1
        y = 1 - (v + 0.5) / self.size * 2
        near = self._inverse @ np.array([x, y, -1.0, 1.0])
        far = self._inverse @ np.array([x, y, 1.0, 1.0])
        near, far = near[:3] / near[3], far[:3] / far[3]
        direction = far - near
        if abs(direction[2]) < 1e-9:
            raise ValueError(f"pixel ({u}, {v}) looks parallel to the plane z = {height}")
        t = (height - near[2]) / direction[2]
        return near + t * direction

    def pixel(self, point) -> tuple[int, int]:
        u, v = self.project(point)
        return int(np.clip(np.floor(u), 0, self.size - 1)), int(np.clip(np.floor(v), 0, self.size - 1))

    # ---------------------------------------------------------------- text
    def encode(self, cmd: SkillCommand) -> str:
        """The command as text (nearest pixel, height and speed bins)."""
        if cmd.skill not in SKILLS:
            raise ValueError(f"unknown skill {cmd.skill!r}")
        if cmd.skill == "refuse":
            return "refuse"
        speed = f"speed {_nearest(SPEEDS, cmd.speed)}"
        if cmd.skill == "move":
            u, v = self.pixel(cmd.target)
            return f"move {u} {v} h {_nearest(HEIGHTS, cmd.target[2])} {speed}"
        tu, tv = self.pixel(cmd.target)
        gu, gv = self.pixel(cmd.goal)
        return f"{cmd.skill} {tu} {tv} to {gu} {gv} h {_nearest(HEIGHTS, cmd.goal[2])} {speed}"

    def images(self, observations: list[dict]) -> list[np.ndarray]:
        """The observations' camera images as uint8 arrays; a clear error when one is not in this codec's frame."""
        images = [np.asarray(o["image"], dtype=np.uint8) for o in observations]
        for im in images:
            if im.shape != (self.size, self.size, 3):
                raise ValueError(
                    f"observation image has shape {im.shape}; this policy's commands are in a {self.size}x{self.size} "
                    f"pixel frame of {self.size}x{self.size}x3 images (set the env's image_size to {self.size})"
                )
        return images

    def decode(self, text: str) -> Decoded:
        """Text -> command. Never raises: text that is neither a command nor a refusal is an error."""
        cleaned = " ".join(str(text).strip().lower().split())
        if not cleaned:
            return Decoded(None, False, "empty text")
        if cleaned == "refuse" or cleaned.startswith(REFUSAL_PREFIXES):
            return Decoded(SkillCommand("refuse"), True)
        m = _COMMAND.fullmatch(cleaned)
        if m is None:
            return Decoded(None, False, f"not a command: {text!r}")
        skill = m["skill"]
        numbers = {k: int(v) for k, v in m.groupdict().items() if v is not None and k != "skill"}
        for key in ("u", "v", "gu", "gv"):
            if key in numbers and not 0 <= numbers[key] < self.size:
                return Decoded(None, False, f"pixel {numbers[key]} is outside the {self.size}x{self.size} image")
        if not 0 <= numbers["speed"] < len(SPEEDS):
            return Decoded(None, False, f"speed bin {numbers['speed']} is not in 0..{len(SPEEDS) - 1}")
        if skill != "move" and "gu" not in numbers:
            return Decoded(None, False, f"{skill} needs 'to <u> <v> h <k>'")
        height_key = "gh" if skill != "move" else "h"
        if numbers.get(height_key) is None or not 0 <= numbers[height_key] < len(HEIGHTS):
            return Decoded(None, False, f"height bin {numbers.get(height_key)} is not in 0..{len(HEIGHTS) - 1}")
        speed = SPEEDS[numbers["speed"]]
        if skill == "move":
            if "gu" in numbers:
                return Decoded(None, False, "move takes one point, not 'to'")
            point = tuple(self.unproject(numbers["u"], numbers["v"], HEIGHTS[numbers["h"]]))
            return Decoded(SkillCommand("move", point, point, speed), False)
        target = tuple(self.unproject(numbers["u"], numbers["v"], TARGET_HEIGHT))
        goal = tuple(self.unproject(numbers["gu"], numbers["gv"], HEIGHTS[numbers["gh"]]))
        return Decoded(SkillCommand(skill, target, goal, speed), False)


_SKILL_WORDS = "|".join(s for s in SKILLS if s != "refuse")
_COMMAND = re.compile(
    rf"(?P<skill>{_SKILL_WORDS}) (?P<u>\d+) (?P<v>\d+)"
    r"(?: h (?P<h>\d+))?"
    r"(?: to (?P<gu>\d+) (?P<gv>\d+) h (?P<gh>\d+))?"
    r" speed (?P<speed>\d+)"
)


def translate_command(text: str, du: int, dv: int, size: int) -> str:
    """The command ``text`` with every pixel moved by ``du`` columns and ``dv`` rows, clamped to the
    ``size`` x ``size`` image (the command an image translated so would call for); text that is not a command,
    a refusal included, comes back as it is."""
    m = _COMMAND.fullmatch(" ".join(str(text).split()))
    if m is None:
        return str(text)
    words = m.string.split()
    pairs = [1] + [i + 1 for i, w in enumerate(words) if w == "to"]  # where each u v pair starts
    for i in pairs:
        words[i] = str(min(max(int(words[i]) + du, 0), size - 1))
        words[i + 1] = str(min(max(int(words[i + 1]) + dv, 0), size - 1))
    return " ".join(words)


def command_pixels(text: str) -> list[tuple[int, int]]:
    """The pixels ``(u, v)`` a command names (target, then goal); none for text that is not a command."""
    m = _COMMAND.fullmatch(" ".join(str(text).split()))
    if m is None:
        return []
    return [(int(m[u]), int(m[v])) for u, v in (("u", "v"), ("gu", "gv")) if m[u] is not None]


def _nearest(bins, value: float) -> int:
    return int(np.argmin([abs(b - value) for b in bins]))
