"""What the activation monitor costs per decision: ``act_batch`` throughput with and without ``monitoring``.

Prints, per policy and batch size, decisions per second of the plain policy and of the monitored one, and their
ratio (target: the monitored throughput >= 0.95x the plain one). The probe's weights do not change its cost, so a
random probe reading the middle block at the instruction's last token is timed. Timings are medians over
interleaved repeats.

    python bench/monitor_speed.py [--policies tiny-vla smollm2] [--batches 1 16] [--repeats 5] [--threads 2]
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time

import torch

from embodied.defenses.monitor import HarmProbe, instruction_end, monitoring
from embodied.loading import PolicyConfig, load_policy
from embodied.models import adapter
from embodied.prompts import env_observations
from envs.instructions import categories

POLICIES = {
    "tiny-vla": PolicyConfig(kind="tiny_vla", path="tiny-vla"),
    "smollm2": PolicyConfig(kind="hf_planner", path="smollm2", name="smollm2-planner"),
}


def random_probe(policy, observations) -> HarmProbe:
    ad = adapter(policy.model)
    g = torch.Generator().manual_seed(0)
    d = ad.d_model
    return HarmProbe(
        weight=torch.randn(d, generator=g, dtype=torch.float64),
        bias=0.0,
        mean=torch.zeros(d, dtype=torch.float64),
        scale=torch.ones(d, dtype=torch.float64),
        layer=ad.n_layers // 2,
        position=instruction_end(policy, observations),
        threshold=0.5,
    )


def timed(fn) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def throughputs(policy, batch: int, repeats: int) -> dict[str, float]:
    """Decisions per second of ``act_batch`` on ``batch`` observations, plain and monitored (median of
    interleaved repeats)."""
    obs = env_observations(tuple(categories()), "test", batch, seed=20_000)
    probe = random_probe(policy, obs)

    def monitored():
        with monitoring(policy.model, probe) as seen:
            policy.act_batch(obs)
        assert len(seen) == 1 and seen[0].shape == (batch,), "one score per observation, once per decision"

    runs = {"plain": lambda: policy.act_batch(obs), "monitored": monitored}
    for fn in runs.values():  # warm-up
        fn()
    times: dict[str, list[float]] = {k: [] for k in runs}
    for _ in range(repeats):
        for k, fn in runs.items():
            times[k].append(timed(fn))
    return {k: batch / statistics.median(v) for k, v in times.items()}


def bench(name: str, batches: list[int], repeats: int, device: str | None) -> list[dict]:
    cfg = POLICIES[name]
    if device:
        cfg.device = device
    policy = load_policy(cfg)
    return [{"batch": b, "device": str(policy.device), **throughputs(policy, b, repeats)} for b in batches]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--policies", nargs="+", default=["tiny-vla"], choices=list(POLICIES))
    ap.add_argument("--batches", nargs="+", type=int, default=[1, 16])
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--device", default=None)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    print(f"{platform.processor() or platform.machine()}, torch {torch.__version__}, {args.threads} threads")
    print(f"median of {args.repeats}; target: monitored >= 0.95x the plain throughput")
    print(f"{'policy':<10}{'device':>8}{'batch':>7}{'plain dec/s':>13}{'monitored dec/s':>17}{'monitored/plain':>17}")
    for name in args.policies:
        for r in bench(name, args.batches, args.repeats, args.device):
            print(
                f"{name:<10}{r['device']:>8}{r['batch']:>7}{r['plain']:>13.2f}{r['monitored']:>17.2f}"
                f"{r['monitored'] / r['plain']:>17.3f}"
            )


if __name__ == "__main__":
    main()
