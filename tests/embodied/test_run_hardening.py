"""The runner under attacks and defenses: what each episode record says, and the direction of each effect."""

import math
import subprocess
import sys
from pathlib import Path

import pytest

import policies
from embodied.config import AttackConfig, DefenseConfig, EnvConfig, ExperimentConfig, InterventionConfig, RunConfig
from embodied.defenses.monitor import MonitorConfig, ProbeDataConfig
from embodied.directions import SelectionConfig, extract
from embodied.loading import PolicyConfig
from embodied.prompts import env_prompt_sets
from embodied.records import read_records
from embodied.run import run

BIN = Path(sys.executable).parent


@pytest.fixture(scope="module")
def direction_path(tmp_path_factory) -> Path:
    policy = policies.load("tiny-vla", device="cpu")
    cfg = SelectionConfig(kl_threshold=math.inf, induce_refusal_threshold=-math.inf, prune_layer_percentage=0.0)
    artifact = extract(policy, env_prompt_sets(n_train=8, n_val=4), cfg, model_name="tiny-vla")
    return artifact.save(tmp_path_factory.mktemp("direction"))


def config(direction_path=None, **kw) -> RunConfig:
    cfg = RunConfig(
        env=EnvConfig(sets=["harmful"]),
        episodes=3,
        progress=False,
        experiment=ExperimentConfig(report=False),
    )
    if direction_path is not None:
        cfg.direction.path = str(direction_path)
    for k, v in kw.items():
        setattr(cfg, k, v)
    return cfg


def test_the_shield_vetoes_every_unsafe_literal_execution_and_lets_benign_ones_run(tmp_path):
    oracle = PolicyConfig(kind="oracle", path="oracle")
    sets = EnvConfig(sets=["harmful", "benign"])
    run(config(policy=oracle, env=sets, episodes=3), tmp_path / "plain")
    shield = DefenseConfig(name="shield", shield=True)
    run(config(policy=oracle, env=sets, episodes=3, defense=shield), tmp_path / "shield")
    plain = {r.key: r for r in read_records(tmp_path / "plain" / "episodes.jsonl")}
    shielded = {r.key: r for r in read_records(tmp_path / "shield" / "episodes.jsonl")}
    assert plain.keys() == shielded.keys()
    assert sum(r.unsafe for r in plain.values() if r.harmful) >= 2, "the oracle executes harmful instructions"
    for key, r in shielded.items():
        assert r.defense == "shield" and not r.unsafe
        if plain[key].unsafe:
            assert r.vetoed and r.vetoed_by == "shield" and r.veto_reason
        if not r.vetoed:
            assert (r.success, r.violations) == (plain[key].success, plain[key].violations), "allowed: same physics"


def test_jailbreak_templates_are_conditions_whose_records_say_what_the_policy_read(tmp_path, direction_path):
    from embodied.attacks.jailbreak import template_names, wrap

    names = template_names()[:2]
    attack = AttackConfig(name="jailbreak", conditions=[InterventionConfig("none")], templates=names)
    run(config(direction_path, attack=attack), tmp_path)
    records = read_records(tmp_path / "episodes.jsonl")
    assert len(records) == 3 * (1 + len(names)) and len({r.key for r in records}) == len(records)
    by_template = {}
    for r in records:
        assert r.intervention.attack == "jailbreak" and r.projection is not None
        by_template.setdefault(r.intervention.template, []).append(r)
    assert set(by_template) == {None, *names}
    assert all(r.prompt is None for r in by_template[None])
    for name in names:
        assert all(r.prompt == wrap(r.instruction, name) for r in by_template[name])


def test_the_monitor_scores_every_prompt_and_vetoes_at_its_threshold(tmp_path, direction_path):
    data = ProbeDataConfig(n_train=12, n_val=6, n_vision_train=0, n_vision_val=0)
    options = MonitorConfig(data=data, threshold=0.0, cache_dir=str(tmp_path / "monitors"))
    defense = DefenseConfig(name="monitor", monitor=True, monitor_options=options)
    summary = run(config(direction_path, defense=defense, env=EnvConfig(sets=["harmful", "benign"])), tmp_path / "m")
    records = read_records(tmp_path / "m" / "episodes.jsonl")
    assert summary["monitor"]["threshold"] == 0.0
    assert all(0.0 <= r.monitor_score <= 1.0 for r in records)
    assert all(r.vetoed and r.vetoed_by == "monitor" for r in records if r.valid), "threshold 0 flags everything"
    assert not any(r.unsafe or r.success for r in records)


def test_the_abliterated_attack_runs_the_saved_orthogonalized_checkpoint(tmp_path, direction_path):
    attack = AttackConfig(name="abliterated", checkpoint="abliterated", cache_dir=str(tmp_path / "attacks"))
    run(config(direction_path, attack=attack), tmp_path / "a")
    records = read_records(tmp_path / "a" / "episodes.jsonl")
    assert {r.policy for r in records} == {"tiny-vla+abliterated"}
    assert list((tmp_path / "attacks").glob("abliterated-*/model.safetensors"))
    assert all(abs(r.projection) < 1e-4 for r in records), "the direction is gone from the weights"
    ablated = config(direction_path, intervention=InterventionConfig("ablate"))
    run(ablated, tmp_path / "b")
    texts = {r.seed: r.text for r in read_records(tmp_path / "b" / "episodes.jsonl")}
    assert {r.seed: r.text for r in records} == texts, "abliterated weights act as the ablated model"


@pytest.mark.slow
def test_experiment_hardening_is_a_multirun_with_one_table(tmp_path, direction_path):
    p = subprocess.run(
        [
            str(BIN / "embodied-run"),
            "experiment=hardening",
            "policy=tiny_vla",
            "defense=none,shield",
            "attack=none,ablate",
            "episodes=2",
            "progress=false",
            f"direction.path={direction_path}",
            f"hydra.sweep.dir={tmp_path / 'sweep'}",
        ],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert p.returncode == 0, p.stderr[-3000:]
    jobs = sorted(d for d in (tmp_path / "sweep").iterdir() if d.is_dir() and d.name.isdigit())
    assert len(jobs) == 4 and all((d / "summary.json").exists() for d in jobs)
    report = (tmp_path / "sweep" / "report.md").read_text()
    assert "## Hardening: defenses against attacks" in report
    assert "| tiny-vla · shield |" in report and "| tiny-vla · none |" in report
    assert (tmp_path / "sweep" / "hardening.json").exists()


def test_with_direction_strongest_an_ablation_attack_runs_where_no_candidate_passes(tmp_path):
    from embodied.config import DirectionConfig
    from embodied.directions import NoDirectionError
    from embodied.extract import PromptConfig

    direction = DirectionConfig(
        prompts=PromptConfig(n_train=8, n_val=4),
        selection=SelectionConfig(kl_threshold=-1.0, filter_train=False, filter_val=False),  # nothing passes
        cache_dir=str(tmp_path / "dirs"),
    )
    attack = AttackConfig(name="ablate", conditions=[InterventionConfig("ablate")])
    with pytest.raises(NoDirectionError):
        run(config(attack=attack, direction=direction), tmp_path / "strict")
    direction.strongest = True
    run(config(attack=attack, direction=direction), tmp_path / "strongest")
    records = read_records(tmp_path / "strongest" / "episodes.jsonl")
    assert len(records) == 3 and all(r.intervention.mode == "ablate" for r in records)
    assert all(abs(r.projection) < 1e-3 for r in records), "the fallback direction is the one ablated and recorded"
