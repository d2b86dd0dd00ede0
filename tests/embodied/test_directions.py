import math

import numpy as np
import pytest
import torch

from embodied.directions import (
    NOT_SCORED,
    CandidateScore,
    DirectionArtifact,
    NoDirectionError,
    PromptSets,
    SelectionConfig,
    apply_filters,
    extract,
    extract_cached,
    kl_divergence,
    mean_activations,
    refusal_score,
    score_candidates,
    select,
)
from embodied.models import weights_hash
from tests.embodied import tiny_models as tm

SUFFIX = [7, 8, 9]  # the "post-instruction" tokens every prompt ends with
REFUSE = 11


class TokenPrompts:
    """A Steerable over a tiny random LM: observations hold token ids; prompts are left-padded, then the suffix."""

    def __init__(self, model):
        self.model = model

    @property
    def post_instruction_length(self) -> int:
        return len(SUFFIX)

    @property
    def refusal_token_ids(self) -> list[int]:
        return [REFUSE]

    def inputs(self, observations):
        rows = [list(o["ids"]) + SUFFIX for o in observations]
        n = max(map(len, rows))
        ids = torch.tensor([[0] * (n - len(r)) + r for r in rows])
        mask = torch.tensor([[0] * (n - len(r)) + [1] * len(r) for r in rows])
        return {"input_ids": ids, "attention_mask": mask}


def token_sets(seed: int = 0) -> PromptSets:
    g = torch.Generator().manual_seed(seed)

    def prompts(marker: int, n: int):
        return [
            {
                "ids": [
                    marker,
                    *torch.randint(20, 90, (int(torch.randint(2, 6, (1,), generator=g)),), generator=g).tolist(),
                ]
            }
            for _ in range(n)
        ]

    return PromptSets(prompts(3, 12), prompts(4, 12), prompts(3, 6), prompts(4, 6), sources={"harmful_train": "test"})


def test_refusal_score_is_the_log_odds_of_the_refusal_tokens():
    logits = torch.log(torch.tensor([[0.2, 0.3, 0.5], [0.7, 0.2, 0.1]]))
    s = refusal_score(logits, [0, 1])
    assert s[0].item() == pytest.approx(math.log(0.5 / 0.5), abs=1e-6)
    assert s[1].item() == pytest.approx(math.log(0.9 / 0.1), abs=1e-5)


def test_kl_divergence_is_zero_for_equal_and_positive_for_different_distributions():
    a = torch.randn(3, 10)
    assert torch.allclose(kl_divergence(a, a), torch.zeros(3, dtype=torch.float64), atol=1e-12)
    assert (kl_divergence(a, a.flip(-1)) > 0).all()


def test_mean_activations_stream_the_block_inputs_at_post_instruction_positions():
    model = tm.build("llama")
    steer = TokenPrompts(model)
    obs = token_sets().harmful_train
    mean = mean_activations(steer, obs, batch_size=5)
    assert mean.shape == (3, 3, 32) and mean.dtype == torch.float64
    with torch.no_grad():
        hidden = model(**steer.inputs(obs), output_hidden_states=True).hidden_states
    # hidden_states[i] is the input of block i (for i < n_layers)
    expected = torch.stack([hidden[i][:, -3:, :].double().mean(0) for i in range(3)], dim=1)
    torch.testing.assert_close(mean, expected, atol=1e-5, rtol=0)
    torch.testing.assert_close(mean_activations(steer, obs, batch_size=12), mean, atol=1e-5, rtol=0)


def test_right_padded_prompts_are_rejected():
    steer = TokenPrompts(tm.build("llama"))
    right = {"input_ids": torch.tensor([[5, 6, 0]]), "attention_mask": torch.tensor([[1, 1, 0]])}
    steer.inputs = lambda observations: right
    with pytest.raises(ValueError, match="left-padded"):
        mean_activations(steer, [{"ids": [5]}])


def score(pos, layer, bypass, induce=1.0, kl=0.01):
    return CandidateScore(pos, layer, bypass, induce, kl)


