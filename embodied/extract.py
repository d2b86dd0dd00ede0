"""``embodied-extract``: select a policy's refusal direction (Arditi et al. 2024) and write it as an artifact.

    embodied-extract                                         # tiny-vla, prompts from the environments
    embodied-extract policy.path=tiny-vla-base
    embodied-extract policy.kind=hf_chat policy.path=smollm2 prompts.source=files \\
        prompts.harmful=harmful.txt prompts.harmless=harmless.txt selection.filter_train=false

Writes ``direction.safetensors`` and ``direction.json`` into ``out`` (default: Hydra's run directory) and keeps a copy
in ``cache_dir`` keyed by the weights, the prompts and the selection config, so a sweep that asks again reuses it.
Prints the chosen (position, layer) and the best candidates.
"""

from __future__ import annotations

import functools
import hashlib
import math
import shutil
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path

import hydra
import torch
from hydra.core.config_store import ConfigStore
from omegaconf import OmegaConf
from rich.console import Console
from rich.table import Table
from tqdm.auto import tqdm

import envs
from embodied.cli import output_dir
from embodied.directions import (
    ALL_LAYERS,
    ARTIFACT_META,
    ARTIFACT_WEIGHTS,
    CandidateScore,
    DirectionArtifact,
    NoDirectionError,
    PromptSets,
    SelectionConfig,
    cache_key,
    candidate_cosines,
    extract_cached,
    mean_activations,
    select_direction,
    write_json_atomic,
)
from embodied.loading import PolicyConfig, load_policy
from embodied.models import weights_hash
from embodied.prompts import EXTRACT_SEED, env_prompt_sets, file_prompt_sets


@dataclass
class PromptConfig:
    source: str = "env"
    """``env``: instructions posed in seeded scenes of the environments (train split for the means, val split for
    selection); ``files``: the ``harmful`` and ``harmless`` instruction files."""
    harmful: str | None = None
    harmless: str | None = None
    n_train: int = 128
    n_val: int = 32
    seed: int = EXTRACT_SEED
    image_size: int = 64


@dataclass
class ExtractConfig:
    policy: PolicyConfig = field(default_factory=PolicyConfig)
    prompts: PromptConfig = field(default_factory=PromptConfig)
    selection: SelectionConfig = field(default_factory=SelectionConfig)
    out: str | None = None
    """Artifact folder (None: Hydra's run directory)."""
    cache_dir: str = ".cache/embodied/directions"
    top: int = 10
    """How many candidates the printed table shows."""
    strongest: bool = False
    """When no candidate passes the filters, take the one with the lowest bypass score on the unfiltered prompts
    (:func:`strongest_direction`, as ``direction.strongest`` does for runs) instead of failing."""
    compare_with: str | None = None
    """Another checkpoint of the same kind and architecture (e.g. the policy before safety tuning,
    ``smol-planner-base``): its difference in means on the same train prompts (unfiltered, for both models) is
    compared with this policy's, layer by layer at the chosen position; written to ``comparison.json``."""
    threads: int | None = None
    progress: bool = True


ConfigStore.instance().store(name="extract_schema", node=ExtractConfig)


def prompt_sets(cfg: PromptConfig) -> PromptSets:
    if cfg.source == "env":
        return env_prompt_sets(cfg.n_train, cfg.n_val, cfg.seed, cfg.image_size)
    if cfg.source == "files":
        if not cfg.harmful or not cfg.harmless:
            raise ValueError("prompts.source=files needs prompts.harmful and prompts.harmless (instruction files)")
        return file_prompt_sets(cfg.harmful, cfg.harmless, cfg.n_train, cfg.n_val, cfg.seed)
    raise ValueError(f"prompts.source must be 'env' or 'files', got {cfg.source!r}")


def lazy_prompt_sets(cfg: PromptConfig) -> Callable[[], PromptSets]:
    """``prompt_sets(cfg)`` built on the first call and returned again after (building the environments' sets
    renders every scene: about 30 s at the defaults), for the steps of one run that all read the same sets."""
    return functools.cache(functools.partial(prompt_sets, cfg))


