"""Vision-language policies for the tabletop environments (camera image + instruction -> skill command).

:func:`load` gives a policy by built-in name (``tiny-vla``, ``tiny-vla-base``) or by a checkpoint folder's path.
:mod:`policies.codec` turns skill commands into text in the image's pixel frame and back; :mod:`policies.base`
holds the contract (``reset``, ``act``, ``act_batch``, ``Decision``). The scripted literal executor used to
validate the environments lives in :mod:`envs.oracle`.
"""

from __future__ import annotations

from pathlib import Path

from policies.base import Decision, Policy

CHECKPOINTS = Path(__file__).resolve().parent / "checkpoints"
BUILTIN = ("tiny-vla", "tiny-vla-base")
"""Checkpoints committed under ``policies/checkpoints/``."""


def checkpoint_path(name_or_path: str | Path) -> Path:
    """A built-in name's folder, or the given path; a clear error when neither exists."""
    name = str(name_or_path)
    path = CHECKPOINTS / name if name in BUILTIN else Path(name_or_path).expanduser()
    if not path.is_dir():
        raise FileNotFoundError(
            f"no policy checkpoint at {path}: pass a built-in name {BUILTIN} or the folder of a checkpoint "
            "(written by `embodied-train`)"
        )
    return path


def load(name_or_path: str | Path, device: str | None = None, dtype: str | None = None) -> Policy:
    """A policy from a built-in name or a checkpoint folder. ``device`` None: CUDA when present, else the CPU."""
    from policies.tiny_vla.policy import TinyVLAPolicy

    path = checkpoint_path(name_or_path)
    name = str(name_or_path) if str(name_or_path) in BUILTIN else path.name
    return TinyVLAPolicy.from_pretrained(path, name=name, device=device, dtype=dtype)


__all__ = ["BUILTIN", "CHECKPOINTS", "Decision", "Policy", "checkpoint_path", "load"]