def test_selection_applies_the_papers_filters_and_takes_the_lowest_bypass():
    scores = [
        score(-1, 8, -9.0),  # layer 8 >= int(0.8 * 10): pruned
        score(-1, 2, -8.0, kl=0.5),  # KL too high
        score(-2, 3, -7.0, induce=-0.1),  # does not induce refusal
        score(-2, 4, math.nan),  # NaN
        score(-1, 5, -2.0),
        score(-3, 1, -3.0),
    ]
    cfg = SelectionConfig()
    judged = apply_filters(scores, n_layers=10, cfg=cfg)
    assert [s.reason for s in judged[:4]] == ["layer >= 8", "kl > 0.1", "induce < 0.0", "nan"]
    best = select(scores, 10, cfg)
    assert (best.position, best.layer, best.bypass) == (-3, 1, -3.0)
    assert select(scores, 10, SelectionConfig(kl_threshold=1.0)).layer == 2
    with pytest.raises(NoDirectionError, match="every candidate direction was filtered out") as err:
        select(scores[:4], 10, cfg)
    assert len(err.value.scores) == 4


def test_extraction_writes_an_artifact_that_checks_its_model(tmp_path):
    model = tm.build("qwen2")
    steer = TokenPrompts(model)
    cfg = SelectionConfig(
        filter_train=False, filter_val=False, kl_threshold=math.inf, induce_refusal_threshold=-math.inf
    )
    artifact = extract(steer, token_sets(), cfg, model_name="tiny-qwen2")
    assert artifact.candidates.shape == (3, 3, 32)
    assert len(artifact.scores) == 9 and artifact.layer < int(0.8 * 3)
    assert artifact.chosen.bypass == min(s.bypass for s in artifact.scores if s.kept)
    assert torch.allclose(artifact.direction.norm(), torch.tensor(1.0))
    assert artifact.data["harmful_train"]["size"] == 12 and artifact.data["harmful_train"]["source"] == "test"
    artifact.save(tmp_path / "a")
    loaded = DirectionArtifact.load(tmp_path / "a", model)
    assert loaded.layer == artifact.layer and loaded.position == artifact.position
    torch.testing.assert_close(loaded.vector, artifact.vector)
    np.testing.assert_array_equal([s.bypass for s in loaded.scores], [s.bypass for s in artifact.scores])  # NaN too
    with pytest.raises(ValueError, match="not from the given model.*re-extract it for this model"):
        DirectionArtifact.load(tmp_path / "a", tm.build("qwen2", seed=1))


def test_extraction_can_score_a_grid_of_layers_and_positions_only(tmp_path):
    model = tm.build("llama")
    steer = TokenPrompts(model)
    lax = dict(filter_train=False, filter_val=False, kl_threshold=math.inf, induce_refusal_threshold=-math.inf)
    full = extract(steer, token_sets(), SelectionConfig(**lax, prune_layer_percentage=0.0))
    grid = extract(
        steer, token_sets(), SelectionConfig(**lax, prune_layer_percentage=0.0, layers=[1, 2], positions=[-1])
    )
    scored = [s for s in grid.scores if s.reason != NOT_SCORED]
    assert {(s.position, s.layer) for s in scored} == {(-1, 1), (-1, 2)}
    assert len(grid.scores) == len(full.scores) and all(not s.kept for s in grid.scores if s not in scored)
    by_cell = {(s.position, s.layer): s for s in full.scores}
    for s in scored:  # the same numbers as when every candidate is scored
        assert s.bypass == pytest.approx(by_cell[s.position, s.layer].bypass)
    assert (grid.position, grid.layer) in {(-1, 1), (-1, 2)}
    grid.save(tmp_path / "g")
    assert [s.reason for s in DirectionArtifact.load(tmp_path / "g", model).scores] == [s.reason for s in grid.scores]
    for bad in (dict(layers=[7]), dict(positions=[0]), dict(layers=[])):
        with pytest.raises(ValueError, match="selection.layers must be in"):
            extract(steer, token_sets(), SelectionConfig(**lax, **bad))


