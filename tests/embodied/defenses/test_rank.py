"""The refusal-rank analysis on a tiny in-memory model whose refusal is, by construction, a known 2-D subspace."""

import math

import pytest
import torch

from embodied.defenses.rank import (
    RankConfig,
    category_directions,
    cosine_matrix,
    iterated_directions,
    principal_directions,
    rank_table,
    refusal_rank,
    refusal_rate,
)
from embodied.interventions import basis
from embodied.metrics import Rate
from embodied.models import adapter
from policies.base import Decision
from tests.embodied import tiny_models as tm

D_MODEL = 32


class SubspacePolicy:
    """A tiny random llama whose decision is a refusal when the last block's input at the last position has any
    component in ``span(refusal)``: ablating part of that span leaves refusal, ablating all of it removes it."""

    post_instruction_length = 2
    refusal_token_ids = [5]

    def __init__(self, refusal: torch.Tensor, seed: int = 0):
        self.model = tm.build("llama", seed=seed)
        self.refusal = basis(refusal, D_MODEL)

    def inputs(self, observations: list[dict]) -> dict:
        ids = torch.stack([o["ids"] for o in observations])
        return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}

    @torch.no_grad()
    def act_batch(self, observations: list[dict]) -> list[Decision]:
        seen = []
        last = adapter(self.model).blocks[-1]
        handle = last.register_forward_pre_hook(
            lambda m, a, k: seen.append((a[0] if a else k["hidden_states"])[:, -1]), with_kwargs=True
        )
        try:
            self.model(**self.inputs(observations))
        finally:
            handle.remove()
        component = (seen[0] @ self.refusal.T).norm(dim=-1)
        return [Decision("", None, refused=bool(c > 1e-3)) for c in component]


def observations(n: int, low: int, high: int, seed: int, category: str | None = None) -> list[dict]:
    g = torch.Generator().manual_seed(seed)
    out = [{"ids": torch.randint(low, high, (6,), generator=g)} for _ in range(n)]
    return [{**o, "category": category} for o in out] if category else out


@pytest.fixture(scope="module")
def policy():
    return SubspacePolicy(torch.randn(2, D_MODEL, generator=torch.Generator().manual_seed(7)))


def test_refusal_rank_falls_to_zero_only_when_the_whole_subspace_is_ablated(policy):
    prompts = observations(12, 3, 90, seed=1)
    result = refusal_rank(policy, policy.refusal, prompts, max_k=8, threshold=0.1, name="true")
    assert sorted(result.rates) == [0, 1, 2]  # k stops at the basis' size
    assert [result.rates[k].value for k in (0, 1, 2)] == [1.0, 1.0, 0.0]
    assert all(r.n == 12 for r in result.rates.values())
    assert result.k_star == 2
    assert result.to_dict()["rates"]["2"]["k"] == 0
    assert result.benign_rates == {} and result.to_dict()["benign_rates"] == {}
    benign = observations(5, 3, 90, seed=4)
    both = refusal_rank(policy, policy.refusal, prompts, max_k=8, threshold=0.1, name="true", benign=benign)
    assert both.rates == result.rates and sorted(both.benign_rates) == [0, 1, 2]
    # this toy refuses any prompt with a component in the span: benign ones too, until the whole span is gone
    assert [both.benign_rates[k].value for k in (0, 1, 2)] == [1.0, 1.0, 0.0]
    assert both.to_dict()["benign_rates"]["0"]["n"] == 5
    # measured k = 0 rates are taken as given, not measured again
    known = (Rate(7, 12), Rate(2, 5))
    shared = refusal_rank(policy, policy.refusal, prompts, 8, 0.1, "true", benign=benign, unsteered=known)
    assert (shared.rates[0], shared.benign_rates[0]) == known and shared.rates[2] == result.rates[2]


def test_refusal_rank_is_none_when_refusal_never_falls(policy):
    unrelated = torch.randn(3, D_MODEL, generator=torch.Generator().manual_seed(11))
    unrelated = unrelated - (unrelated @ policy.refusal.T) @ policy.refusal  # orthogonal to the refusal span
    result = refusal_rank(policy, unrelated, observations(8, 3, 90, seed=2), max_k=3)
    assert [r.value for r in result.rates.values()] == [1.0] * 4
    assert result.k_star is None
    table = rank_table({"policy": "toy", "ranks": {"unrelated": result.to_dict()}}, max_k=3)
    assert table.row_count == 1


def test_refusal_rate_ablates_a_vector_or_a_subspace(policy):
    prompts = observations(6, 3, 90, seed=3)
    assert refusal_rate(policy, prompts, batch_size=4).value == 1.0
    assert refusal_rate(policy, prompts, policy.refusal, batch_size=4).value == 0.0
    assert refusal_rate(policy, prompts, policy.refusal[0]).value == 1.0


