"""Refusal directions as in Arditi et al. (2024): difference in means of the residual stream between harmful and
harmless prompts, at every post-instruction position and every layer, then selection by bypass, induce and KL.

Works on anything :class:`Steerable`: a policy (or a chat wrapper) with a supported ``model``, an ``inputs`` method
that turns observations into a left-padded batch, the number of post-instruction tokens its template puts at the end
of every prompt, and the token ids that refusals start with.

Candidates are indexed by ``position`` (negative: -1 is the last prompt token) and ``layer`` (the block whose input
is read). Selection follows the paper's code: for each candidate, the bypass score is the mean refusal score on
harmful validation prompts with the candidate ablated everywhere; the induce score the mean refusal score on harmless
validation prompts with the raw vector added at its layer; the KL is that of the last position's next-token
distribution on harmless validation prompts under ablation. Candidates at layers >= ``int((1 - prune) * n_layers)``,
with KL above the threshold, an induce score below its threshold or any NaN are discarded; the lowest bypass score
wins.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import tempfile
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from embodied.interventions import ablate, actadd, unit
from embodied.models import adapter, weights_hash

ARTIFACT_WEIGHTS = "direction.safetensors"
ARTIFACT_META = "direction.json"


@runtime_checkable
class Steerable(Protocol):
    model: torch.nn.Module

    def inputs(self, observations: list[dict]) -> dict: ...

    @property
    def post_instruction_length(self) -> int: ...

    @property
    def refusal_token_ids(self) -> list[int]: ...


@dataclass
class SelectionConfig:
    """The paper's selection thresholds (its defaults) and the refusal-score filtering of the prompt sets."""

    prune_layer_percentage: float = 0.2
    kl_threshold: float = 0.1
    induce_refusal_threshold: float = 0.0
    filter_train: bool = True
    filter_val: bool = True
    batch_size: int = 32
    layers: list[int] | None = None
    """Score only candidates at these layers (None: every layer, as the paper does). Each candidate costs three
    forwards of the validation sets: on 2 CPU cores about 10 s for smol-planner (30 layers) at 16 + 16 validation
    prompts (measured: 144 candidates in 24 min), so by that rate its 180 take about 30 minutes and about an hour at
    32 + 32; a coarser grid
    (``[2, 4, ..., 22]``) cuts that. Unscored candidates are listed with reason ``not scored``."""
    positions: list[int] | None = None
    """... and at these post-instruction positions (negative, -1 = the last token; None: all of them)."""


@dataclass(frozen=True)
class CandidateScore:
    position: int
    layer: int
    bypass: float
    induce: float
    kl: float
    kept: bool = True
    reason: str = ""


def _batches(items: Sequence, size: int) -> Iterator[list]:
    for start in range(0, len(items), size):
        yield list(items[start : start + size])


def _model_inputs(policy: Steerable, observations: list[dict]) -> dict:
    enc = policy.inputs(observations)
    mask = enc.get("attention_mask")
    if mask is not None and not bool(mask[:, -1].all()):
        raise ValueError(
            "prompts must be left-padded so that the post-instruction tokens end every row "
            "(set the tokenizer's padding_side='left')"
        )
    return enc


@torch.no_grad()
def mean_activations(policy: Steerable, observations: Sequence[dict], batch_size: int = 32) -> torch.Tensor:
    """Mean residual stream entering every block at every post-instruction position: (positions, layers, d_model),
    float64, accumulated batch by batch (activations are summed as they pass, never stored)."""
    if not observations:
        raise ValueError("mean_activations needs at least one observation")
    ad = adapter(policy.model)
    n_pos = int(policy.post_instruction_length)
    total = torch.zeros(n_pos, ad.n_layers, ad.d_model, dtype=torch.float64)
    sums: list[torch.Tensor | None] = [None] * ad.n_layers

    def grab(layer: int):
        def hook(module, args, kwargs):
            h = args[0] if args else kwargs["hidden_states"]
            s = h[:, -n_pos:, :].sum(dim=0, dtype=torch.float64)
            sums[layer] = s if sums[layer] is None else sums[layer] + s

        return hook

    handles = [b.register_forward_pre_hook(grab(i), with_kwargs=True) for i, b in enumerate(ad.blocks)]
    try:
        for chunk in _batches(observations, batch_size):
            # only the last position's logits: the activations are what is wanted, not a vocabulary-wide head
            policy.model(**_model_inputs(policy, chunk), use_cache=False, logits_to_keep=1)
    finally:
        for h in handles:
            h.remove()
    for layer, s in enumerate(sums):
        if s is None or s.shape != (n_pos, ad.d_model):
            raise RuntimeError(f"block {layer} saw no activations of shape ({n_pos}, {ad.d_model}): got {s}")
        total[:, layer] = s.cpu()
    mean = total / len(observations)
    if not torch.isfinite(mean).all():
        raise FloatingPointError("non-finite mean activations: the model produced NaN or inf on these prompts")
    return mean