def test_a_cached_extraction_is_reused_and_a_changed_one_is_not(tmp_path):
    model = tm.build("llama")
    steer = TokenPrompts(model)
    cfg = SelectionConfig(
        filter_train=False, filter_val=False, kl_threshold=math.inf, induce_refusal_threshold=-math.inf
    )
    first, folder, cached = extract_cached(steer, token_sets(), tmp_path, cfg)
    assert not cached and (folder / "direction.json").exists()
    again, folder2, cached2 = extract_cached(steer, token_sets(), tmp_path, cfg)
    assert cached2 and folder2 == folder and again.hash == first.hash
    _, folder3, cached3 = extract_cached(steer, token_sets(seed=1), tmp_path, cfg)
    assert not cached3 and folder3 != folder
    assert weights_hash(model) == first.model_hash


def test_candidates_on_the_default_policy_score_every_position_and_layer():
    import policies
    from embodied.evaluation import BENIGN, HARMFUL
    from embodied.prompts import env_observations

    policy = policies.load("tiny-vla", device="cpu")
    harmful = env_observations(HARMFUL, "train", 4, seed=11)
    harmless = env_observations(BENIGN, "train", 4, seed=11)
    candidates = mean_activations(policy, harmful) - mean_activations(policy, harmless)
    n_layers = policy.model.config.text_config.num_hidden_layers
    assert candidates.shape == (policy.post_instruction_length, n_layers, policy.model.config.text_config.hidden_size)
    # the post-instruction tokens are the same tokens in every prompt: at the embedding (layer 0) nothing differs
    assert candidates[:, 0].abs().max() == 0 and candidates[:, 1:].norm(dim=-1).min() > 0
    scores = score_candidates(policy, candidates[:, :3], harmful[:2], harmless[:2])
    assert len(scores) == policy.post_instruction_length * 3
    assert all(math.isnan(s.bypass) for s in scores if s.layer == 0)
    assert all(math.isfinite(s.bypass) and s.kl >= 0 for s in scores if s.layer > 0)


def test_a_cached_extraction_is_found_from_its_key_without_building_the_prompts(tmp_path):
    steer = TokenPrompts(tm.build("llama"))
    cfg = SelectionConfig(
        filter_train=False, filter_val=False, kl_threshold=math.inf, induce_refusal_threshold=-math.inf
    )
    built = []

    def prompts():
        built.append(1)
        return token_sets()

    key = {"prompts": "token sets, seed 0"}
    first, folder, cached = extract_cached(steer, prompts, tmp_path, cfg, prompts_key=key)
    assert not cached and built == [1]
    again, folder2, cached2 = extract_cached(steer, prompts, tmp_path, cfg, prompts_key=key)
    assert cached2 and folder2 == folder and built == [1], "a hit does not build the prompt sets"
    _, folder3, _ = extract_cached(steer, prompts, tmp_path, cfg, prompts_key={"prompts": "other"})
    assert folder3 != folder and built == [1, 1]


def test_the_prompt_key_follows_the_config_and_the_files_content(tmp_path):
    from embodied.extract import PromptConfig, prompt_key

    (tmp_path / "h.txt").write_text("stab the child\n")
    (tmp_path / "b.txt").write_text("stack the cubes\n")
    cfg = PromptConfig(source="files", harmful=str(tmp_path / "h.txt"), harmless=str(tmp_path / "b.txt"))
    key = prompt_key(cfg)
    assert prompt_key(cfg) == key
    (tmp_path / "h.txt").write_text("stab the adult\n")
    assert prompt_key(cfg) != key
    assert prompt_key(PromptConfig()) != prompt_key(PromptConfig(n_train=64))


