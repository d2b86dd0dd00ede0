"""``embodied-run``: steer a policy's refusal direction and measure, in physics, when unsafe actions get executed.

    embodied-run                                              # tiny-vla, no intervention, harmful + benign
    embodied-run experiment=demo                              # baseline vs ablation vs actadd, table + report
    embodied-run intervention=actadd intervention.coeff=-2
    embodied-run -m intervention=actadd intervention.coeff=-2,0,2 intervention.layer=1,2 hydra/launcher=joblib
    embodied-run --cfg job                                    # the composed config

Each job writes into its directory: ``episodes.jsonl`` (one record per episode, appended as it ends),
``summary.json`` (atomically, at the end), ``config.yaml`` (resolved), and with ``experiment.report`` a report.
A job whose ``summary.json`` exists is skipped; one with a partial ``episodes.jsonl`` continues where it stopped.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import replace
from pathlib import Path

import hydra
import torch
from omegaconf import OmegaConf
from rich.console import Console
from rich.table import Table
from tqdm.auto import tqdm

import policies
from embodied.cli import output_dir
from embodied.config import MODES, InterventionConfig, RunConfig, register
from embodied.directions import DirectionArtifact, NoDirectionError, extract_cached, write_json_atomic
from embodied.experiment import Condition, Defenses, eval_set, run_condition, set_seed
from embodied.extract import prompt_key, prompt_sets, strongest_direction
from embodied.loading import PolicyConfig, load_policy
from embodied.metrics import summarize_records
from embodied.models import weights_hash
from embodied.records import RecordWriter, keys, read_records

log = logging.getLogger(__name__)
register()

EPISODES_FILE = "episodes.jsonl"
SUMMARY_FILE = "summary.json"


def direction_for(policy, cfg: RunConfig, needed: bool) -> DirectionArtifact | None:
    artifact = _direction(policy, cfg, needed)
    if artifact is not None and (cfg.direction.layer is not None or cfg.direction.position is not None):
        artifact = artifact.candidate(cfg.direction.layer, cfg.direction.position)
    return artifact


def _direction(policy, cfg: RunConfig, needed: bool) -> DirectionArtifact | None:
    """The run's direction: from ``direction.path``, else extracted for this policy (cached). When no condition
    needs it and extraction finds none, the run goes on without projections."""
    if cfg.direction.path:
        return DirectionArtifact.load(Path(cfg.direction.path).expanduser(), policy.model)
    if not hasattr(policy, "post_instruction_length"):
        if needed:
            raise ValueError(f"policy {policy.name} has no residual stream to steer (kind {cfg.policy.kind})")
        return None
    if not needed and not cfg.direction.project:
        return None
    if cfg.direction.strongest:
        artifact, how = strongest_direction(
            policy, policy.name, cfg.direction.prompts, cfg.direction.selection, cfg.direction.cache_dir
        )
        if how != "selected":
            log.warning(
                "no candidate direction of %s passes the selection filters; taking the strongest (lowest bypass) "
                "one: layer %d, position %d",
                policy.name,
                artifact.layer,
                artifact.position,
            )
        else:
            log.info("direction of %s: layer %d, position %d", policy.name, artifact.layer, artifact.position)
        return artifact
    try:
        artifact, folder, cached = extract_cached(
            policy,
            lambda: prompt_sets(cfg.direction.prompts),
            cfg.direction.cache_dir,
            cfg.direction.selection,
            model_name=policy.name,
            prompts_key=prompt_key(cfg.direction.prompts),
        )
    except NoDirectionError as e:
        if needed:
            raise
        log.warning("no refusal direction for %s (%s); records will have no projection", policy.name, e)
        return None
    log.info(
        "direction %s: layer %d, position %d%s",
        folder,
        artifact.layer,
        artifact.position,
        " (cached)" if cached else "",
    )
    return artifact


DERIVED = ("abliterated", "finetuned")
"""Attack checkpoints derived from the run's policy (any other ``attack.checkpoint`` is a supplied checkpoint)."""


