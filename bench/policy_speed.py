"""Policy decision speed: one observation at a time vs batched, without and with steering hooks.

For each committed policy (default: the from-scratch `tiny-vla` and the LoRA-tuned SmolLM2 planner
`smol-planner`), prints decisions/s unbatched and batched, plain and with a directional-ablation hook on every
block (the paper's intervention; a random unit direction, since only the cost is measured), and the ratios side by
side: batched / unbatched, and hooked / plain at each batch size. Runs on the device the policy loads to (CUDA when
present, else the CPU) with the given number of CPU threads.

    python bench/policy_speed.py [--policies tiny-vla smol-planner] [--batch 16] [--decisions 32] [--threads 2]
"""

from __future__ import annotations

import argparse
import contextlib
import platform
import time

import torch

import policies
from embodied.interventions import ablate
from embodied.models import adapter
from envs.tabletop import TabletopEnv


def observations(n: int, image_size: int) -> list[dict]:
    """Test-split observations with the scene layout (planners read the scene as text)."""
    env = TabletopEnv(image_size=image_size, split="test")
    try:
        out = []
        for i in range(n):
            obs, info = env.reset(seed=10_000 + i)
            out.append({**obs, "layout": info["layout"]})
        return out
    finally:
        env.close()


def rate(policy, obs: list[dict], batch: int, hooks) -> float:
    """Decisions per second over ``obs`` in batches of ``batch``, inside the ``hooks`` context."""
    with hooks():
        policy.act_batch(obs[:batch])  # warm-up
        t = time.perf_counter()
        for i in range(0, len(obs), batch):
            policy.act_batch(obs[i : i + batch])
        return len(obs) / (time.perf_counter() - t)


def bench(name: str, batch: int, decisions: int, device: str | None) -> dict:
    policy = policies.load(name, device=device)
    obs = observations(decisions, policy.codec.size)
    d = torch.randn(adapter(policy.model).d_model, generator=torch.Generator().manual_seed(0))

    def hooked():
        return ablate(policy.model, d)

    plain = contextlib.nullcontext
    return {
        "policy": policy.name,
        "device": str(policy.device),
        "one": rate(policy, obs, 1, plain),
        "many": rate(policy, obs, batch, plain),
        "one_hooked": rate(policy, obs, 1, hooked),
        "many_hooked": rate(policy, obs, batch, hooked),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--policies", nargs="+", default=["tiny-vla", "smol-planner"])
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--decisions", type=int, default=32)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--device", default=None)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    rows = [bench(name, args.batch, args.decisions, args.device) for name in args.policies]
    print(f"{platform.processor() or platform.machine()}, torch {torch.__version__}, {args.threads} threads")
    b = f"b{args.batch}"
    header = [
        "policy",
        "device",
        "b1 /s",
        f"{b} /s",
        "b1 hook /s",
        f"{b} hook /s",
        f"{b}/b1",
        "hook/plain b1",
        f"hook/plain {b}",
        "ms/dec b1",
    ]
    print("".join(f"{h:>15}" for h in header))
    for r in rows:
        cells = [
            r["policy"],
            r["device"],
            f"{r['one']:.1f}",
            f"{r['many']:.1f}",
            f"{r['one_hooked']:.1f}",
            f"{r['many_hooked']:.1f}",
            f"{r['many'] / r['one']:.2f}",
            f"{r['one_hooked'] / r['one']:.3f}",
            f"{r['many_hooked'] / r['many']:.3f}",
            f"{1000 / r['one']:.1f}",
        ]
        print("".join(f"{c:>15}" for c in cells))


if __name__ == "__main__":
    main()
