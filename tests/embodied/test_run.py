import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

import policies
from embodied.config import DirectionConfig, EnvConfig, ExperimentConfig, InterventionConfig, RunConfig
from embodied.directions import SelectionConfig, extract
from embodied.loading import PolicyConfig
from embodied.prompts import env_prompt_sets
from embodied.records import read_records
from embodied.run import run

BIN = Path(sys.executable).parent


def oracle_config(**kw) -> RunConfig:
    cfg = RunConfig(
        policy=PolicyConfig(kind="oracle", path="oracle"),
        env=EnvConfig(sets=["harmful", "benign"]),
        episodes=2,
        progress=False,
        experiment=ExperimentConfig(report=False),
    )
    for k, v in kw.items():
        setattr(cfg, k, v)
    return cfg


@pytest.fixture(scope="module")
def tiny_direction(tmp_path_factory) -> Path:
    """A direction artifact of tiny-vla from small prompt sets, selection thresholds relaxed so one is chosen."""
    policy = policies.load("tiny-vla", device="cpu")
    cfg = SelectionConfig(kl_threshold=math.inf, induce_refusal_threshold=-math.inf, prune_layer_percentage=0.0)
    artifact = extract(policy, env_prompt_sets(n_train=8, n_val=4), cfg, model_name="tiny-vla")
    return artifact.save(tmp_path_factory.mktemp("direction"))


def strip(r):
    d = r.to_dict()
    d.pop("seconds")
    return d


def test_a_run_writes_one_record_per_episode_and_a_summary(tmp_path):
    summary = run(oracle_config(), tmp_path)
    records = read_records(tmp_path / "episodes.jsonl")
    assert len(records) == 4 and len({r.key for r in records}) == 4
    assert {r.episode_set for r in records} == {"harmful", "benign"}
    harmful = [r for r in records if r.harmful]
    assert all(r.unsafe and r.violations for r in harmful), "the oracle executes harmful instructions literally"
    on_disk = json.loads((tmp_path / "summary.json").read_text())
    assert on_disk == summary
    rates = summary["conditions"]["none"]["rates"]
    assert rates["harmful_unsafe"]["k"] == len(harmful) and rates["harmful_unsafe"]["n"] == len(harmful)
    assert rates["harmful_refusal"]["k"] == 0
    assert all(r.expected_violation is not None for r in records) and not any(
        r.expected_violation for r in records if not r.harmful
    )
    hits = sum(r.expected_violation for r in harmful)
    assert hits >= 1 and rates["harmful_expected_violation"]["k"] == hits  # the oracle's literal harm happens


def test_paraphrase_sets_keep_their_split_and_the_run_split_applies_to_the_others(tmp_path):
    run(oracle_config(env=EnvConfig(sets=["paraphrase_harmful", "benign"], split="val")), tmp_path)
    records = read_records(tmp_path / "episodes.jsonl")
    splits = {r.episode_set: r.split for r in records}
    assert splits == {"paraphrase_harmful": "paraphrase", "benign": "val"}
    assert all(r.unsafe for r in records if r.episode_set == "paraphrase_harmful")  # the oracle executes them


def test_an_unsteered_run_with_project_false_extracts_no_direction(tmp_path):
    cfg = RunConfig(
        policy=PolicyConfig(kind="tiny_vla", path="tiny-vla", device="cpu"),
        env=EnvConfig(sets=["benign"]),
        direction=DirectionConfig(project=False, cache_dir=str(tmp_path / "cache")),
        episodes=2,
        progress=False,
        experiment=ExperimentConfig(report=False),
    )
    run(cfg, tmp_path / "out")
    records = read_records(tmp_path / "out" / "episodes.jsonl")
    assert len(records) == 2 and all(r.projection is None for r in records)
    assert not (tmp_path / "cache").exists(), "nothing was extracted"


def test_same_config_and_seeds_give_identical_records(tmp_path):
    run(oracle_config(), tmp_path / "a")
    run(oracle_config(), tmp_path / "b")
    a, b = (read_records(tmp_path / d / "episodes.jsonl") for d in "ab")
    assert [strip(r) for r in a] == [strip(r) for r in b]


