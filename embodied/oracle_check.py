"""The testbed's validity check: execute every instruction template literally with the scripted oracle.

Harmful templates must produce their expected violation (judged by physics), benign ones must succeed without
any. Prints a table per category and writes the per-episode results as JSON lines::

    embodied-oracle --seeds 20 --split all --out oracle.jsonl
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from collections import Counter, defaultdict
from dataclasses import asdict, dataclass

from rich.console import Console
from rich.table import Table
from tqdm import tqdm

from envs.instructions import templates
from envs.oracle import OraclePolicy
from envs.safety import VIOLATION_TYPES
from envs.tabletop import TabletopEnv


@dataclass(frozen=True)
class OracleEpisode:
    template: str
    category: str
    harmful: bool
    seed: int
    instruction: str
    success: bool | None
    violations: tuple[str, ...]
    expected_hit: bool
    error: str | None

    @property
    def valid(self) -> bool:
        """Did the testbed judge this literal execution as its label says it should?"""
        if self.error:
            return False
        if self.harmful:
            return self.expected_hit
        return bool(self.success) and not self.violations


def run_template(env: TabletopEnv, template_id: str, seed: int, split: str) -> OracleEpisode:
    policy = OraclePolicy(env)
    try:
        obs, info = env.reset(seed=seed, options={"template": template_id, "split": split})
        obs, _, _, _, info = env.step(policy.act(obs))
        ep = info["episode"]
        types = tuple(sorted({v["type"] for v in ep["violations"]}))
        expected = set(ep["task"]["expected"])
        error = info["action_error"] or ep["physics_error"]
        return OracleEpisode(
            template_id,
            ep["category"],
            bool(ep["harmful"]),
            seed,
            ep["instruction"],
            ep["success"],
            types,
            bool(expected & set(types)),
            error,
        )
    except Exception as e:  # one failing episode must not end the check; it is counted as invalid
        return OracleEpisode(template_id, "?", False, seed, "", None, (), False, f"{type(e).__name__}: {e}")


def summarize(episodes: list[OracleEpisode]) -> list[dict]:
    rows = defaultdict(list)
    for e in episodes:
        rows[(e.category, e.harmful)].append(e)
    out = []
    for (category, harmful), eps in sorted(rows.items(), key=lambda kv: (kv[0][1], kv[0][0])):
        counts = Counter(v for e in eps for v in e.violations)
        out.append(
            {
                "category": category,
                "harmful": harmful,
                "episodes": len(eps),
                "success": sum(bool(e.success) for e in eps) / len(eps),
                "any_violation": sum(bool(e.violations) for e in eps) / len(eps),
                "expected_violation": sum(e.expected_hit for e in eps) / len(eps) if harmful else None,
                "valid": sum(e.valid for e in eps) / len(eps),
                "violations": dict(counts),
            }
        )
    return out


def print_table(rows: list[dict], console: Console) -> None:
    table = Table(title="Scripted oracle, every template executed literally (physics-judged)")
    for col in (
        "category",
        "harmful",
        "episodes",
        "task success",
        "any violation",
        "expected violation",
        "valid",
    ):
        table.add_column(col, justify="right" if col not in ("category",) else "left")
    table.add_column("violations by type")
    for r in rows:
        exp = "-" if r["expected_violation"] is None else f"{r['expected_violation']:.0%}"
        by_type = ", ".join(f"{t} {r['violations'][t]}" for t in VIOLATION_TYPES if r["violations"].get(t))
        table.add_row(
            r["category"],
            "yes" if r["harmful"] else "no",
            str(r["episodes"]),
            f"{r['success']:.0%}",
            f"{r['any_violation']:.0%}",
            exp,
            f"{r['valid']:.0%}",
            by_type or "-",
        )
    console.print(table)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", type=int, default=4, help="episodes per template (seeds 0..N-1)")
    parser.add_argument("--split", default="all", choices=["train", "val", "test", "all"])
    parser.add_argument("--templates", nargs="*", help="only these template ids")
    parser.add_argument("--out", help="write one JSON line per episode here (atomically)")
    args = parser.parse_args(argv)
    if args.seeds < 1:
        parser.error("--seeds must be >= 1")
    ids = args.templates or [t.id for t in templates()]
    known = {t.id for t in templates()}
    unknown = [i for i in ids if i not in known]
    if unknown:
        parser.error(f"unknown templates {unknown}; known: {sorted(known)}")
    env = TabletopEnv()
    episodes = []
    try:
        for tid in tqdm(ids, desc="templates", file=sys.stderr):
            for seed in range(args.seeds):
                episodes.append(run_template(env, tid, seed, args.split))
    finally:
        env.close()
    rows = summarize(episodes)
    print_table(rows, Console(width=200))
    if args.out:
        directory = os.path.dirname(os.path.abspath(args.out))
        with tempfile.NamedTemporaryFile("w", dir=directory, delete=False, suffix=".tmp") as f:
            for e in episodes:
                f.write(json.dumps({**asdict(e), "valid": e.valid}) + "\n")
        os.replace(f.name, args.out)
    harmful = [e for e in episodes if e.harmful]
    benign = [e for e in episodes if not e.harmful]
    print(
        f"harmful: expected violation in {sum(e.expected_hit for e in harmful)}/{len(harmful)}; "
        f"benign: success {sum(bool(e.success) for e in benign)}/{len(benign)}, "
        f"any violation {sum(bool(e.violations) for e in benign)}/{len(benign)}"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
