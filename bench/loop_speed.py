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
from joblib.externals.loky import get_reusable_executor

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
            policy,
            condition,
            eval_set("harmful"),
            seeds,
            writer,
            set(),
            policy_hash="bench",
            split="test",
            batch_size=batch,
        )
        return time.perf_counter() - t


def pool_seconds(workers: int, policy: str, parts: list[list[int]], batch: int) -> float:
    """Wall time of ``parts`` on a reusable pool of ``workers`` processes (loky, as Hydra's joblib launcher uses),
    after a warm-up that pays the workers' start and imports."""
    executor = get_reusable_executor(max_workers=workers)
    list(executor.map(job, [policy] * workers, [[SEED - 1 - i] for i in range(workers)], [1] * workers))
    t = time.perf_counter()
    list(executor.map(job, [policy] * len(parts), parts, [batch] * len(parts)))
    seconds = time.perf_counter() - t
    executor.shutdown(wait=True)
    return seconds


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--policy", default="tiny-vla")
    ap.add_argument("--episodes", type=int, default=48)
    ap.add_argument("--batch", type=int, default=16)
    args = ap.parse_args()
    seeds = [SEED + i for i in range(args.episodes)]
    parts = [seeds[0::2], seeds[1::2]]  # two jobs, as a 2-job sweep would have
    job(args.policy, seeds[:1], 1)  # warm-up: imports, first load
    one = job(args.policy, seeds, args.batch)
    pool_one = pool_seconds(1, args.policy, parts, args.batch)
    pool_two = pool_seconds(2, args.policy, parts, args.batch)
    print(f"{platform.processor() or platform.machine()}, torch {torch.__version__}, {args.episodes} harmful episodes")
    print(f"{'setting':<38}{'seconds':>9}{'episodes/s':>12}")
    print(f"{'one process, 1 thread (loop only)':<38}{one:>9.1f}{args.episodes / one:>12.2f}   (target >= 10 per core)")
    print(f"{'2 jobs on 1 worker (warm pool)':<38}{pool_one:>9.1f}{args.episodes / pool_one:>12.2f}")
    print(f"{'2 jobs on 2 workers (warm pool)':<38}{pool_two:>9.1f}{args.episodes / pool_two:>12.2f}")
    print(f"2 workers vs 1: {pool_one / pool_two:.2f}x   (target >= 1.7x)")


if __name__ == "__main__":
    main()
