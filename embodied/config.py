"""The run configuration: one dataclass per Hydra config group (``conf/<group>/*.yaml`` hold overrides only).

Registered with Hydra's ConfigStore as ``run_schema``; ``conf/run.yaml`` composes it with the groups. A key that
is not in a dataclass, or a value of the wrong type, fails at composition with Hydra naming it.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from hydra.core.config_store import ConfigStore

from embodied.directions import SelectionConfig
from embodied.extract import PromptConfig
from embodied.loading import PolicyConfig

MODES = ("none", "ablate", "actadd", "orthogonalize")


@dataclass
class EnvConfig:
    image_size: int = 64
    split: str = "test"
    """Instruction split the episodes draw from (train, val, test)."""
    sets: list[str] = field(default_factory=lambda: ["harmful", "benign"])
    """Episode sets (``embodied.evaluation.EVAL_SETS``): harmful, benign, vision, benign_blank."""


@dataclass
class InterventionConfig:
    mode: str = "none"
    """none, ablate (project the direction out everywhere), actadd (add coeff x raw vector at a layer), or
    orthogonalize (edit the weights; same effect as ablate, no hooks)."""
    layer: int | None = None
    """actadd's layer (None: the direction's own)."""
    coeff: float = 1.0
    """actadd's coefficient (negative subtracts the direction)."""


@dataclass
class DirectionConfig:
    path: str | None = None
    """A direction artifact folder (``embodied-extract`` writes one); None: extract for this policy (cached)."""
    layer: int | None = None
    """Use the artifact's candidate at this layer instead of the selected one (layer sweeps)."""
    position: int | None = None
    """... and at this post-instruction position (negative; None: the selected one's)."""
    prompts: PromptConfig = field(default_factory=PromptConfig)
    selection: SelectionConfig = field(default_factory=SelectionConfig)
    cache_dir: str = ".cache/embodied/directions"
    """Relative paths are resolved against the directory the command was started from."""


@dataclass
class ExperimentConfig:
    name: str = "run"
    conditions: list[InterventionConfig] = field(default_factory=list)
    """Interventions one job runs in turn (empty: just ``intervention``), e.g. baseline, ablate, actadd."""
    report: bool = True
    """Write report.md and plots into the run directory at the end."""


@dataclass
class RunConfig:
    policy: PolicyConfig = field(default_factory=PolicyConfig)
    env: EnvConfig = field(default_factory=EnvConfig)
    intervention: InterventionConfig = field(default_factory=InterventionConfig)
    direction: DirectionConfig = field(default_factory=DirectionConfig)
    experiment: ExperimentConfig = field(default_factory=ExperimentConfig)
    episodes: int = 20
    """Episodes per set (and per condition)."""
    seed: int = 7_000_000
    """First episode seed; episode i of a set uses seed + i."""
    batch_size: int = 16
    threads: int | None = 1
    """torch intra-op threads inside the job (None: torch's default)."""
    progress: bool = True
    out: str | None = None
    """Where records go (None: Hydra's job directory)."""


def register() -> None:
    cs = ConfigStore.instance()
    cs.store(name="run_schema", node=RunConfig)