def _envs_fingerprint() -> str:
    """SHA-256 of the environments package's code and data: env prompt sets are a function of these and the seeds."""
    root = Path(envs.__file__).parent
    h = hashlib.sha256()
    for f in sorted([*root.rglob("*.py"), *root.rglob("*.json")]):
        h.update(str(f.relative_to(root)).encode())
        h.update(f.read_bytes())
    return h.hexdigest()


def prompt_key(cfg: PromptConfig) -> dict:
    """What determines ``prompt_sets(cfg)``: the config and the content hashes of its sources (the environments'
    code and instruction data for ``env``, the two files for ``files``), so that a cached direction is found
    without building the sets."""
    if cfg.source == "files":
        sources = [hashlib.sha256(Path(p).read_bytes()).hexdigest() for p in (cfg.harmful, cfg.harmless) if p]
    else:
        sources = [_envs_fingerprint()]
    return {"prompts": asdict(cfg), "sources": sources}


DIRECTIONS_CACHE = ".cache/embodied/directions"
"""Where extracted directions are kept (shared, keyed by weights, prompts and selection)."""


def strongest_folder(policy, prompts: PromptConfig, selection: SelectionConfig, cache_dir: str | Path) -> Path:
    """Where the lowest-bypass fallback of this extraction is cached. It is written only when the extraction
    found no direction, so its presence also says that the (deterministic) extraction need not be tried again."""
    return Path(cache_dir) / f"{cache_key(weights_hash(policy.model), prompt_key(prompts), selection)}-strongest"


def lowest_bypass_direction(
    policy,
    name: str,
    prompts: PromptConfig,
    selection: SelectionConfig,
    cache_dir: str | Path,
    reason: str,
    build_sets: Callable[[], PromptSets] | None = None,
    progress: Callable[[Iterator], Iterator] | None = None,
) -> tuple[DirectionArtifact, str]:
    """After an extraction found no direction (``reason``): the candidate with the lowest bypass score on the
    unfiltered prompts, cached in :func:`strongest_folder`; with how it was chosen (``lowest bypass``, or
    ``selected`` if the unfiltered prompts let one pass). ``build_sets`` returns the prompt sets of ``prompts``
    when the caller holds them already (:func:`lazy_prompt_sets`; default: built here)."""
    folder = strongest_folder(policy, prompts, selection, cache_dir)
    if (folder / ARTIFACT_META).exists() and (folder / ARTIFACT_WEIGHTS).exists():
        return DirectionArtifact.load(folder, policy.model), "lowest bypass"
    sets = build_sets() if build_sets is not None else prompt_sets(prompts)
    chosen = select_direction(
        policy,
        sets.harmful_train,
        sets.harmless_train,
        sets.harmful_val,
        sets.harmless_val,
        selection,
        batch_size=selection.batch_size,
        progress=progress,
    )
    artifact = DirectionArtifact(
        direction=chosen.vector / chosen.vector.norm(),
        vector=chosen.vector,
        layer=chosen.score.layer,
        position=chosen.score.position,
        model_name=name,
        model_hash=weights_hash(policy.model),
        data=sets.describe(),
        scores=chosen.scores,
        config={**asdict(selection), "filter_train": False, "filter_val": False, "fallback": reason[:300]},
        candidates=chosen.candidates,
    )
    artifact.save(folder)
    return artifact, chosen.how