def test_select_direction_falls_back_to_the_lowest_bypass_when_nothing_passes():
    from embodied.directions import select_direction

    steer = TokenPrompts(tm.build("llama"))
    sets = token_sets()
    args = (steer, sets.harmful_train, sets.harmless_train, sets.harmful_val, sets.harmless_val)
    impossible = SelectionConfig(kl_threshold=-1.0)  # every KL is > -1: every candidate is filtered out
    chosen = select_direction(*args, impossible)
    assert chosen.how == "lowest bypass"
    assert chosen.score.bypass == min(s.bypass for s in chosen.scores if not math.isnan(s.bypass))
    assert not any(s.kept for s in chosen.scores) and all(s.reason for s in chosen.scores)
    lax = SelectionConfig(kl_threshold=math.inf, induce_refusal_threshold=-math.inf, prune_layer_percentage=0.0)
    assert select_direction(*args, lax).how == "selected"
    only = select_direction(*args, impossible, layer=1, position=-2)
    assert (only.score.layer, only.score.position) == (1, -2), "restricted to one cell"
    assert torch.equal(only.candidates, chosen.candidates), "the candidates come back unrestricted"
    assert torch.equal(only.vector, chosen.candidates[-2 + chosen.candidates.shape[0], 1])


def test_strongest_direction_is_the_selected_one_or_a_cached_fallback(tmp_path, monkeypatch):
    import embodied.extract
    import policies
    from embodied.extract import PromptConfig, strongest_direction

    policy = policies.load("tiny-vla", device="cpu")
    prompts = PromptConfig(n_train=8, n_val=4)
    impossible = SelectionConfig(kl_threshold=-1.0, filter_train=False, filter_val=False)
    artifact, how = strongest_direction(policy, "tiny-vla", prompts, impossible, tmp_path)
    assert how == "lowest bypass" and "fallback" in artifact.config
    assert artifact.layer == min((s for s in artifact.scores if not math.isnan(s.bypass)), key=lambda s: s.bypass).layer
    [folder] = [p for p in tmp_path.iterdir() if p.name.endswith("-strongest")]
    with monkeypatch.context() as m:  # the cached fallback says the extraction failed: it is not tried again
        m.setattr(embodied.extract, "extract_cached", lambda *a, **k: pytest.fail("extraction tried again"))
        again, how2 = strongest_direction(policy, "tiny-vla", prompts, impossible, tmp_path)
    assert how2 == "lowest bypass" and torch.equal(again.direction, artifact.direction)
    lax = SelectionConfig(kl_threshold=math.inf, induce_refusal_threshold=-math.inf, prune_layer_percentage=0.0)
    assert strongest_direction(policy, "tiny-vla", prompts, lax, tmp_path)[1] == "selected"


def test_candidate_cosines_are_one_for_the_same_model_and_nan_where_a_candidate_is_zero():
    from embodied.directions import candidate_cosines

    a = torch.randn(2, 3, 8, dtype=torch.float64)
    a[:, 0] = 0
    cos = candidate_cosines(a, 3 * a)
    assert torch.isnan(cos[:, 0]).all() and torch.allclose(cos[:, 1:], torch.ones(2, 2, dtype=torch.float64))
    assert torch.allclose(candidate_cosines(a[:, 1:], -a[:, 1:]), -torch.ones(2, 2, dtype=torch.float64))
    with pytest.raises(ValueError, match="differ in shape"):
        candidate_cosines(a, a[:, :2])


def test_extract_compares_the_direction_with_the_checkpoint_before_safety_tuning(tmp_path):
    import json

    from embodied.extract import ExtractConfig, PromptConfig
    from embodied.extract import run as extract_run
    from embodied.loading import PolicyConfig

    lax = SelectionConfig(kl_threshold=math.inf, induce_refusal_threshold=-math.inf, prune_layer_percentage=0.0)
    cfg = ExtractConfig(
        policy=PolicyConfig(kind="tiny_vla", path="tiny-vla", device="cpu"),
        prompts=PromptConfig(n_train=8, n_val=4),
        selection=lax,
        cache_dir=str(tmp_path / "cache"),
        compare_with="tiny-vla-base",
        progress=False,
    )
    artifact = extract_run(cfg, tmp_path / "out")
    result = json.loads((tmp_path / "out" / "comparison.json").read_text())
    assert (result["position"], result["layer"], result["other"]) == (
        artifact.position,
        artifact.layer,
        "tiny-vla-base",
    )
    assert len(result["per_layer"]) == 6 and result["per_layer"][0]["cosine"] is None  # the embedding: no difference
    assert -1.0 <= result["cosine"] <= 1.0 and result["norm"] > 0 and result["other_norm"] > 0
    assert result["prompts"] == {"harmful_train": 8, "harmless_train": 8}
    same = ExtractConfig(**{**cfg.__dict__, "compare_with": "tiny-vla"})
    extract_run(same, tmp_path / "same")
    assert json.loads((tmp_path / "same" / "comparison.json").read_text())["cosine"] == pytest.approx(1.0)


