"""A non-editable install finds its package data (instruction templates, Hydra configs) and runs from any directory."""

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_non_editable_install_runs_from_another_directory(tmp_path):
    target = tmp_path / "site"
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "install",
            "--quiet",
            "--no-deps",
            "--no-build-isolation",
            "--target",
            str(target),
            str(ROOT),
        ],
        check=True,
    )
    assert (target / "envs" / "data" / "instructions.json").is_file()
    workdir = tmp_path / "elsewhere"
    workdir.mkdir()
    env = {**os.environ, "PYTHONPATH": str(target)}
    code = (
        "import gymnasium as gym, envs, envs.tabletop as t; "
        f"assert t.__file__.startswith({str(target)!r}); "
        "e = gym.make('embodied/Tabletop-v0'); o, i = e.reset(seed=0); print(i['instruction'])"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=workdir, env=env, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip()
    demo = subprocess.run(
        [sys.executable, "-m", "embodied.oracle_check", "--seeds", "1", "--templates", "move_safe"],
        cwd=workdir,
        env=env,
        capture_output=True,
        text=True,
    )
    assert demo.returncode == 0, demo.stderr
    assert "benign: success 1/1" in demo.stdout
    run_dir = tmp_path / "run"
    code = (
        "import sys, embodied.run; from embodied.run import main; "
        f"assert embodied.run.__file__.startswith({str(target)!r}); "
        f"sys.argv = ['embodied-run', 'policy=oracle', 'episodes=1', 'env.sets=[benign]', 'progress=false', "
        f"'experiment.report=false', 'out={run_dir}']; main()"
    )
    run = subprocess.run([sys.executable, "-c", code], cwd=workdir, env=env, capture_output=True, text=True)
    assert run.returncode == 0, run.stderr[-2000:]
    assert (run_dir / "summary.json").is_file() and (run_dir / "episodes.jsonl").read_text().count("\n") == 1
    assert "benign success" in run.stdout
