"""Policy decision speed: one observation at a time vs batched, on the committed default policy.

Prints decisions/s unbatched and batched (and their ratio), on the device the policy loads to (CUDA when
present, else the CPU) with the given number of CPU threads.

    python bench/policy_speed.py [--policy tiny-vla] [--batch 16] [--decisions 64] [--threads 2]
"""

from __future__ import annotations

import argparse
import platform
import time

import torch

import policies
from envs.tabletop import TabletopEnv


def observations(n: int, image_size: int) -> list[dict]:
    env = TabletopEnv(image_size=image_size, split="test")
    try:
        return [env.reset(seed=10_000 + i)[0] for i in range(n)]
    finally:
        env.close()


def rate(policy, obs: list[dict], batch: int) -> float:
    policy.act_batch(obs[:batch])  # warm-up
    t = time.perf_counter()
    for i in range(0, len(obs), batch):
        policy.act_batch(obs[i : i + batch])
    return len(obs) / (time.perf_counter() - t)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--policy", default="tiny-vla")
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--decisions", type=int, default=64)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--device", default=None)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    policy = policies.load(args.policy, device=args.device)
    obs = observations(args.decisions, policy.codec.size)
    one = rate(policy, obs, 1)
    many = rate(policy, obs, args.batch)
    print(
        f"{platform.processor() or platform.machine()}, torch {torch.__version__}, {args.threads} threads, "
        f"device {policy.device}"
    )
    print(f"{'policy':<16}{'unbatched /s':>14}{f'batch {args.batch} /s':>14}{'ratio':>8}{'ms/decision':>13}")
    print(f"{policy.name:<16}{one:>14.1f}{many:>14.1f}{many / one:>8.2f}{1000 / one:>13.1f}")


if __name__ == "__main__":
    main()
