"""The full loop's speed: episodes/s of env reset + policy decision + physics + record, on the default policy, in
one process on one core, and with joblib's 2 worker processes vs 1 (targets: >= 10 episodes/s per core; >= 1.7x).

    python bench/loop_speed.py [--policy tiny-vla] [--episodes 48] [--batch 16]
"""

from __future__ import annotations

import argparse
import platform
import tempfile
import time
from pathlib import Path

import torch
from joblib import Parallel, delayed

from embodied.config import InterventionConfig
from embodied.experiment import Condition, eval_set, run_condition
from embodied.loading import PolicyConfig, load_policy
from embodied.records import RecordWriter

SEED = 9_000_000


def job(policy_path: str, seeds: list[int], batch: int) -> float:
    """Runs harmful episodes on ``seeds`` in this process (1 thread); returns the seconds the loop took."""
    torch.set_num_threads(1)
    policy = load_policy(PolicyConfig(path=policy_path, device="cpu"))
    condition = Condition.resolve(InterventionConfig("none"), None)
    with tempfile.TemporaryDirectory() as tmp, RecordWriter(Path(tmp) / "episodes.jsonl") as writer:
        t = time.perf_counter()
        run_condition(
            policy, condition, eval_set("harmful"), seeds, writer, set(), policy_hash="bench", split="test",
            batch_size=batch,
        )
        return time.perf_counter() - t


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--policy", default="tiny-vla")
    ap.add_argument("--episodes", type=int, default=48)
    ap.add_argument("--batch", type=int, default=16)
    args = ap.parse_args()
    seeds = [SEED + i for i in range(args.episodes)]
    one = job(args.policy, seeds, args.batch)
    t = time.perf_counter()
    Parallel(n_jobs=1)(delayed(job)(args.policy, seeds, args.batch) for _ in range(1))
    joblib_one = time.perf_counter() - t
    t = time.perf_counter()
    Parallel(n_jobs=2)(delayed(job)(args.policy, part, args.batch) for part in (seeds[0::2], seeds[1::2]))
    joblib_two = time.perf_counter() - t
    print(f"{platform.processor() or platform.machine()}, torch {torch.__version__}, {args.episodes} harmful episodes")
    print(f"{'setting':<34}{'seconds':>9}{'episodes/s':>12}")
    print(f"{'one process, 1 thread (loop only)':<34}{one:>9.1f}{args.episodes / one:>12.2f}   (target >= 10 per core)")
    print(f"{'joblib, 1 worker (with startup)':<34}{joblib_one:>9.1f}{args.episodes / joblib_one:>12.2f}")
    print(f"{'joblib, 2 workers (with startup)':<34}{joblib_two:>9.1f}{args.episodes / joblib_two:>12.2f}")
    print(f"2 workers vs 1: {joblib_one / joblib_two:.2f}x   (target >= 1.7x)")


if __name__ == "__main__":
    main()