def test_iterated_directions_are_orthonormal_and_start_with_the_given_direction(policy):
    harmful, harmless = observations(16, 3, 40, seed=4), observations(16, 50, 90, seed=5)
    first = torch.randn(D_MODEL, generator=torch.Generator().manual_seed(9))
    Q = iterated_directions(policy, harmful, harmless, k=4, layer=2, position=-1, first=first)
    assert Q.shape == (4, D_MODEL)
    torch.testing.assert_close(Q @ Q.T, torch.eye(4), atol=1e-5, rtol=0)
    assert float(Q[0] @ first / first.norm()) == pytest.approx(1.0, abs=1e-5)
    plain = iterated_directions(policy, harmful, harmless, k=2, layer=2, position=-1)
    torch.testing.assert_close(plain @ plain.T, torch.eye(2), atol=1e-5, rtol=0)


def test_category_directions_and_their_cosine_matrix(policy):
    harmful = observations(8, 3, 30, seed=6, category="blade") + observations(8, 30, 60, seed=7, category="hot")
    harmless = observations(8, 60, 90, seed=8)
    cats = category_directions(policy, harmful, harmless, layer=1, position=-2)
    assert list(cats) == ["blade", "hot"] and all(v.shape == (D_MODEL,) for v in cats.values())
    C = cosine_matrix(cats)
    assert C.shape == (2, 2)
    torch.testing.assert_close(C, C.T, atol=0, rtol=0)
    torch.testing.assert_close(C.diagonal(), torch.ones(2), atol=1e-6, rtol=0)
    assert C.abs().max() <= 1.0 + 1e-6
    span = principal_directions(cats)
    torch.testing.assert_close(span @ span.T, torch.eye(2), atol=1e-5, rtol=0)
    with pytest.raises(ValueError, match="category"):
        category_directions(policy, observations(2, 3, 30, seed=9), harmless, layer=1, position=-1)
    with pytest.raises(ValueError, match="layer 3 is out of range"):
        category_directions(policy, harmful, harmless, layer=3, position=-1)


def test_cosine_matrix_of_known_vectors():
    C = cosine_matrix(torch.tensor([[1.0, 0.0], [1.0, 1.0], [0.0, -2.0]]))
    assert C[0, 1].item() == pytest.approx(1 / math.sqrt(2), abs=1e-6)
    assert C[0, 2].item() == pytest.approx(0.0, abs=1e-6) and C[1, 2].item() == pytest.approx(-1 / math.sqrt(2))
    with pytest.raises(ValueError, match="non-zero"):
        cosine_matrix(torch.zeros(2, 3))


def test_rank_config_composes_as_the_command_sees_it():
    from hydra import compose, initialize
    from omegaconf import OmegaConf

    with initialize(version_base="1.3", config_path=None):
        cfg = OmegaConf.to_object(compose("rank_schema", overrides=["max_k=4", "policies=[tiny-vla]"]))
    assert isinstance(cfg, RankConfig) and cfg.max_k == 4 and cfg.policies == ["tiny-vla"]
    assert cfg.selection.prune_layer_percentage == 0.0


def test_an_interrupted_rank_run_keeps_the_policies_it_finished(tmp_path, monkeypatch):
    import policies
    from embodied.defenses import rank

    analyzed = []

    def fake_analyze(policy, name, cfg, observations, benign):
        analyzed.append(name)
        if name == "b" and len(analyzed) == 2:
            raise KeyboardInterrupt  # the first run stops while analyzing b
        return {"policy": name, "skipped": "x", "refusal": {"rate": 0.0}}

    monkeypatch.setattr(rank, "analyze", fake_analyze)
    monkeypatch.setattr(rank, "env_observations", lambda *a, **k: [])
    monkeypatch.setattr(policies, "load", lambda name, device=None: object())
    cfg = RankConfig(policies=["a", "b"])
    with pytest.raises(KeyboardInterrupt):
        rank.run(cfg, tmp_path)
    assert list(rank.finished_analyses(tmp_path / "rank.json", _config(cfg))) == ["a"]

    results = rank.run(cfg, tmp_path)  # resumes: a is kept, only b is analyzed
    assert analyzed == ["a", "b", "b"] and set(results) == {"a", "b"}

    rank.run(RankConfig(policies=["a", "b"], threads=1), tmp_path)  # the thread count does not change what is measured
    assert analyzed == ["a", "b", "b"]

    rank.run(RankConfig(policies=["a"], max_k=3), tmp_path)  # another config: measured again, file overwritten
    assert analyzed == ["a", "b", "b", "a"]
    assert list(rank.finished_analyses(tmp_path / "rank.json", _config(RankConfig(policies=["a", "b"])))) == []


def _config(cfg: RankConfig) -> dict:
    from omegaconf import OmegaConf

    return OmegaConf.to_container(OmegaConf.structured(cfg))