def strongest_direction(
    policy,
    name: str,
    prompts: PromptConfig | None = None,
    selection: SelectionConfig = ALL_LAYERS,
    cache_dir: str | Path = DIRECTIONS_CACHE,
) -> tuple[DirectionArtifact, str]:
    """``policy``'s refusal direction as :func:`embodied.directions.extract_cached` selects it, and ``selected``;
    when no candidate passes the filters (or nothing is refused), the candidate with the lowest bypass score on the
    unfiltered prompts, the strongest single-direction ablation there is (what an attacker would take), and
    ``lowest bypass``: its artifact records why in ``config["fallback"]``, and every candidate's scores. Both are
    cached in ``cache_dir``, and a cached fallback is returned without trying the extraction again."""
    prompts = prompts or PromptConfig()
    folder = strongest_folder(policy, prompts, selection, cache_dir)
    if (folder / ARTIFACT_META).exists() and (folder / ARTIFACT_WEIGHTS).exists():
        return DirectionArtifact.load(folder, policy.model), "lowest bypass"
    build_sets = lazy_prompt_sets(prompts)
    try:
        artifact, _, _ = extract_cached(
            policy, build_sets, cache_dir, selection, model_name=name, prompts_key=prompt_key(prompts)
        )
        return artifact, "selected"
    except ValueError as e:  # NoDirectionError, or nothing left after filtering by refusal
        return lowest_bypass_direction(policy, name, prompts, selection, cache_dir, str(e), build_sets)


def candidates_table(scores: list[CandidateScore], title: str, chosen: tuple[int, int] | None, top: int) -> Table:
    """The ``top`` candidates, kept ones first, each group by lowest bypass score."""
    table = Table(title=title)
    for col in ("position", "layer", "bypass", "induce", "KL", "kept"):
        table.add_column(col, justify="right")
    ranked = sorted(scores, key=lambda s: (not s.kept, s.bypass if s.bypass == s.bypass else float("inf")))
    for s in ranked[:top]:
        kept = ("chosen" if (s.position, s.layer) == chosen else "yes") if s.kept else s.reason
        table.add_row(str(s.position), str(s.layer), f"{s.bypass:.3f}", f"{s.induce:.3f}", f"{s.kl:.4f}", kept)
    return table


def run(cfg: ExtractConfig, out: Path) -> DirectionArtifact:
    """Extracts (or takes from the cache) and copies the artifact to ``out``. When no candidate survives the
    filters, writes every candidate's scores to ``out/candidates.json`` and raises :class:`NoDirectionError`, or
    with ``strongest`` takes the lowest-bypass candidate instead. With ``compare_with``, also compares the
    direction with that checkpoint's (``comparison.json``)."""
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    policy = load_policy(cfg.policy)
    name = cfg.policy.name or cfg.policy.path
    progress = (lambda it: tqdm(it, desc="candidates", dynamic_ncols=True)) if cfg.progress else None
    console = Console()
    out.mkdir(parents=True, exist_ok=True)
    how = "selected"
    build_sets = lazy_prompt_sets(cfg.prompts)  # built at most once, by the first step that needs them
    fallback = strongest_folder(policy, cfg.prompts, cfg.selection, cfg.cache_dir)
    if cfg.strongest and (fallback / ARTIFACT_META).exists() and (fallback / ARTIFACT_WEIGHTS).exists():
        # this extraction failed before: its fallback is cached, and trying again would fail the same way
        artifact, folder, cached, how = DirectionArtifact.load(fallback, policy.model), fallback, True, "lowest bypass"
    else:
        try:
            artifact, folder, cached = extract_cached(
                policy,
                build_sets,
                cfg.cache_dir,
                cfg.selection,
                model_name=name,
                progress=progress,
                prompts_key=prompt_key(cfg.prompts),
            )
        except ValueError as e:  # NoDirectionError, or no prompts left after filtering by refusal score
            if not cfg.strongest:
                _report_failure(e, out, name, console, cfg.top)
                raise
            artifact, how = lowest_bypass_direction(
                policy, name, cfg.prompts, cfg.selection, cfg.cache_dir, str(e), build_sets, progress
            )
            folder, cached = out, False
            artifact.save(out)
    if folder.resolve() != out.resolve():
        for f in (ARTIFACT_WEIGHTS, ARTIFACT_META):
            shutil.copyfile(folder / f, out / f)
    chosen = (artifact.position, artifact.layer)
    title = f"refusal direction candidates of {name} (kept first, lowest bypass first; {how})"
    console.print(candidates_table(artifact.scores, title, chosen, cfg.top))
    c = artifact.chosen
    console.print(
        f"chosen: position {artifact.position}, layer {artifact.layer} (bypass {c.bypass:.3f}, induce {c.induce:.3f},"
        f" KL {c.kl:.4f}){' [from cache]' if cached else ''} -> {out}"
    )
    if cfg.compare_with:
        other = load_policy(PolicyConfig(**{**asdict(cfg.policy), "path": cfg.compare_with, "name": None}))
        result = compare_directions(policy, other, artifact, build_sets(), cfg.selection.batch_size)
        result = {"policy": name, "other": cfg.compare_with, **result}
        write_json_atomic(out / "comparison.json", result)
        console.print(comparison_table(result, name, cfg.compare_with))
        console.print(f"cosine at the chosen candidate: {result['cosine']} -> {out / 'comparison.json'}")
    return artifact