def candidate_cosines(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Cosine similarity of two models' candidate directions cell by cell: (positions, layers, d_model) twice ->
    (positions, layers), NaN where either candidate is zero (e.g. at the embedding, where post-instruction tokens
    are the same in every prompt)."""
    if a.shape != b.shape:
        raise ValueError(f"candidates differ in shape: {tuple(a.shape)} vs {tuple(b.shape)} (same architecture?)")
    a, b = a.double(), b.double()
    norms = a.norm(dim=-1) * b.norm(dim=-1)
    cos = (a * b).sum(dim=-1) / norms
    return torch.where(norms > 0, cos, torch.full_like(cos, math.nan))


def refusal_score(logits: torch.Tensor, refusal_ids: Sequence[int], eps: float = 1e-8) -> torch.Tensor:
    """Log-odds that the next token starts a refusal: log p(refusal tokens) - log(1 - p(refusal tokens))."""
    probs = torch.softmax(logits.double(), dim=-1)
    p = probs[..., list(refusal_ids)].sum(dim=-1)
    return torch.log(p + eps) - torch.log(1 - p + eps)


@torch.no_grad()
def last_logits(policy: Steerable, observations: Sequence[dict], batch_size: int = 32) -> torch.Tensor:
    """Next-token logits at the last prompt position, float32 on the CPU: (n, vocab)."""
    out = []
    for chunk in _batches(observations, batch_size):
        logits = policy.model(**_model_inputs(policy, chunk), use_cache=False, logits_to_keep=1).logits
        out.append(logits[:, -1, :].float().cpu())
    return torch.cat(out)


def refusal_scores(policy: Steerable, observations: Sequence[dict], batch_size: int = 32) -> torch.Tensor:
    return refusal_score(last_logits(policy, observations, batch_size), policy.refusal_token_ids)


def kl_divergence(p_logits: torch.Tensor, q_logits: torch.Tensor) -> torch.Tensor:
    """KL(P || Q) per row, from logits."""
    p = torch.log_softmax(p_logits.double(), dim=-1)
    q = torch.log_softmax(q_logits.double(), dim=-1)
    return (p.exp() * (p - q)).sum(dim=-1)


def filter_by_refusal(policy: Steerable, harmful: list[dict], harmless: list[dict], batch_size: int = 32):
    """Harmful prompts the model refuses (score > 0) and harmless ones it does not (score < 0), as in the paper."""
    hs = refusal_scores(policy, harmful, batch_size)
    ls = refusal_scores(policy, harmless, batch_size)
    return [o for o, s in zip(harmful, hs, strict=True) if s > 0], [
        o for o, s in zip(harmless, ls, strict=True) if s < 0
    ]


NOT_SCORED = "not scored"


def candidate_cells(n_pos: int, n_layers: int, cfg: SelectionConfig | None = None) -> list[tuple[int, int]]:
    """(position index, layer) of the candidates to score: all of them, or ``cfg.layers`` x ``cfg.positions``."""
    layers = list(range(n_layers)) if cfg is None or cfg.layers is None else list(cfg.layers)
    positions = list(range(-n_pos, 0)) if cfg is None or cfg.positions is None else list(cfg.positions)
    bad_layers = [x for x in layers if not 0 <= x < n_layers]
    bad_positions = [p for p in positions if not -n_pos <= p < 0]
    if bad_layers or bad_positions or not layers or not positions:
        raise ValueError(
            f"selection.layers must be in 0..{n_layers - 1} and selection.positions in -{n_pos}..-1, non-empty "
            f"(got layers {cfg.layers if cfg else None}, positions {cfg.positions if cfg else None})"
        )
    return [(p + n_pos, layer) for p in sorted(set(positions)) for layer in sorted(set(layers))]


def score_candidates(
    policy: Steerable,
    candidates: torch.Tensor,
    harmful_val: list[dict],
    harmless_val: list[dict],
    batch_size: int = 32,
    progress: Callable[[Iterator], Iterator] | None = None,
    cells: list[tuple[int, int]] | None = None,
) -> list[CandidateScore]:
    """Bypass, induce and KL of every candidate (positions x layers), unfiltered; with ``cells`` (position index,
    layer) only those are scored and the others are listed with NaN scores and reason ``not scored``."""
    n_pos, n_layers, _ = candidates.shape
    base = last_logits(policy, harmless_val, batch_size)
    refusal_ids = policy.refusal_token_ids
    every = [(p, layer) for p in range(n_pos) for layer in range(n_layers)]
    todo = set(every if cells is None else cells)
    scored: dict[tuple[int, int], CandidateScore] = {}
    ordered = [c for c in every if c in todo]
    for p, layer in progress(ordered) if progress else ordered:
        vector = candidates[p, layer].float()
        if not torch.isfinite(vector).all() or vector.norm() == 0:
            scored[p, layer] = CandidateScore(p - n_pos, layer, math.nan, math.nan, math.nan)
            continue
        with ablate(policy.model, vector):
            bypass = refusal_score(last_logits(policy, harmful_val, batch_size), refusal_ids).mean().item()
            kl = kl_divergence(base, last_logits(policy, harmless_val, batch_size)).mean().item()
        with actadd(policy.model, vector, layer=layer, coeff=1.0):
            induce = refusal_score(last_logits(policy, harmless_val, batch_size), refusal_ids).mean().item()
        scored[p, layer] = CandidateScore(p - n_pos, layer, bypass, induce, kl)
    skipped = dict(bypass=math.nan, induce=math.nan, kl=math.nan, kept=False, reason=NOT_SCORED)
    return [scored.get(c) or CandidateScore(c[0] - n_pos, c[1], **skipped) for c in every]


def apply_filters(scores: list[CandidateScore], n_layers: int, cfg: SelectionConfig) -> list[CandidateScore]:
    """Each score with ``kept`` and, when discarded, the first reason why (the paper's filters, in its order)."""
    max_layer = int(n_layers * (1.0 - cfg.prune_layer_percentage))
    out = []
    for s in scores:
        reason = ""
        if s.reason == NOT_SCORED:
            reason = NOT_SCORED
        elif any(math.isnan(v) for v in (s.bypass, s.induce, s.kl)):
            reason = "nan"
        elif s.layer >= max_layer:
            reason = f"layer >= {max_layer}"
        elif s.kl > cfg.kl_threshold:
            reason = f"kl > {cfg.kl_threshold}"
        elif s.induce < cfg.induce_refusal_threshold:
            reason = f"induce < {cfg.induce_refusal_threshold}"
        out.append(CandidateScore(s.position, s.layer, s.bypass, s.induce, s.kl, kept=not reason, reason=reason))
    return out


class NoDirectionError(ValueError):
    """Every candidate was filtered out; ``scores`` holds them all, with the reasons."""

    def __init__(self, scores: list[CandidateScore]):
        self.scores = scores
        best = sorted((s for s in scores if not math.isnan(s.bypass)), key=lambda s: s.bypass)[:5]
        lines = "; ".join(f"pos {s.position} layer {s.layer}: bypass {s.bypass:.2f}, {s.reason}" for s in best)
        super().__init__(
            f"every candidate direction was filtered out (lowest bypass: {lines}); the model's refusal may not be "
            "mediated by one direction, or the thresholds (selection.*) are too strict for it"
        )


def select(scores: list[CandidateScore], n_layers: int, cfg: SelectionConfig) -> CandidateScore:
    """The kept candidate with the lowest bypass score; :class:`NoDirectionError` if none is kept."""
    judged = apply_filters(scores, n_layers, cfg)
    kept = sorted((s for s in judged if s.kept), key=lambda s: s.bypass)
    if not kept:
        raise NoDirectionError(judged)
    return kept[0]


ALL_LAYERS = SelectionConfig(prune_layer_percentage=0.0)
"""The repo's ``direction=all_layers`` selection: the paper's, without its layer filter."""


def _restrict(candidates: torch.Tensor, layer: int | None, position: int | None) -> torch.Tensor:
    """The candidates with every cell outside (``position``, ``layer``) zeroed (scored NaN, never selected)."""
    n_pos, n_layers, _ = candidates.shape
    if layer is not None and not 0 <= layer < n_layers:
        raise ValueError(f"layer {layer} is out of range for a model with {n_layers} blocks")
    if position is not None and not -n_pos <= position < 0:
        raise ValueError(f"position {position} is out of range: the template has {n_pos} post-instruction tokens")
    keep = torch.zeros(n_pos, n_layers, 1, dtype=torch.bool)
    keep[slice(None) if position is None else position + n_pos, slice(None) if layer is None else layer] = True
    return torch.where(keep, candidates, torch.zeros(()))


@dataclass(frozen=True)
class Selection:
    """A direction chosen from the candidates, with every candidate's scores (filter reasons included)."""

    vector: torch.Tensor
    """The raw difference in means at the chosen candidate (d_model,), float32."""
    score: CandidateScore
    how: str
    """``selected`` (passed the repo's filters) or ``lowest bypass`` (none passed; the strongest one was taken)."""
    scores: list[CandidateScore]
    candidates: torch.Tensor
    """Every candidate (positions, layers, d_model), float32, unrestricted by ``layer`` / ``position``."""


def select_direction(
    policy,
    harmful: list[dict],
    harmless: list[dict],
    harmful_val: list[dict],
    harmless_val: list[dict],
    selection: SelectionConfig | None = None,
    layer: int | None = None,
    position: int | None = None,
    batch_size: int = 32,
    progress: Callable[[Iterator], Iterator] | None = None,
) -> Selection:
    """The refusal direction of ``policy``'s model now: difference in means of ``harmful`` and ``harmless`` at
    every (position, layer), chosen by ``selection`` (default :data:`ALL_LAYERS`) on the validation prompts (no
    refusal filtering: early in
    training the model may refuse nothing). When no candidate passes the filters, the one with the lowest bypass
    score is taken: the strongest single-direction ablation among them."""
    selection = selection or ALL_LAYERS
    every = mean_activations(policy, harmful, batch_size) - mean_activations(policy, harmless, batch_size)
    candidates = _restrict(every, layer, position)
    n_pos, n_layers, _ = candidates.shape
    cells = candidate_cells(n_pos, n_layers, selection)
    scores = apply_filters(
        score_candidates(policy, candidates, harmful_val, harmless_val, batch_size, progress, cells),
        n_layers,
        selection,
    )
    try:
        best, how = select(scores, n_layers, selection), "selected"
    except NoDirectionError:
        finite = [s for s in scores if not math.isnan(s.bypass)]
        if not finite:
            raise
        best, how = min(finite, key=lambda s: s.bypass), "lowest bypass"
    return Selection(candidates[best.position + n_pos, best.layer].float(), best, how, scores, every.float())


def _hash_into(h, value: Any) -> None:
    if isinstance(value, dict):
        for k in sorted(value):
            h.update(str(k).encode())
            _hash_into(h, value[k])
    elif isinstance(value, np.ndarray | torch.Tensor):
        arr = np.ascontiguousarray(value.detach().cpu().numpy() if isinstance(value, torch.Tensor) else value)
        h.update(f"{arr.dtype}{arr.shape}".encode())
        h.update(arr.tobytes())
    else:
        h.update(json.dumps(value, sort_keys=True, default=str).encode())


def data_hash(observations: Sequence[dict]) -> str:
    """SHA-256 of every field of every prompt (instruction, image, layout, ...), so that an artifact names exactly
    what it was built from."""
    h = hashlib.sha256()
    for o in observations:
        _hash_into(h, o)
    return h.hexdigest()


@dataclass
class DirectionArtifact:
    """A selected refusal direction with everything needed to trust and reuse it."""

    direction: torch.Tensor
    """Unit vector (d_model,), float32."""
    vector: torch.Tensor
    """The raw difference in means at the chosen candidate (d_model,), float32: what actadd adds."""
    layer: int
    position: int
    model_name: str
    model_hash: str
    data: dict[str, Any] = field(default_factory=dict)
    """Per prompt set: its source, size and hash."""
    scores: list[CandidateScore] = field(default_factory=list)
    config: dict[str, Any] = field(default_factory=dict)
    candidates: torch.Tensor | None = None
    """Every candidate (positions, layers, d_model), float32, for analyses beyond the chosen one."""

    @property
    def chosen(self) -> CandidateScore:
        return next(s for s in self.scores if s.layer == self.layer and s.position == self.position)

    def save(self, path: str | os.PathLike) -> Path:
        """Writes ``direction.safetensors`` and ``direction.json`` into ``path`` (atomically, each)."""
        tensors = {"direction": self.direction.float(), "vector": self.vector.float()}
        if self.candidates is not None:
            tensors["candidates"] = self.candidates.float()
        meta = {
            "layer": self.layer,
            "position": self.position,
            "model_name": self.model_name,
            "model_hash": self.model_hash,
            "direction_hash": _tensor_hash(self.direction),
            "data": self.data,
            "config": self.config,
            "scores": [asdict(s) for s in self.scores],
        }
        return save_artifact(Path(path), tensors, ARTIFACT_WEIGHTS, meta, ARTIFACT_META)

    @classmethod
    def load(cls, path: str | os.PathLike, model: torch.nn.Module | None = None) -> DirectionArtifact:
        """The artifact at ``path``; with ``model``, checks that it was extracted from exactly these weights."""
        meta, tensors = load_artifact(
            Path(path), ARTIFACT_WEIGHTS, ARTIFACT_META, "direction artifact", "re-extract it for this model", model
        )
        return cls(
            direction=tensors["direction"],
            vector=tensors["vector"],
            layer=int(meta["layer"]),
            position=int(meta["position"]),
            model_name=meta["model_name"],
            model_hash=meta["model_hash"],
            data=meta.get("data", {}),
            scores=[CandidateScore(**s) for s in meta.get("scores", [])],
            config=meta.get("config", {}),
            candidates=tensors.get("candidates"),
        )

    @property
    def hash(self) -> str:
        return _tensor_hash(self.direction)

    def candidate(self, layer: int | None = None, position: int | None = None) -> DirectionArtifact:
        """The same artifact with the candidate at (``position``, ``layer``) as its direction (None: the chosen)."""
        layer = self.layer if layer is None else int(layer)
        position = self.position if position is None else int(position)
        if (layer, position) == (self.layer, self.position):
            return self
        if self.candidates is None:
            raise ValueError("this artifact stores no candidates; re-extract it to pick another layer or position")
        n_pos, n_layers, _ = self.candidates.shape
        if not (0 <= layer < n_layers and -n_pos <= position < 0):
            raise ValueError(
                f"no candidate at position {position}, layer {layer} (positions -{n_pos}..-1, layers 0..{n_layers - 1})"
            )
        vector = self.candidates[position + n_pos, layer].float()
        return replace(self, direction=unit(vector, vector.numel()), vector=vector, layer=layer, position=position)


def _tensor_hash(t: torch.Tensor) -> str:
    return hashlib.sha256(t.detach().float().cpu().contiguous().numpy().tobytes()).hexdigest()


def write_json_atomic(path: Path, obj: Any) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(obj, f, indent=2, allow_nan=True)
            f.write("\n")
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def save_artifact(path: Path, tensors: dict[str, torch.Tensor], weights_name: str, meta: dict, meta_name: str) -> Path:
    """Writes ``tensors`` as safetensors and ``meta`` as JSON into the folder ``path`` (atomically, each)."""
    path.mkdir(parents=True, exist_ok=True)
    tmp = path / f".{weights_name}.tmp"
    save_file({k: t.contiguous() for k, t in tensors.items()}, str(tmp))
    os.replace(tmp, path / weights_name)
    write_json_atomic(path / meta_name, meta)
    return path


def load_artifact(
    path: Path, weights_name: str, meta_name: str, what: str, fix: str, model: torch.nn.Module | None = None
) -> tuple[dict, dict[str, torch.Tensor]]:
    """(meta, tensors) of what :func:`save_artifact` wrote into ``path``, safetensors only. With ``model``, checks
    that the artifact's ``model_hash`` is that of exactly these weights; ``what`` names the artifact in errors
    (e.g. "harm probe") and ``fix`` says what to do when the weights differ (e.g. "fit it for this model")."""
    meta_path, weights_path = path / meta_name, path / weights_name
    if not meta_path.exists() or not weights_path.exists():
        raise FileNotFoundError(f"no {what} at {path} (expected {meta_name} and {weights_name})")
    meta = json.loads(meta_path.read_text())
    if model is not None:
        actual = weights_hash(model)
        if actual != meta["model_hash"]:
            raise ValueError(
                f"{what} at {path} was made from weights {meta['model_hash'][:12]} ({meta.get('model_name', '')}), "
                f"not from the given model ({actual[:12]}): {fix}"
            )
    return meta, load_file(str(weights_path))


@dataclass(frozen=True)
class PromptSets:
    """The four prompt sets of an extraction, with where each came from."""

    harmful_train: list[dict]
    harmless_train: list[dict]
    harmful_val: list[dict]
    harmless_val: list[dict]
    sources: dict[str, str] = field(default_factory=dict)

    def describe(self) -> dict[str, Any]:
        sets = {
            "harmful_train": self.harmful_train,
            "harmless_train": self.harmless_train,
            "harmful_val": self.harmful_val,
            "harmless_val": self.harmless_val,
        }
        return {k: {"source": self.sources.get(k, ""), "size": len(v), "hash": data_hash(v)} for k, v in sets.items()}


def extract(
    policy: Steerable,
    prompts: PromptSets,
    cfg: SelectionConfig | None = None,
    model_name: str = "",
    progress: Callable[[Iterator], Iterator] | None = None,
) -> DirectionArtifact:
    """Candidates from the train sets, selection on the validation sets (each filtered by refusal score if asked)."""
    cfg = cfg or SelectionConfig()
    bs = cfg.batch_size
    cells = candidate_cells(int(policy.post_instruction_length), adapter(policy.model).n_layers, cfg)  # fail early
    harmful_train, harmless_train = prompts.harmful_train, prompts.harmless_train
    harmful_val, harmless_val = prompts.harmful_val, prompts.harmless_val
    data = prompts.describe()
    if cfg.filter_train:
        harmful_train, harmless_train = filter_by_refusal(policy, harmful_train, harmless_train, bs)
        data["harmful_train"]["kept"], data["harmless_train"]["kept"] = len(harmful_train), len(harmless_train)
    if cfg.filter_val:
        harmful_val, harmless_val = filter_by_refusal(policy, harmful_val, harmless_val, bs)
        data["harmful_val"]["kept"], data["harmless_val"]["kept"] = len(harmful_val), len(harmless_val)
    for name, items in (
        ("harmful_train", harmful_train),
        ("harmless_train", harmless_train),
        ("harmful_val", harmful_val),
        ("harmless_val", harmless_val),
    ):
        if not items:
            raise ValueError(
                f"no {name} prompts left after filtering by refusal score: the model does not refuse (or refuses "
                "everything); set filter_train/filter_val false or use a model that refuses"
            )
    candidates = mean_activations(policy, harmful_train, bs) - mean_activations(policy, harmless_train, bs)
    n_layers = candidates.shape[1]
    scores = apply_filters(
        score_candidates(policy, candidates, harmful_val, harmless_val, bs, progress, cells), n_layers, cfg
    )
    best = select(scores, n_layers, cfg)
    vector = candidates[best.position + candidates.shape[0], best.layer].float()
    return DirectionArtifact(
        direction=unit(vector, vector.numel()),
        vector=vector,
        layer=best.layer,
        position=best.position,
        model_name=model_name,
        model_hash=weights_hash(policy.model),
        data=data,
        scores=scores,
        config=asdict(cfg),
        candidates=candidates.float(),
    )


def cache_key(model_hash: str, prompts: PromptSets | dict, cfg: SelectionConfig) -> str:
    """What an extraction depends on: the weights, the prompts (the sets, or a description that determines them)
    and the selection config."""
    data = prompts.describe() if isinstance(prompts, PromptSets) else prompts
    payload = json.dumps({"model": model_hash, "data": data, "config": asdict(cfg)}, sort_keys=True)
    return hashlib.sha256(payload.encode()).hexdigest()[:16]


def extract_cached(
    policy: Steerable,
    prompts: PromptSets | Callable[[], PromptSets],
    cache_dir: str | os.PathLike,
    cfg: SelectionConfig | None = None,
    model_name: str = "",
    progress: Callable[[Iterator], Iterator] | None = None,
    prompts_key: dict | None = None,
) -> tuple[DirectionArtifact, Path, bool]:
    """The artifact from ``cache_dir`` when this exact extraction was done before, else extracted and saved there.
    Returns (artifact, its folder, whether it came from the cache).

    ``prompts`` may be a function that builds the sets; with ``prompts_key`` (a description that determines them,
    e.g. their config and the hashes of their sources) a cached artifact is found without building them."""
    cfg = cfg or SelectionConfig()
    if prompts_key is None and callable(prompts):
        prompts = prompts()
    key = prompts_key if prompts_key is not None else prompts
    folder = Path(cache_dir) / cache_key(weights_hash(policy.model), key, cfg)
    if (folder / ARTIFACT_META).exists() and (folder / ARTIFACT_WEIGHTS).exists():
        return DirectionArtifact.load(folder, policy.model), folder, True
    sets = prompts() if callable(prompts) else prompts
    artifact = extract(policy, sets, cfg, model_name=model_name, progress=progress)
    artifact.save(folder)
    return artifact, folder, False
