"""What steering costs: generation with ablation hooks and with orthogonalized weights vs the plain model, and
activation collection (the streaming difference in means) vs a plain batched forward over the same inputs.

Prints, per policy, seconds per batch and the ratios side by side (targets: hooks <= 1.05x, orthogonalized 1.00x,
collection >= 0.9x of the plain forward's throughput). Timings are medians over interleaved repeats.

    python bench/steering_speed.py [--policies tiny-vla smollm2] [--batch 16] [--repeats 5] [--threads 2]
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time

import torch

from embodied.directions import mean_activations
from embodied.interventions import ablate, orthogonalize
from embodied.loading import PolicyConfig, load_policy
from embodied.models import adapter
from embodied.prompts import env_observations
from envs.instructions import categories

POLICIES = {
    "tiny-vla": PolicyConfig(kind="tiny_vla", path="tiny-vla"),
    "smollm2": PolicyConfig(kind="hf_planner", path="smollm2", name="smollm2-planner"),
}


def timed(fn) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def bench(name: str, batch: int, repeats: int, device: str | None) -> dict:
    cfg = POLICIES[name]
    if device:
        cfg.device = device
    policy = load_policy(cfg)
    cats = tuple(categories())
    obs = env_observations(cats, "test", batch, seed=20_000)
    d = torch.randn(adapter(policy.model).d_model, generator=torch.Generator().manual_seed(0))
    plain_model = policy.model
    ortho_model = orthogonalize(plain_model, d)

    def generate(model):
        policy.model = model
        try:
            policy.act_batch(obs)
        finally:
            policy.model = plain_model

    def generate_ablated():
        with ablate(plain_model, d):
            policy.act_batch(obs)

    @torch.no_grad()
    def forward():
        plain_model(**policy.inputs(obs), use_cache=False)

    def collect():
        mean_activations(policy, obs, batch_size=batch)

    runs = {
        "generate": lambda: generate(plain_model),
        "generate_ablated": generate_ablated,
        "generate_orthogonalized": lambda: generate(ortho_model),
        "forward": forward,
        "collect": collect,
    }
    for fn in runs.values():  # warm-up
        fn()
    times: dict[str, list[float]] = {k: [] for k in runs}
    for _ in range(repeats):
        for k, fn in runs.items():
            times[k].append(timed(fn))
    return {k: statistics.median(v) for k, v in times.items()} | {"device": str(policy.device)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--policies", nargs="+", default=list(POLICIES), choices=list(POLICIES))
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--device", default=None)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    print(f"{platform.processor() or platform.machine()}, torch {torch.__version__}, {args.threads} threads")
    head = (
        f"{'policy':<10}{'device':>8}{'generate s':>12}{'ablated x':>11}{'ortho x':>9}"
        f"{'forward s':>11}{'collect s':>11}{'collect/forward throughput':>28}"
    )
    print(f"batch {args.batch}, median of {args.repeats}; targets: ablated <= 1.05x, ortho 1.00x, collect >= 0.9x")
    print(head)
    for name in args.policies:
        r = bench(name, args.batch, args.repeats, args.device)
        print(
            f"{name:<10}{r['device']:>8}{r['generate']:>12.3f}{r['generate_ablated'] / r['generate']:>11.3f}"
            f"{r['generate_orthogonalized'] / r['generate']:>9.3f}{r['forward']:>11.3f}{r['collect']:>11.3f}"
            f"{r['forward'] / r['collect']:>28.3f}"
        )


if __name__ == "__main__":
    main()
