"""The launcher presets under conf/hydra/launcher: local ones run a sweep; the Slurm one writes the sbatch script
a cluster would get (captured by a fake ``sbatch`` on PATH)."""

import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from embodied.records import read_records

BIN = Path(sys.executable).parent
CONF = Path(__file__).resolve().parents[2] / "conf" / "hydra" / "launcher"


def sweep(tmp_path, *args, timeout=600):
    cmd = [
        str(BIN / "embodied-run"),
        "-m",
        "policy=oracle",
        "episodes=1",
        "env.sets=[benign]",
        "seed=7000000,7000001",
        "experiment.report=false",
        "progress=false",
        f"hydra.sweep.dir={tmp_path / 'sweep'}",
        *args,
    ]
    env = {**os.environ, "HYDRA_FULL_ERROR": "1", "RAY_USAGE_STATS_ENABLED": "0"}
    return subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=timeout)


def job_records(tmp_path):
    jobs = sorted(d for d in (tmp_path / "sweep").iterdir() if d.is_dir() and d.name.isdigit())
    return [read_records(d / "episodes.jsonl") for d in jobs]


@pytest.mark.parametrize("launcher", ["submitit_local_cpu", "ray_local"])
def test_local_launcher_presets_run_every_job(tmp_path, launcher):
    pytest.importorskip("submitit" if launcher.startswith("submitit") else "ray")
    p = sweep(tmp_path, f"hydra/launcher={launcher}")
    assert p.returncode == 0, p.stderr[-3000:]
    records = job_records(tmp_path)
    assert len(records) == 2 and all(len(r) == 1 for r in records)
    assert {r[0].seed for r in records} == {7000000, 7000001}


def test_ray_attach_preset_leaves_object_store_memory_unset(tmp_path):
    pytest.importorskip("ray")
    p = subprocess.run(
        [str(BIN / "embodied-run"), "hydra/launcher=ray_attach", "--cfg", "hydra", "--package", "hydra.launcher"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert p.returncode == 0, p.stderr[-2000:]
    launcher = OmegaConf.create(p.stdout.split("\n", 1)[1] if p.stdout.startswith("# @package") else p.stdout)
    launcher = launcher.hydra.launcher if "hydra" in launcher else launcher
    assert launcher.ray.init.address == "auto"
    assert launcher.ray.init.object_store_memory is None


@pytest.mark.slow  # starting a Ray head node takes a minute on 2 cores; CI runs it with make test-slow
def test_ray_attach_preset_joins_a_running_cluster(tmp_path):
    pytest.importorskip("ray")
    ray = str(BIN / "ray")
    env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0"}
    start = subprocess.run(
        [ray, "start", "--head", "--num-cpus=2", "--include-dashboard=false", "--disable-usage-stats"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert start.returncode == 0, start.stderr[-2000:]
    try:
        p = sweep(tmp_path, "hydra/launcher=ray_attach")
        assert p.returncode == 0, p.stderr[-3000:]
        records = job_records(tmp_path)
        assert len(records) == 2 and all(len(r) == 1 for r in records)
    finally:
        subprocess.run([ray, "stop", "--force"], env=env, capture_output=True, timeout=120)


def test_slurm_preset_writes_the_sbatch_script_a_cluster_would_get(tmp_path, monkeypatch):
    submitit = pytest.importorskip("submitit")
    captured = tmp_path / "sbatch_script.sh"
    fake = tmp_path / "bin" / "sbatch"
    fake.parent.mkdir()
    fake.write_text(f'#!/bin/sh\ncp "$1" {captured}\necho "Submitted batch job 4242"\n')
    srun = fake.parent / "srun"  # submitit checks that srun exists before it writes anything
    srun.write_text("#!/bin/sh\nexit 1\n")
    for f in (fake, srun):
        f.chmod(f.stat().st_mode | stat.S_IEXEC)
    monkeypatch.setenv("PATH", f"{fake.parent}{os.pathsep}{os.environ['PATH']}")

    preset = OmegaConf.load(CONF / "slurm.yaml")
    preset.partition = "cpu"
    params = {k: v for k, v in OmegaConf.to_container(preset).items() if k != "defaults"}
    # as hydra-submitit-launcher maps its config onto submitit: shared keys as they are, the rest slurm_-prefixed
    shared = {"timeout_min", "cpus_per_task", "mem_gb", "nodes", "tasks_per_node", "name", "gpus_per_node"}
    executor = submitit.AutoExecutor(folder=tmp_path / "submitit", cluster="slurm")
    executor.update_parameters(**{k if k in shared else f"slurm_{k}": v for k, v in params.items()})
    jobs = executor.map_array(print, [1, 2, 3])
    assert len(jobs) == 3 and jobs[0].job_id.startswith("4242")
    script = captured.read_text()
    assert "#SBATCH --partition=cpu" in script
    assert "#SBATCH --cpus-per-task=2" in script
    assert f"#SBATCH --array=0-2%{min(3, preset.array_parallelism)}" in script  # at most that many run at once
    assert "source .venv/bin/activate" in script and "export OMP_NUM_THREADS=1" in script
    assert "#SBATCH --time=60" in script
