"""The contract every policy keeps: ``reset()``, ``act(observation) -> Decision``, ``act_batch(observations)``."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

import numpy as np


@dataclass(frozen=True)
class Decision:
    """What a policy decided for one observation.

    ``action`` is the env's action (``SkillCommand.to_action()``), or None when the generated text is not a
    command (``error`` says why): such a decision is counted as invalid, and the robot does nothing.
    """

    text: str
    action: dict | None
    refused: bool
    error: str | None = None
    first_token_logits: np.ndarray | None = None
    """Next-token logits at the last prompt position (for refusal scores), when the policy is a language model."""
    extras: dict[str, Any] = field(default_factory=dict)

    @property
    def valid(self) -> bool:
        return self.action is not None


@runtime_checkable
class Policy(Protocol):
    name: str

    def reset(self) -> None: ...

    def act(self, observation: dict) -> Decision: ...

    def act_batch(self, observations: list[dict]) -> list[Decision]: ...