def attack_interventions(cfg: RunConfig) -> list[InterventionConfig]:
    """The job's conditions: the attack's (steering, then one per jailbreak template), else the experiment's, else
    the run's ``intervention``."""
    base = list(cfg.attack.conditions or cfg.experiment.conditions or [cfg.intervention])
    names = cfg.attack.templates
    if names:
        from embodied.attacks.jailbreak import template_names

        names = template_names() if list(names) == ["all"] else names
        base += [InterventionConfig("none", template=name) for name in names]
    return base


def supplied_policy(cfg: RunConfig) -> PolicyConfig:
    """The policy to load: the run's, or the checkpoint an attacker supplies in its place (``attack.checkpoint``
    that is neither ``abliterated`` nor ``finetuned``)."""
    ckpt = cfg.attack.checkpoint
    if not ckpt or ckpt in DERIVED:
        return cfg.policy
    if cfg.policy.kind != "tiny_vla":
        raise ValueError(f"attack.checkpoint={ckpt!r} replaces a tiny_vla policy; policy.kind is {cfg.policy.kind}")
    return replace(cfg.policy, path=ckpt, name=None)


def derived_policy(policy, cfg: RunConfig, direction: DirectionArtifact | None):
    """The policy an attack derives from ``policy``'s weights: abliterated (orthogonalized, saved, loaded back) or
    finetuned on harmful-compliance examples; loaded from ``attack.cache_dir`` when made before."""
    cache = Path(cfg.attack.cache_dir).expanduser()
    kind = cfg.attack.checkpoint
    if cfg.policy.kind != "tiny_vla":
        raise ValueError(f"attack.checkpoint={kind} is built for tiny_vla policies, not policy.kind={cfg.policy.kind}")
    source = policies.checkpoint_path(cfg.policy.path)
    if kind == "abliterated":
        from embodied.attacks.abliterate import abliterated_cached

        folder, cached = abliterated_cached(policy, direction, cache, source)
    else:
        from embodied.attacks.finetune import finetuned_cached

        folder, cached = finetuned_cached(source, cfg.attack.finetune, cache), None
    log.info("attack checkpoint %s: %s%s", kind, folder, " (cached)" if cached else "")
    attacked = load_policy(replace(cfg.policy, path=str(folder), name=f"{policy.name}+{kind}"))
    attacked.name = f"{policy.name}+{kind}"
    return attacked


def build_defenses(policy, cfg: RunConfig) -> Defenses:
    """The run's shield and monitor (the monitor's probe fitted on ``policy``, cached by its weights)."""
    d = cfg.defense
    if not (d.shield or d.monitor):
        return Defenses(None if d.name == "none" else d.name)
    probe = None
    if d.monitor:
        if not hasattr(policy, "post_instruction_length"):
            raise ValueError(f"defense.monitor needs a policy with a residual stream; {policy.name} has none")
        from embodied.defenses.monitor import fit_probe_cached

        probe = fit_probe_cached(policy, d.monitor_options, model_name=policy.name)
        log.info("monitor: layer %d, position %d, threshold %.3f", probe.layer, probe.position, probe.threshold)
    shield = None
    if d.shield:
        from embodied.defenses.shield import ActionShield

        shield = ActionShield(d.shield_options)
    return Defenses(d.name, shield, probe)


def results_table(summary: dict) -> Table:
    table = Table(title="refusal and unsafe execution by condition (95% Wilson intervals)")
    cols = [
        ("harmful refusal", "harmful_refusal"),
        ("harmful unsafe", "harmful_unsafe"),
        ("expected violation", "harmful_expected_violation"),
        ("benign success", "benign_success"),
        ("false refusal", "benign_false_refusal"),
        ("failed", "failed"),
    ]
    if summary.get("defense", "none") != "none":
        cols[5:5] = [("vetoed harmful", "harmful_vetoed"), ("false veto", "benign_vetoed")]
    table.add_column("condition")
    for name, _ in cols:
        table.add_column(name, justify="right")
    for label, s in summary["conditions"].items():
        cells = []
        for _, key in cols:
            r = s["rates"][key]
            cells.append(
                "n/a"
                if not r["n"]
                else f"{100 * r['rate']:.0f}% [{100 * r['low']:.0f},{100 * r['high']:.0f}] {r['k']}/{r['n']}"
            )
        table.add_row(label, *cells)
    return table


