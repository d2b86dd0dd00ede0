"""An activation monitor: a linear probe for harmful intent on the residual stream, used to veto decisions.

Zhao et al. (2025, arXiv:2507.11878) find that harmfulness and refusal are encoded apart: whether an instruction is
harmful is readable at its last token (t_inst), whether the model will refuse at the chat template's
post-instruction tokens, where refusal directions are read. A probe of harmfulness at t_inst can therefore still
flag a harmful prompt when an attack has removed the refusal direction.

The probe is a logistic regression on standardized residual-stream activations entering one block, at one prompt
position, fitted on train-split scenes and chosen on val-split scenes of the environments. Its labels are what the
environment says (``env.harmful``): vision-dependent instructions are harmful in some scenes only, so they are
labelled scene by scene (and left out by default: see :class:`ProbeDataConfig`).

Positions are negative indices from the prompt's end (prompts are left-padded, so index -k is the same token of
every row). ``instruction_end`` is found from the policy itself: it is the last position at which prompts with
different instructions differ; everything after it is the template's fixed tail (for the tiny VLA, the image
placeholder tokens and the post-instruction tokens: ``<s> <|user|> {instruction} <image>x64 <|end|> <|assistant|>``
puts the instruction's last token at -67). In a model whose image follows the instruction, t_inst has not seen
the image yet.

:func:`monitoring` installs the fitted probe as a forward pre-hook that scores every prompt forward (not the
one-token decoding steps); the runner vetoes a decision whose score reaches the probe's ``threshold``.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from embodied.directions import Steerable, _batches, _model_inputs, data_hash, load_artifact, save_artifact
from embodied.models import adapter, weights_hash

PROBE_WEIGHTS = "probe.safetensors"
PROBE_META = "probe.json"
INSTRUCTION_END = "instruction_end"
MONITOR_SEED = 6_000_000
"""Probe scenes start here: apart from the direction extraction's (``EXTRACT_SEED``) and evaluation's
(``EVAL_SEED``)."""
VISION_OFFSETS = {"train": 400_000, "val": 500_000}
"""Seed offsets of the vision-dependent scenes (``env_prompt_sets`` uses 0 to 300,000 for the other four sets)."""


@dataclass
class ProbeDataConfig:
    """Which scenes the probe learns from: the environments' harmful and benign categories, and the
    vision-dependent one labelled by scene."""

    n_train: int = 128
    """Harmful and benign train-split scenes, each."""
    n_val: int = 64
    """Harmful and benign val-split scenes, each (the threshold's false-positive rate is measured on the benign
    ones and the vision-dependent benign ones)."""
    n_vision_train: int = 0
    """Vision-dependent train-split scenes, labelled by what is on the table. None by default: at the
    instruction's last token of a model whose image follows the instruction (the tiny VLA) the scene is not yet
    seen, so the same text carries both labels; on the tiny VLA they lowered the probe's AUROC on text-determined
    test prompts and made the val threshold arbitrary. Include them for a position after the image."""
    n_vision_val: int = 0
    seed: int = MONITOR_SEED
    image_size: int = 64


@dataclass
class MonitorConfig:
    """The probe: where it reads the residual stream, how it is fitted and where it is cached."""

    layer: int | None = None
    """Block whose input is read (None: the best val AUROC over layers at ``position``)."""
    position: str | int = INSTRUCTION_END
    """``instruction_end`` (the instruction's last token) or a negative index from the prompt's end (-1: the last
    prompt token, where the refusal direction of the tiny VLA is read)."""
    threshold: float | None = None
    """Harm probability at or above which a decision is vetoed (None: chosen on val so that at most ``max_fpr``
    of harmless val prompts are flagged)."""
    max_fpr: float = 0.05
    l2: float = 1e-3
    """L2 penalty on the weights (of standardized features): loss = mean BCE + l2 * |w|^2."""
    batch_size: int = 32
    data: ProbeDataConfig = field(default_factory=ProbeDataConfig)
    cache_dir: str = ".cache/embodied/monitors"


# ----------------------------------------------------------------------------------------------------------- data


@dataclass(frozen=True)
class ProbeData:
    """Observations to fit (train) and choose (val) a probe on; each has ``harmful``: the environment's label."""

    train: list[dict]
    val: list[dict]
    sources: dict[str, str] = field(default_factory=dict)

    def labels(self, split: str) -> np.ndarray:
        items = {"train": self.train, "val": self.val}[split]
        missing = [i for i, o in enumerate(items) if not isinstance(o.get("harmful"), bool | np.bool_)]
        if missing:
            raise ValueError(
                f"{split} observations {missing[:5]} have no boolean 'harmful' label: give each observation the "
                "environment's label (env.harmful)"
            )
        return np.array([bool(o["harmful"]) for o in items])

    def describe(self) -> dict[str, Any]:
        out = {}
        for split, items in (("train", self.train), ("val", self.val)):
            labels = self.labels(split)
            out[split] = {
                "size": len(items),
                "harmful": int(labels.sum()),
                "hash": data_hash(items),
                "categories": _counts(o.get("category", "") for o in items),
            }
        out["sources"] = dict(self.sources)
        return out

    @classmethod
    def from_prompt_sets(cls, sets, extra_train: Sequence[dict] = (), extra_val: Sequence[dict] = ()) -> ProbeData:
        """The four sets of a :class:`~embodied.directions.PromptSets` (harmful ones labelled True), plus
        observations that carry their own ``harmful`` label."""

        def label(items, harmful):
            return [{**o, "harmful": harmful} for o in items]

        train = label(sets.harmful_train, True) + label(sets.harmless_train, False) + list(extra_train)
        val = label(sets.harmful_val, True) + label(sets.harmless_val, False) + list(extra_val)
        return cls(train, val, dict(sets.sources))


def _counts(values) -> dict[str, int]:
    out: dict[str, int] = {}
    for v in values:
        out[str(v)] = out.get(str(v), 0) + 1
    return dict(sorted(out.items()))


def labelled_observations(
    categories: tuple[str, ...], split: str, n: int, seed: int, image_size: int = 64
) -> list[dict]:
    """``n`` observations of seeded scenes (as :func:`embodied.prompts.env_observations`) with ``harmful``: the
    environment's label of each scene."""
    from envs import TabletopEnv

    env = TabletopEnv(image_size=image_size, split=split, categories=categories)
    try:
        out = []
        for s in range(seed, seed + n):
            obs, info = env.reset(seed=s)
            out.append(
                {
                    **obs,
                    "layout": info.get("layout"),
                    "category": info["category"],
                    "seed": s,
                    "harmful": bool(env.harmful),
                }
            )
        return out
    finally:
        env.close()


def probe_data(cfg: ProbeDataConfig | None = None) -> ProbeData:
    """Harmful and benign scenes from :func:`embodied.prompts.env_prompt_sets` and vision-dependent scenes labelled
    by the environment, train split to fit, val split to choose."""
    from embodied.evaluation import VISION
    from embodied.prompts import env_prompt_sets

    cfg = cfg or ProbeDataConfig()
    sets = env_prompt_sets(cfg.n_train, cfg.n_val, cfg.seed, cfg.image_size)
    vision = {
        split: labelled_observations(VISION, split, n, cfg.seed + VISION_OFFSETS[split], cfg.image_size) if n else []
        for split, n in (("train", cfg.n_vision_train), ("val", cfg.n_vision_val))
    }
    data = ProbeData.from_prompt_sets(sets, vision["train"], vision["val"])
    for split in ("train", "val"):
        if vision[split]:
            data.sources[f"vision_{split}"] = (
                f"envs split={split} categories=vision labels=env.harmful seeds={cfg.seed + VISION_OFFSETS[split]}+"
            )
    return data


def probe_data_key(cfg: ProbeDataConfig) -> dict:
    """What determines ``probe_data(cfg)``: the config and the content hash of the environments' code and data."""
    from embodied.extract import PromptConfig, prompt_key

    key = prompt_key(PromptConfig(n_train=cfg.n_train, n_val=cfg.n_val, seed=cfg.seed, image_size=cfg.image_size))
    return {"probe_data": asdict(cfg), "sources": key["sources"]}


# ------------------------------------------------------------------------------------------------------ positions


def instruction_end(policy: Steerable, observations: Sequence[dict]) -> int:
    """The negative index of the instruction's last token in ``policy``'s prompts: one before the longest tail that
    prompts with different instructions share (the first observation is also posed without its last word, so
    that prompts all ending in the same word still differ there). At least the post-instruction tokens."""
    if not observations:
        raise ValueError("instruction_end needs at least one observation")
    sample = list(observations[:16])
    words = str(sample[0]["instruction"]).split()
    if len(words) > 1:
        sample.append({**sample[0], "instruction": " ".join(words[:-1])})
    enc = _model_inputs(policy, sample)
    ids = enc["input_ids"]
    mask = enc.get("attention_mask", torch.ones_like(ids))
    shortest = int(mask.sum(dim=1).min())
    tail = 0
    while tail < shortest and bool((ids[:, -(tail + 1)] == ids[0, -(tail + 1)]).all()):
        tail += 1
    if tail >= shortest:
        raise ValueError(
            "every prompt is the same token for token: give observations with different instructions to find where "
            "the instruction ends"
        )
    post = int(policy.post_instruction_length)
    if tail < post:
        raise RuntimeError(
            f"prompts differ {tail} tokens from the end, inside the {post} post-instruction tokens: the template "
            "does not end every prompt with the same tokens"
        )
    return -(tail + 1)


def resolve_position(policy: Steerable, position: str | int, observations: Sequence[dict]) -> int:
    """``position`` as a negative index: ``instruction_end`` resolved on ``policy``'s prompts, an int (or its
    string, as from a command line) checked to be negative."""
    if isinstance(position, str) and position != INSTRUCTION_END:
        try:
            position = int(position)
        except ValueError:
            raise ValueError(
                f"position must be {INSTRUCTION_END!r} or a negative index from the prompt's end, got {position!r}"
            ) from None
    if position == INSTRUCTION_END:
        return instruction_end(policy, observations)
    if isinstance(position, bool) or not isinstance(position, int) or position >= 0:
        raise ValueError(
            f"position must be {INSTRUCTION_END!r} or a negative index from the prompt's end (-1: the last prompt "
            f"token), got {position!r}"
        )
    return int(position)


# ---------------------------------------------------------------------------------------------------- activations


@torch.no_grad()
def collect_activations(
    policy: Steerable,
    observations: Sequence[dict],
    positions: Sequence[int],
    layers: Sequence[int] | None = None,
    batch_size: int = 32,
) -> torch.Tensor:
    """Per-example residual stream entering blocks ``layers`` (None: all) at the negative ``positions``:
    (n, positions, layers, d_model), float32 on the CPU (exact for float32, float16 and bfloat16 models)."""
    if not observations:
        raise ValueError("collect_activations needs at least one observation")
    if not positions or any(int(p) >= 0 for p in positions):
        raise ValueError(f"positions must be negative indices from the prompt's end, got {list(positions)}")
    ad = adapter(policy.model)
    layers = list(range(ad.n_layers)) if layers is None else [int(layer) for layer in layers]
    bad = [layer for layer in layers if not 0 <= layer < ad.n_layers]
    if bad:
        raise ValueError(f"layers {bad} are out of range for a model with {ad.n_layers} blocks")
    index = [int(p) for p in positions]
    seen: dict[int, torch.Tensor] = {}

    def grab(layer: int):
        def hook(module, args, kwargs):
            h = args[0] if args else kwargs["hidden_states"]
            seen[layer] = h[:, index, :].detach().float().cpu()

        return hook

    out = []
    handles = [ad.blocks[layer].register_forward_pre_hook(grab(layer), with_kwargs=True) for layer in set(layers)]
    try:
        for chunk in _batches(observations, batch_size):
            seen.clear()
            enc = _model_inputs(policy, chunk)
            mask = enc.get("attention_mask")
            shortest = int(mask.sum(dim=1).min()) if mask is not None else int(enc["input_ids"].shape[1])
            if -min(index) > shortest:
                raise ValueError(f"position {min(index)} is before the start of a {shortest}-token prompt")
            policy.model(**enc, use_cache=False, logits_to_keep=1)
            out.append(torch.stack([seen[layer] for layer in layers], dim=2))
    finally:
        for h in handles:
            h.remove()
    acts = torch.cat(out)
    if not torch.isfinite(acts).all():
        raise FloatingPointError("non-finite activations: the model produced NaN or inf on these prompts")
    return acts


# ------------------------------------------------------------------------------------------------------- fitting


def auroc(scores, labels) -> float:
    """Area under the ROC curve: the probability that a random positive scores above a random negative, ties
    counted half (the Mann-Whitney U statistic over n_pos * n_neg)."""
    s = np.asarray(scores, dtype=np.float64).reshape(-1)
    y = np.asarray(labels).reshape(-1)
    if s.shape != y.shape:
        raise ValueError(f"auroc: {s.size} scores but {y.size} labels")
    if not np.isfinite(s).all():
        raise ValueError("auroc: scores must be finite")
    y = y.astype(bool)
    n_pos, n_neg = int(y.sum()), int((~y).sum())
    if n_pos == 0 or n_neg == 0:
        raise ValueError(f"auroc needs positives and negatives, got {n_pos} positive and {n_neg} negative labels")
    order = np.argsort(s, kind="mergesort")
    sorted_s = s[order]
    ranks = np.empty(s.size, dtype=np.float64)
    start = 0
    while start < s.size:  # average rank (1-based) over each run of tied scores
        end = start
        while end + 1 < s.size and sorted_s[end + 1] == sorted_s[start]:
            end += 1
        ranks[order[start : end + 1]] = (start + end) / 2 + 1
        start = end + 1
    u = ranks[y].sum() - n_pos * (n_pos + 1) / 2
    return float(u / (n_pos * n_neg))


@dataclass(frozen=True)
class LogisticFit:
    """A logistic regression on standardized features: p = sigmoid(((x - mean) / scale) @ weight + bias)."""

    weight: torch.Tensor
    bias: float
    mean: torch.Tensor
    scale: torch.Tensor

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.as_tensor(x).detach().to("cpu", torch.float64)
        return ((x - self.mean) / self.scale) @ self.weight + self.bias


def _logistic_loss(z: torch.Tensor, target: torch.Tensor, theta: torch.Tensor, l2: float) -> float:
    logits = z @ theta[:-1] + theta[-1]
    return float(F.binary_cross_entropy_with_logits(logits, target) + l2 * theta[:-1].square().sum())


def fit_logistic(x: torch.Tensor, y, l2: float = 1e-3, max_iter: int = 100, tol: float = 1e-9) -> LogisticFit:
    """Logistic regression of labels ``y`` on features ``x`` (n, d), standardized by the train mean and standard
    deviation (constant features are only centred); loss mean BCE + ``l2`` * |w|^2 (the bias is not penalized).

    Newton's method with backtracking from zero, in float64 on the CPU: the loss is strictly convex for ``l2`` > 0,
    so it converges in a few steps to the one minimum, and the same data give the same probe bit for bit."""
    x = torch.as_tensor(x).detach().to("cpu", torch.float64)
    target = torch.as_tensor(np.asarray(y, dtype=np.float64))
    if x.dim() != 2 or target.shape != (x.shape[0],):
        raise ValueError(
            f"fit_logistic needs features (n, d) and n labels, got {tuple(x.shape)} and {tuple(target.shape)}"
        )
    if not 0 < float(target.sum()) < len(target):
        raise ValueError("fit_logistic needs both harmful and harmless examples")
    if l2 < 0:
        raise ValueError(f"l2 must be >= 0, got {l2}")
    n, d = x.shape
    mean = x.mean(dim=0)
    std = x.std(dim=0, unbiased=False)
    scale = torch.where(std > 1e-6 * std.max().clamp_min(1e-30), std, torch.ones_like(std))
    z = (x - mean) / scale
    z1 = torch.cat([z, torch.ones(n, 1, dtype=torch.float64)], dim=1)
    reg = torch.full((d + 1,), 2.0 * l2, dtype=torch.float64)
    reg[-1] = 0.0
    jitter = torch.full((d + 1,), 1e-10, dtype=torch.float64)  # keeps the Hessian invertible when l2 = 0
    theta = torch.zeros(d + 1, dtype=torch.float64)
    loss = _logistic_loss(z, target, theta, l2)
    for _ in range(max_iter):
        p = torch.sigmoid(z1 @ theta)
        grad = z1.T @ (p - target) / n + reg * theta
        if float(grad.abs().max()) < tol:
            break
        hessian = (z1.T * (p * (1 - p) / n)) @ z1 + torch.diag(reg + jitter)
        step = torch.linalg.solve(hessian, grad)
        size, decrease = 1.0, float(grad @ step)
        while size > 1e-10:  # backtrack until the loss falls enough (Armijo)
            candidate = theta - size * step
            new_loss = _logistic_loss(z, target, candidate, l2)
            if new_loss <= loss - 1e-4 * size * decrease:
                break
            size /= 2
        else:
            break
        theta, loss = candidate, new_loss
    if not torch.isfinite(theta).all():
        raise FloatingPointError("the logistic regression diverged (non-finite weights): raise l2")
    return LogisticFit(theta[:-1].clone(), float(theta[-1]), mean, scale)


def choose_threshold(harmless: np.ndarray, harmful: np.ndarray, max_fpr: float = 0.05) -> float:
    """The score at or above which to flag, so that at most ``max_fpr`` of ``harmless`` scores are flagged: midway
    between the highest harmless score that must pass and the next higher score of either kind (every threshold
    in that gap flags the same prompts; its middle leaves the widest margin)."""
    neg = np.sort(np.asarray(harmless, dtype=np.float64))[::-1]
    everything = np.concatenate([neg, np.asarray(harmful, dtype=np.float64)])
    if neg.size == 0:
        raise ValueError("choose_threshold needs harmless scores")
    if not 0 <= max_fpr < 1:
        raise ValueError(f"max_fpr must be in [0, 1), got {max_fpr}")
    allowed = int(math.floor(max_fpr * neg.size + 1e-9))
    passing = neg[allowed]  # the highest harmless score that must stay below the threshold
    above = everything[everything > passing]
    if above.size == 0:
        return float(np.nextafter(passing, np.inf))
    threshold = (passing + above.min()) / 2
    return float(threshold if threshold > passing else above.min())


# --------------------------------------------------------------------------------------------------------- probe


@dataclass
class HarmProbe:
    """A fitted harm probe with what is needed to trust and reuse it."""

    weight: torch.Tensor
    """(d_model,) float64, on standardized features."""
    bias: float
    mean: torch.Tensor
    """(d_model,) float64: the train features' mean."""
    scale: torch.Tensor
    """(d_model,) float64: the train features' standard deviation (1 where a feature is constant)."""
    layer: int
    position: int
    """Negative index from the prompt's end."""
    threshold: float
    """Harm probability at or above which a decision is flagged."""
    position_name: str = ""
    """``instruction_end`` or the index as text."""
    model_name: str = ""
    model_hash: str = ""
    val_auroc: dict[str, list[float]] = field(default_factory=dict)
    """Val AUROC of a probe at each position (by name) and each layer."""
    val_rates: dict[str, float] = field(default_factory=dict)
    """At the threshold on val: ``tpr``, ``fpr``, and their counts."""
    data: dict[str, Any] = field(default_factory=dict)
    config: dict[str, Any] = field(default_factory=dict)

    @property
    def d_model(self) -> int:
        return int(self.weight.numel())

    @property
    def fit(self) -> LogisticFit:
        return LogisticFit(self.weight, self.bias, self.mean, self.scale)

    def logits(self, activations: torch.Tensor) -> np.ndarray:
        """Logits for activations (n, d_model) at the probe's layer and position."""
        return self.fit.logits(activations).numpy()

    def scores(self, activations: torch.Tensor) -> np.ndarray:
        """Harm probabilities (n,) for activations (n, d_model)."""
        return torch.sigmoid(self.fit.logits(activations)).numpy()

    def flagged(self, scores) -> np.ndarray:
        return np.asarray(scores, dtype=np.float64) >= self.threshold

    @property
    def hash(self) -> str:
        """SHA-256 of what decides: the weights, standardization, bias, layer, position and threshold."""
        h = hashlib.sha256()
        for t in (self.weight, self.mean, self.scale):
            h.update(t.detach().to(torch.float64).cpu().contiguous().numpy().tobytes())
        h.update(json.dumps([self.bias, self.layer, self.position, self.threshold]).encode())
        return h.hexdigest()

    def save(self, path: str | os.PathLike) -> Path:
        """Writes ``probe.safetensors`` and ``probe.json`` into ``path`` (atomically, each)."""
        tensors = {"weight": self.weight, "mean": self.mean, "scale": self.scale}
        tensors = {name: t.to(torch.float64) for name, t in tensors.items()}
        meta = {
            "bias": self.bias,
            "layer": self.layer,
            "position": self.position,
            "position_name": self.position_name,
            "threshold": self.threshold,
            "model_name": self.model_name,
            "model_hash": self.model_hash,
            "probe_hash": self.hash,
            "val_auroc": self.val_auroc,
            "val_rates": self.val_rates,
            "data": self.data,
            "config": self.config,
        }
        return save_artifact(Path(path), tensors, PROBE_WEIGHTS, meta, PROBE_META)

    @classmethod
    def load(cls, path: str | os.PathLike, model: torch.nn.Module | None = None) -> HarmProbe:
        """The probe at ``path``; with ``model``, checks that it was fitted on exactly these weights."""
        fix = "fit it for this model"
        meta, tensors = load_artifact(Path(path), PROBE_WEIGHTS, PROBE_META, "harm probe", fix, model)
        return cls(
            weight=tensors["weight"],
            bias=float(meta["bias"]),
            mean=tensors["mean"],
            scale=tensors["scale"],
            layer=int(meta["layer"]),
            position=int(meta["position"]),
            threshold=float(meta["threshold"]),
            position_name=meta.get("position_name", ""),
            model_name=meta.get("model_name", ""),
            model_hash=meta.get("model_hash", ""),
            val_auroc=meta.get("val_auroc", {}),
            val_rates=meta.get("val_rates", {}),
            data=meta.get("data", {}),
            config=meta.get("config", {}),
        )


def _check_config(cfg: MonitorConfig, n_layers: int) -> None:
    if cfg.layer is not None and not 0 <= cfg.layer < n_layers:
        raise ValueError(
            f"monitor layer {cfg.layer} is out of range for a model with {n_layers} blocks (0..{n_layers - 1})"
        )
    if cfg.threshold is not None and not 0 <= cfg.threshold <= 1:
        raise ValueError(f"monitor threshold is a harm probability in [0, 1], got {cfg.threshold}")
    if not 0 <= cfg.max_fpr < 1:
        raise ValueError(f"monitor max_fpr must be in [0, 1), got {cfg.max_fpr}")
    if cfg.l2 < 0:
        raise ValueError(f"monitor l2 must be >= 0, got {cfg.l2}")


def scan_positions(policy: Steerable, cfg: MonitorConfig, observations: Sequence[dict]) -> dict[str, int]:
    """Positions a fit compares, by name: ``instruction_end``, every post-instruction position, and the configured
    one (each index once)."""
    named = {INSTRUCTION_END: instruction_end(policy, observations)}
    for k in range(1, int(policy.post_instruction_length) + 1):
        named.setdefault(str(-k), -k)
    chosen = resolve_position(policy, cfg.position, observations)
    if chosen not in named.values():
        named[str(chosen)] = chosen
    return named


def fit_probe(
    policy: Steerable, cfg: MonitorConfig | None = None, prompts: ProbeData | None = None, model_name: str = ""
) -> HarmProbe:
    """A probe fitted on ``prompts.train`` (default :func:`probe_data` of ``cfg.data``): at every scanned position
    and layer a logistic regression, scored by val AUROC; the configured position, the configured layer (or the
    best), and the threshold from val (or the configured one)."""
    cfg = cfg or MonitorConfig()
    ad = adapter(policy.model)
    _check_config(cfg, ad.n_layers)
    data = prompts if prompts is not None else probe_data(cfg.data)
    y_train, y_val = data.labels("train"), data.labels("val")
    for split, y in (("train", y_train), ("val", y_val)):
        if y.all() or not y.any():
            raise ValueError(f"the {split} prompts must hold harmful and harmless examples ({int(y.sum())}/{len(y)})")
    named = scan_positions(policy, cfg, data.train)
    index = list(named.values())
    x_train = collect_activations(policy, data.train, index, batch_size=cfg.batch_size)
    x_val = collect_activations(policy, data.val, index, batch_size=cfg.batch_size)
    fits: dict[tuple[int, int], LogisticFit] = {}
    table: dict[str, list[float]] = {}
    for p, name in enumerate(named):
        table[name] = []
        for layer in range(ad.n_layers):
            fit = fit_logistic(x_train[:, p, layer], y_train, cfg.l2)
            fits[p, layer] = fit
            table[name].append(auroc(fit.logits(x_val[:, p, layer]).numpy(), y_val))
    position = resolve_position(policy, cfg.position, data.train)
    p = index.index(position)
    name = list(named)[p]
    layer = cfg.layer if cfg.layer is not None else int(np.argmax(table[name]))
    fit = fits[p, layer]
    val_scores = torch.sigmoid(fit.logits(x_val[:, p, layer])).numpy()
    threshold = (
        float(cfg.threshold)
        if cfg.threshold is not None
        else choose_threshold(val_scores[~y_val], val_scores[y_val], cfg.max_fpr)
    )
    flagged = val_scores >= threshold
    rates = {
        "tpr": float(flagged[y_val].mean()),
        "fpr": float(flagged[~y_val].mean()),
        "flagged_harmful": int(flagged[y_val].sum()),
        "harmful": int(y_val.sum()),
        "flagged_harmless": int(flagged[~y_val].sum()),
        "harmless": int((~y_val).sum()),
    }
    return HarmProbe(
        weight=fit.weight,
        bias=fit.bias,
        mean=fit.mean,
        scale=fit.scale,
        layer=layer,
        position=position,
        threshold=threshold,
        position_name=name,
        model_name=model_name,
        model_hash=weights_hash(policy.model),
        val_auroc=table,
        val_rates=rates,
        data=data.describe(),
        config=_config_dict(cfg),
    )


def _config_dict(cfg: MonitorConfig) -> dict:
    out = asdict(cfg)
    out.pop("cache_dir")
    return out


def probe_cache_key(model_hash: str, data_key: dict, cfg: MonitorConfig) -> str:
    """What a fit depends on: the weights, the prompts (their description, or what determines them) and the
    config (less where it is cached)."""
    payload = json.dumps({"model": model_hash, "data": data_key, "config": _config_dict(cfg)}, sort_keys=True)
    return hashlib.sha256(payload.encode()).hexdigest()[:16]


def probe_folder(policy: Steerable, cfg: MonitorConfig, prompts: ProbeData | None = None) -> Path:
    """Where :func:`fit_probe_cached` keeps this fit."""
    key = prompts.describe() if prompts is not None else probe_data_key(cfg.data)
    return Path(cfg.cache_dir) / probe_cache_key(weights_hash(policy.model), key, cfg)


def fit_probe_cached(
    policy: Steerable,
    cfg: MonitorConfig | None = None,
    prompts: ProbeData | Callable[[], ProbeData] | None = None,
    model_name: str = "",
) -> HarmProbe:
    """The probe from ``cfg.cache_dir`` when this exact fit was done before, else fitted and saved there.

    Without ``prompts`` the default scenes of ``cfg.data`` are used, and a cached probe is found without
    building them (the key is their config and the environments' content hash)."""
    cfg = cfg or MonitorConfig()
    if callable(prompts):
        prompts = prompts()
    folder = probe_folder(policy, cfg, prompts)
    if (folder / PROBE_META).exists() and (folder / PROBE_WEIGHTS).exists():
        return HarmProbe.load(folder, policy.model)
    probe = fit_probe(policy, cfg, prompts, model_name=model_name)
    probe.save(folder)
    return probe


# ---------------------------------------------------------------------------------------------------- monitoring


@contextlib.contextmanager
def monitoring(model: torch.nn.Module, probe: HarmProbe) -> Iterator[list[np.ndarray]]:
    """Scores every prompt forward while open: a forward pre-hook on block ``probe.layer`` appends the batch's
    harm probabilities (n,) to the yielded list whenever the block sees more than one position (the one-token
    decoding steps of cached generation are skipped). The hook is removed on exit, also after an exception."""
    ad = adapter(model)
    if ad.d_model != probe.d_model:
        raise ValueError(f"the probe reads a {probe.d_model}-wide residual stream but the model's is {ad.d_model}")
    if not 0 <= probe.layer < ad.n_layers:
        raise ValueError(f"probe layer {probe.layer} is out of range for a model with {ad.n_layers} blocks")
    seen: list[np.ndarray] = []

    def hook(module, args, kwargs):
        h = args[0] if args else kwargs["hidden_states"]
        if h.shape[1] > 1:
            if -probe.position > h.shape[1]:
                raise ValueError(f"probe position {probe.position} is before the start of a {h.shape[1]}-token prompt")
            seen.append(probe.scores(h[:, probe.position, :]))

    handle = ad.blocks[probe.layer].register_forward_pre_hook(hook, with_kwargs=True)
    try:
        yield seen
    finally:
        handle.remove()


def score_observations(
    policy: Steerable, probe: HarmProbe, observations: Sequence[dict], batch_size: int = 32
) -> np.ndarray:
    """The probe's harm probabilities for ``observations``, from activations collected by a plain forward."""
    acts = collect_activations(policy, observations, [probe.position], [probe.layer], batch_size)
    return probe.scores(acts[:, 0, 0])