def test_an_interrupted_run_resumes_without_duplicates_and_a_finished_one_is_skipped(tmp_path):
    run(oracle_config(), tmp_path / "full")
    full = read_records(tmp_path / "full" / "episodes.jsonl")
    part = tmp_path / "part"
    part.mkdir()
    lines = (tmp_path / "full" / "episodes.jsonl").read_text().splitlines(keepends=True)
    (part / "episodes.jsonl").write_text("".join(lines[:2]) + lines[2][:40])  # killed while writing record 3
    run(oracle_config(), part)
    resumed = read_records(part / "episodes.jsonl")
    assert sorted(r.key for r in resumed) == sorted(r.key for r in full)
    assert sorted(map(str, map(strip, resumed))) == sorted(map(str, map(strip, full)))
    mtime = (part / "summary.json").stat().st_mtime_ns
    run(oracle_config(), part)
    assert (part / "summary.json").stat().st_mtime_ns == mtime
    assert len(read_records(part / "episodes.jsonl")) == 4


def test_a_failing_episode_is_recorded_and_the_run_goes_on(tmp_path, monkeypatch):
    from envs.tabletop import TabletopEnv

    step = TabletopEnv.step

    def flaky(self, action):
        if self.instruction and "child" in self.instruction:
            raise RuntimeError("simulated physics failure")
        return step(self, action)

    monkeypatch.setattr(TabletopEnv, "step", flaky)
    cfg = oracle_config(episodes=6)
    summary = run(cfg, tmp_path)
    records = read_records(tmp_path / "episodes.jsonl")
    failed = [r for r in records if r.error]
    assert len(records) == 12 and failed, "some test-split instructions mention the child"
    assert all("simulated physics failure" in r.error and "child" in r.instruction for r in failed)
    assert summary["conditions"]["none"]["rates"]["failed"]["k"] == len(failed)


def test_conditions_on_the_default_policy_record_interventions_and_projections(tmp_path, tiny_direction):
    cfg = RunConfig(
        episodes=3,
        env=EnvConfig(sets=["harmful"]),
        progress=False,
        experiment=ExperimentConfig(
            conditions=[InterventionConfig("none"), InterventionConfig("ablate"), InterventionConfig("orthogonalize")],
            report=False,
        ),
    )
    cfg.direction.path = str(tiny_direction)
    run(cfg, tmp_path)
    records = read_records(tmp_path / "episodes.jsonl")
    by_mode = {m: [r for r in records if r.intervention.mode == m] for m in ("none", "ablate", "orthogonalize")}
    assert all(len(v) == 3 for v in by_mode.values())
    assert all(abs(r.projection) > 1e-3 for r in by_mode["none"])
    assert all(abs(r.projection) < 1e-4 for r in by_mode["ablate"] + by_mode["orthogonalize"])
    for a, o in zip(by_mode["ablate"], by_mode["orthogonalize"], strict=True):
        assert a.text == o.text, "orthogonalized weights act as the ablated model does"
    assert len({r.intervention.direction_hash for r in records if r.intervention.mode != "none"}) == 1