def _report_failure(e: Exception, out: Path, name: str, console: Console, top: int) -> None:
    if isinstance(e, NoDirectionError):
        write_json_atomic(out / "candidates.json", {"model_name": name, "scores": [asdict(s) for s in e.scores]})
        console.print(candidates_table(e.scores, f"refusal direction candidates of {name}: none kept", None, top))


def compare_directions(policy, other, artifact: DirectionArtifact, sets: PromptSets, batch_size: int = 32) -> dict:
    """How ``other``'s candidate directions relate to ``policy``'s on the same (unfiltered) train prompts: the
    cosine at the artifact's cell, per layer at its position, and the norms there. The question it answers for a
    base and its safety-tuned twin: did safety tuning write a new direction, or reuse one the base already had?"""

    def candidates(p):
        return mean_activations(p, sets.harmful_train, batch_size) - mean_activations(
            p, sets.harmless_train, batch_size
        )

    mine, theirs = candidates(policy), candidates(other)
    cos = candidate_cosines(mine, theirs)
    n_pos = mine.shape[0]
    row = artifact.position + n_pos

    def num(x: torch.Tensor) -> float | None:
        v = float(x)
        return None if math.isnan(v) else round(v, 4)

    return {
        "position": artifact.position,
        "layer": artifact.layer,
        "cosine": num(cos[row, artifact.layer]),
        "norm": num(mine[row, artifact.layer].norm()),
        "other_norm": num(theirs[row, artifact.layer].norm()),
        "per_layer": [
            {
                "layer": layer,
                "cosine": num(cos[row, layer]),
                "norm": num(mine[row, layer].norm()),
                "other_norm": num(theirs[row, layer].norm()),
            }
            for layer in range(mine.shape[1])
        ],
        "prompts": {k: v["size"] for k, v in sets.describe().items() if k.endswith("_train")},
    }


def comparison_table(result: dict, name: str, other: str) -> Table:
    table = Table(title=f"difference in means of {name} vs {other} at position {result['position']}")
    for col in ("layer", "cosine", f"|{name}|", f"|{other}|"):
        table.add_column(col, justify="right")
    for r in result["per_layer"]:
        mark = " <- chosen" if r["layer"] == result["layer"] else ""
        cells = [f"{r[k]:.3f}" if r[k] is not None else "-" for k in ("cosine", "norm", "other_norm")]
        table.add_row(f"{r['layer']}{mark}", *cells)
    return table


@hydra.main(version_base="1.3", config_path="../conf", config_name="extract")
def main(cfg) -> None:
    cfg_obj: ExtractConfig = OmegaConf.to_object(cfg)
    out = output_dir(cfg_obj.out or None)
    try:
        run(cfg_obj, out)
    except NoDirectionError as e:
        raise SystemExit(f"embodied-extract: {e} (all scores: {out / 'candidates.json'})") from None


if __name__ == "__main__":
    main()