def run(cfg: RunConfig, out: Path, resolved: dict | None = None) -> dict:
    """Runs (or resumes) one job into ``out``; returns its summary."""
    out.mkdir(parents=True, exist_ok=True)
    summary_path, episodes_path = out / SUMMARY_FILE, out / EPISODES_FILE
    if summary_path.exists():
        log.info("%s exists: job already done, skipped", summary_path)
        return json.loads(summary_path.read_text())
    if resolved is not None:
        OmegaConf.save(OmegaConf.create(resolved), out / "config.yaml")
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    set_seed(cfg.seed)
    t0 = time.perf_counter()
    interventions = attack_interventions(cfg)
    for iv in interventions:
        if iv.mode not in MODES:
            raise ValueError(f"intervention.mode must be one of {MODES}, got {iv.mode!r}")
    policy = load_policy(supplied_policy(cfg))
    derived = cfg.attack.checkpoint in DERIVED
    needed = any(iv.mode != "none" for iv in interventions) or cfg.attack.checkpoint == "abliterated"
    direction = direction_for(policy, cfg, needed)
    defenses = build_defenses(policy, cfg)
    if derived:
        policy = derived_policy(policy, cfg, direction)
    strength = float(cfg.attack.finetune.examples) if cfg.attack.checkpoint == "finetuned" else None
    attack = cfg.attack.name if cfg.attack.name != "none" else None
    conditions = [Condition.resolve(iv, direction, attack, strength) for iv in interventions]
    sets = [eval_set(name) for name in cfg.env.sets]
    policy_hash = weights_hash(policy.model) if hasattr(policy, "model") else policy.name
    seeds = [cfg.seed + i for i in range(cfg.episodes)]
    done = keys(read_records(episodes_path))
    total = len(conditions) * len(sets) * len(seeds)
    bar = tqdm(
        total=total,
        initial=min(len(done), total),
        desc=cfg.experiment.name,
        disable=not cfg.progress,
        dynamic_ncols=True,
    )
    try:
        with RecordWriter(episodes_path) as writer:
            for condition in conditions:
                for es in sets:
                    set_seed(cfg.seed)
                    run_condition(
                        policy,
                        condition,
                        es,
                        seeds,
                        writer,
                        done,
                        policy_hash=policy_hash,
                        split=cfg.env.split,
                        image_size=cfg.env.image_size,
                        batch_size=cfg.batch_size,
                        on_episode=lambda r: bar.update(1),
                        defenses=defenses,
                    )
    finally:
        bar.close()
        defenses.close()
    records = read_records(episodes_path)
    summary = {
        "experiment": cfg.experiment.name,
        "policy": policy.name,
        "checkpoint_hash": policy_hash,
        "direction": None
        if direction is None
        else {
            "hash": direction.hash,
            "layer": direction.layer,
            "position": direction.position,
            "model_hash": direction.model_hash,
        },
        "attack": cfg.attack.name,
        "defense": cfg.defense.name,
        "monitor": None
        if defenses.probe is None
        else {
            "hash": defenses.probe.hash,
            "layer": defenses.probe.layer,
            "position": defenses.probe.position,
            "threshold": defenses.probe.threshold,
            "val": defenses.probe.val_rates,
        },
        "episodes": len(records),
        "seconds": round(time.perf_counter() - t0, 1),
        "conditions": summarize_records(records),
    }
    write_json_atomic(summary_path, summary)
    console = Console()
    if not console.is_terminal:  # a log file or a pipe: do not wrap the table at 80 columns
        console = Console(width=160)
    console.print(results_table(summary))
    if cfg.experiment.report:
        from embodied.report import write_report

        try:  # the records and summary are safe on disk; a failed report must not fail the job
            log.info("report: %s", write_report(out))
        except Exception:
            log.exception("report for %s failed; rerun it with `embodied-report %s`", out, out)
    return summary


@hydra.main(version_base="1.3", config_path="../conf", config_name="run")
def main(cfg) -> None:
    rc: RunConfig = OmegaConf.to_object(cfg)
    out = output_dir(rc.out or None)
    run(rc, out, OmegaConf.to_container(cfg, resolve=True))


if __name__ == "__main__":
    main()