def cli(*args, cwd, timeout=300):
    env = {**os.environ, "HYDRA_FULL_ERROR": "1"}
    return subprocess.run(
        [str(BIN / "embodied-run"), *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout
    )


def test_cli_runs_prints_the_table_and_writes_the_resolved_config(tmp_path):
    p = cli(
        "policy=oracle",
        "episodes=1",
        "env.sets=[harmful]",
        "experiment.report=false",
        "progress=false",
        f"out={tmp_path / 'run'}",
        cwd=tmp_path,
    )
    assert p.returncode == 0, p.stderr[-2000:]
    assert "harmful refusal" in p.stdout
    assert (tmp_path / "run" / "config.yaml").exists()
    assert len(read_records(tmp_path / "run" / "episodes.jsonl")) == 1


def test_cli_help_lists_groups_and_a_bad_key_fails_naming_it(tmp_path):
    p = cli("--help", cwd=tmp_path)
    assert p.returncode == 0
    for group in ("policy:", "intervention:", "experiment:", "env:", "direction:"):
        assert group in p.stdout
    p = cli("episodez=3", cwd=tmp_path)
    assert p.returncode != 0 and "episodez" in p.stderr
    p = cli("intervention.mode=explode", "policy=oracle", "episodes=1", f"out={tmp_path / 'x'}", cwd=tmp_path)
    assert p.returncode != 0 and "intervention.mode must be one of" in p.stderr


@pytest.mark.parametrize("launcher", ["basic", "joblib"])
def test_a_two_by_two_multirun_runs_every_job(tmp_path, tiny_direction, launcher):
    p = cli(
        "-m",
        "intervention=actadd",
        "intervention.coeff=0,2",
        "intervention.layer=1,2",
        f"direction.path={tiny_direction}",
        "episodes=2",
        "env.sets=[benign]",
        "experiment.report=true",
        "progress=false",
        f"hydra.sweep.dir={tmp_path / 'sweep'}",
        f"hydra/launcher={launcher}",
        *(["hydra.launcher.n_jobs=2"] if launcher == "joblib" else []),
        cwd=tmp_path,
        timeout=600,
    )
    assert p.returncode == 0, p.stderr[-3000:]
    jobs = sorted(d for d in (tmp_path / "sweep").iterdir() if d.is_dir() and d.name.isdigit())
    assert [d.name for d in jobs] == ["0", "1", "2", "3"]
    by_setting = {}
    for d in jobs:
        records = read_records(d / "episodes.jsonl")
        assert len(records) == 2
        iv = records[0].intervention
        by_setting[(iv.coeff, iv.layer)] = records
        assert json.loads((d / "summary.json").read_text())["episodes"] == 2
    assert set(by_setting) == {(0.0, 1), (0.0, 2), (2.0, 1), (2.0, 2)}
    # the end-of-sweep callback aggregated every job into one table
    import pandas as pd

    table = pd.read_csv(tmp_path / "sweep" / "results.csv")
    assert len(table) == 8 and sorted(table["job"].unique()) == [0, 1, 2, 3]
    assert "actadd L2 x2" in (tmp_path / "sweep" / "report.md").read_text()
    # a job's records do not depend on the launcher that ran it: the same job run in this process
    cfg = RunConfig(
        intervention=InterventionConfig("actadd", layer=2, coeff=2.0),
        episodes=2,
        env=EnvConfig(sets=["benign"]),
        progress=False,
        experiment=ExperimentConfig(report=False),
    )
    cfg.direction.path = str(tiny_direction)
    run(cfg, tmp_path / "in_process")
    here = read_records(tmp_path / "in_process" / "episodes.jsonl")
    assert [strip(r) for r in here] == [strip(r) for r in by_setting[(2.0, 2)]]


def test_actadd_moves_the_recorded_projection_by_exactly_its_coefficient(tmp_path, tiny_direction):
    from embodied.directions import DirectionArtifact

    artifact = DirectionArtifact.load(tiny_direction)
    cfg = RunConfig(
        episodes=3,
        env=EnvConfig(sets=["benign"]),
        progress=False,
        batch_size=2,  # two batches: the intervention must be applied once, not once per batch
        experiment=ExperimentConfig(
            conditions=[InterventionConfig("none"), InterventionConfig("actadd", layer=artifact.layer, coeff=1.5)],
            report=False,
        ),
    )
    cfg.direction.path = str(tiny_direction)
    run(cfg, tmp_path)
    records = read_records(tmp_path / "episodes.jsonl")
    base = {r.seed: r.projection for r in records if r.intervention.mode == "none"}
    steered = {r.seed: r.projection for r in records if r.intervention.mode == "actadd"}
    shift = 1.5 * float(artifact.vector @ artifact.direction)
    for seed, p in steered.items():
        assert p - base[seed] == pytest.approx(shift, rel=1e-4)


@pytest.mark.parametrize(
    "name", sorted(p.stem for p in (Path(__file__).parents[2] / "conf" / "experiment").glob("*.yaml"))
)
def test_every_experiment_config_composes_into_a_run_config(name):
    from hydra import compose, initialize_config_module
    from omegaconf import OmegaConf

    import embodied.run  # noqa: F401  (registers the schema)

    with initialize_config_module("conf", version_base="1.3"):
        cfg = compose("run", overrides=[f"experiment={name}"])
    rc = OmegaConf.to_object(cfg)
    assert isinstance(rc, RunConfig) and rc.experiment.name
    if name in ("demo", "steer_sweep", "layer_sweep", "hardening"):  # tiny-vla: no candidate passes the filters
        assert rc.direction.strongest and rc.direction.selection.prune_layer_percentage == 0.0
    if name == "demo_planner":  # the demo on the pretrained planner, with a CPU-sized candidate grid
        assert (rc.policy.kind, rc.policy.path) == ("planner", "smol-planner")
        assert rc.direction.selection.layers == [2, 5, 8, 11, 14, 17, 20, 23]
        assert rc.direction.selection.positions == [-1, -2]
        assert rc.direction.strongest  # no candidate passes the paper's filters on smol-planner
        assert max(rc.direction.selection.layers) < int(30 * (1 - rc.direction.selection.prune_layer_percentage))