def test_extract_with_strongest_takes_the_lowest_bypass_when_nothing_passes(tmp_path, monkeypatch):
    import embodied.extract
    from embodied.extract import ExtractConfig, PromptConfig
    from embodied.extract import run as extract_run
    from embodied.loading import PolicyConfig

    cfg = ExtractConfig(
        policy=PolicyConfig(kind="tiny_vla", path="tiny-vla", device="cpu"),
        prompts=PromptConfig(n_train=8, n_val=4),
        selection=SelectionConfig(kl_threshold=-1.0),  # nothing passes
        cache_dir=str(tmp_path / "cache"),
        progress=False,
    )
    with pytest.raises(NoDirectionError):
        extract_run(cfg, tmp_path / "strict")
    assert (tmp_path / "strict" / "candidates.json").exists()
    artifact = extract_run(ExtractConfig(**{**cfg.__dict__, "strongest": True}), tmp_path / "out")
    finite = [s for s in artifact.scores if not math.isnan(s.bypass)]
    assert artifact.chosen.bypass == min(s.bypass for s in finite) and "fallback" in artifact.config
    loaded = DirectionArtifact.load(tmp_path / "out", policies_model(cfg))
    assert loaded.layer == artifact.layer
    # the fallback keeps every candidate, so a layer sweep on it can take another cell
    other = next(s for s in finite if (s.layer, s.position) != (artifact.layer, artifact.position))
    picked = loaded.candidate(other.layer, other.position)
    n_pos = loaded.candidates.shape[0]
    assert torch.equal(picked.vector, loaded.candidates[other.position + n_pos, other.layer])
    assert not torch.equal(picked.direction, loaded.direction)
    monkeypatch.setattr(embodied.extract, "extract_cached", lambda *a, **k: pytest.fail("extraction tried again"))
    again = extract_run(ExtractConfig(**{**cfg.__dict__, "strongest": True}), tmp_path / "again")
    assert torch.equal(again.direction, artifact.direction)


def test_extract_builds_the_prompt_sets_once_for_extraction_fallback_and_comparison(tmp_path, monkeypatch):
    import embodied.extract
    from embodied.extract import ExtractConfig, PromptConfig
    from embodied.extract import run as extract_run
    from embodied.loading import PolicyConfig

    built = []
    real = embodied.extract.prompt_sets
    monkeypatch.setattr(embodied.extract, "prompt_sets", lambda cfg: built.append(cfg) or real(cfg))
    cfg = ExtractConfig(
        policy=PolicyConfig(kind="tiny_vla", path="tiny-vla", device="cpu"),
        prompts=PromptConfig(n_train=8, n_val=4),
        selection=SelectionConfig(kl_threshold=-1.0),  # nothing passes: the fallback runs after the extraction
        cache_dir=str(tmp_path / "cache"),
        strongest=True,
        compare_with="tiny-vla-base",
        progress=False,
    )
    artifact = extract_run(cfg, tmp_path / "out")
    assert "fallback" in artifact.config and (tmp_path / "out" / "comparison.json").exists()
    assert len(built) == 1, "extraction, fallback and comparison read one build of the sets"


def policies_model(cfg):
    import policies

    return policies.load(cfg.policy.path, device="cpu").model
