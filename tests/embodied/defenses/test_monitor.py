import numpy as np
import pytest
import torch

import policies
from embodied.defenses.monitor import (
    HarmProbe,
    MonitorConfig,
    ProbeData,
    ProbeDataConfig,
    auroc,
    choose_threshold,
    collect_activations,
    fit_logistic,
    fit_probe,
    fit_probe_cached,
    instruction_end,
    monitoring,
    probe_data,
    probe_folder,
    resolve_position,
    score_observations,
)
from embodied.models import adapter
from embodied.prompts import env_prompt_sets
from tests.embodied import tiny_models as tm


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Small forwards and fits run fastest on one thread (and do not fight other processes for the cores)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


IMAGE = [50, 50]  # stands in for image placeholder tokens between the instruction and the template's tail
SUFFIX = [7, 8, 9]  # the post-instruction tokens


class TokenPolicy:
    """A Steerable over a tiny random LM: an instruction is token ids as text; prompts are left-padded
    ``<bos> {instruction} IMAGE SUFFIX``."""

    def __init__(self, model):
        self.model = model

    @property
    def post_instruction_length(self) -> int:
        return len(SUFFIX)

    @property
    def refusal_token_ids(self) -> list[int]:
        return [11]

    def inputs(self, observations):
        rows = [[1, *map(int, str(o["instruction"]).split()), *IMAGE, *SUFFIX] for o in observations]
        n = max(map(len, rows))
        ids = torch.tensor([[0] * (n - len(r)) + r for r in rows])
        mask = torch.tensor([[0] * (n - len(r)) + [1] * len(r) for r in rows])
        return {"input_ids": ids, "attention_mask": mask}


def token_data(seed: int = 0, n_train: int = 24, n_val: int = 12) -> ProbeData:
    """Harmful instructions end in a token from 60-79, harmless ones in one from 20-39."""
    rng = np.random.default_rng(seed)

    def prompts(n, harmful):
        out = []
        for _ in range(n):
            words = rng.integers(20, 80, size=int(rng.integers(1, 4))).tolist()
            last = int(rng.integers(60, 80) if harmful else rng.integers(20, 40))
            out.append({"instruction": " ".join(map(str, [*words, last])), "harmful": harmful})
        return out

    return ProbeData(
        prompts(n_train, True) + prompts(n_train, False),
        prompts(n_val, True) + prompts(n_val, False),
        sources={"train": "test"},
    )


# ------------------------------------------------------------------------------------------------------ pure parts


def test_auroc_matches_hand_computed_values():
    # positives 0.35, 0.8 vs negatives 0.1, 0.4: pairs won 0.35>0.1, 0.8>0.1, 0.8>0.4; lost 0.35<0.4 -> 3/4
    assert auroc([0.1, 0.4, 0.35, 0.8], [0, 0, 1, 1]) == pytest.approx(0.75)
    # ties count half: positives 0.5, 0.9 vs negatives 0.5, 0.5 -> 0.5 + 0.5 + 1 + 1 = 3 of 4 pairs
    assert auroc([0.5, 0.5, 0.5, 0.9], [True, False, False, True]) == pytest.approx(0.75)
    # one positive 0.3 vs negatives 0.1, 0.3, 0.3, 0.7 -> 1 + 0.5 + 0.5 + 0 = 2 of 4
    assert auroc([0.3, 0.1, 0.3, 0.3, 0.7], [1, 0, 0, 0, 0]) == pytest.approx(0.5)
    assert auroc([1, 2, 3, 4], [0, 0, 1, 1]) == 1.0
    assert auroc([4, 3, 2, 1], [0, 0, 1, 1]) == 0.0
    assert auroc([2, 2, 2], [1, 0, 1]) == 0.5


def test_auroc_agrees_with_counting_pairs():
    rng = np.random.default_rng(0)
    s = rng.integers(0, 5, size=40).astype(float)  # many ties
    y = rng.random(40) < 0.4
    pos, neg = s[y], s[~y]
    pairs = (pos[:, None] > neg[None, :]).sum() + 0.5 * (pos[:, None] == neg[None, :]).sum()
    assert auroc(s, y) == pytest.approx(pairs / (len(pos) * len(neg)))


def test_auroc_rejects_one_class_and_mismatched_lengths():
    with pytest.raises(ValueError, match="positives and negatives"):
        auroc([0.1, 0.2], [1, 1])
    with pytest.raises(ValueError, match="3 scores but 2 labels"):
        auroc([0.1, 0.2, 0.3], [1, 0])
    with pytest.raises(ValueError, match="finite"):
        auroc([0.1, float("nan")], [1, 0])


def test_threshold_flags_at_most_max_fpr_of_harmless_and_sits_in_the_gap():
    harmless = np.linspace(0.01, 0.20, 20)
    harmful = np.array([0.15, 0.5, 0.9])
    t = choose_threshold(harmless, harmful, max_fpr=0.05)  # one of 20 may pass: 0.20; next below is 0.19
    assert t == pytest.approx(0.195)
    assert (harmless >= t).sum() == 1 and (harmful >= t).sum() == 2
    strict = choose_threshold(harmless, harmful, max_fpr=0.0)  # none may pass: midway from 0.20 to 0.5
    assert strict == pytest.approx(0.35) and not (harmless >= strict).any()
    assert choose_threshold(np.array([0.3]), np.array([0.1]), 0.0) > 0.3  # nothing above: just above the top


def test_logistic_fit_separates_standardized_features_and_is_deterministic():
    g = torch.Generator().manual_seed(0)
    y = torch.arange(200) % 2 == 0
    x = torch.randn(200, 16, generator=g) * 100.0
    x[:, 3] += torch.where(y, 250.0, -250.0)  # a large-scale informative feature
    x[:, 5] = 7.0  # a constant one
    fit = fit_logistic(x, y.numpy(), l2=1e-3)
    assert auroc(fit.logits(x).numpy(), y.numpy()) > 0.99
    assert fit.scale[5] == 1.0 and abs(float(fit.weight[5])) < 1e-12
    again = fit_logistic(x, y.numpy(), l2=1e-3)
    assert torch.equal(fit.weight, again.weight) and fit.bias == again.bias
    with pytest.raises(ValueError, match="both harmful and harmless"):
        fit_logistic(x, np.ones(200), l2=1e-3)


# ------------------------------------------------------------------------------------------ on a tiny random LM


def test_instruction_end_is_before_the_fixed_tail_and_positions_are_checked():
    policy = TokenPolicy(tm.build("llama"))
    data = token_data()
    end = -(len(IMAGE) + len(SUFFIX) + 1)
    assert instruction_end(policy, data.train) == end
    # every instruction ends in the same token: the variant without the last word still finds the end
    same_last = [{"instruction": "25 30 61"}, {"instruction": "44 61"}]
    assert instruction_end(policy, same_last) == end
    assert resolve_position(policy, "instruction_end", data.train) == end
    assert resolve_position(policy, "-2", data.train) == -2
    with pytest.raises(ValueError, match="negative index"):
        resolve_position(policy, 3, data.train)
    with pytest.raises(ValueError, match="instruction_end"):
        resolve_position(policy, "middle", data.train)


def test_collected_activations_are_the_block_inputs_at_the_positions():
    model = tm.build("llama")
    policy = TokenPolicy(model)
    obs = token_data().train[:6]
    acts = collect_activations(policy, obs, [-6, -1], batch_size=4)
    assert acts.shape == (6, 2, 3, 32) and acts.dtype == torch.float32
    with torch.no_grad():
        hidden = model(**policy.inputs(obs), output_hidden_states=True).hidden_states
    for layer in range(3):
        torch.testing.assert_close(acts[:, 0, layer], hidden[layer][:, -6, :], atol=1e-5, rtol=0)
        torch.testing.assert_close(acts[:, 1, layer], hidden[layer][:, -1, :], atol=1e-5, rtol=0)


def test_probe_fit_saves_and_loads_and_checks_its_model(tmp_path):
    model = tm.build("llama")
    policy = TokenPolicy(model)
    data = token_data()
    probe = fit_probe(policy, MonitorConfig(), data, model_name="tiny-llama")
    assert probe.position == -6 and probe.position_name == "instruction_end"
    assert set(probe.val_auroc) == {"instruction_end", "-1", "-2", "-3"}
    assert probe.val_auroc["instruction_end"][probe.layer] == max(probe.val_auroc["instruction_end"])
    assert probe.val_auroc["instruction_end"][probe.layer] > 0.9  # the harmful tokens are where it reads
    assert probe.val_rates["fpr"] <= 0.05 and probe.data["train"]["size"] == 48
    probe.save(tmp_path / "p")
    loaded = HarmProbe.load(tmp_path / "p", model)
    assert loaded.hash == probe.hash and loaded.val_auroc == probe.val_auroc
    acts = collect_activations(policy, data.val, [probe.position], [probe.layer])[:, 0, 0]
    np.testing.assert_array_equal(loaded.scores(acts), probe.scores(acts))
    with pytest.raises(ValueError, match="not from the given model.*fit it for this model"):
        HarmProbe.load(tmp_path / "p", tm.build("llama", seed=1))
    with pytest.raises(FileNotFoundError, match="no harm probe"):
        HarmProbe.load(tmp_path / "missing")


def test_a_configured_layer_and_threshold_are_kept_and_bad_ones_rejected():
    policy = TokenPolicy(tm.build("llama"))
    probe = fit_probe(policy, MonitorConfig(layer=2, position=-1, threshold=0.7), token_data())
    assert (probe.layer, probe.position, probe.threshold) == (2, -1, 0.7)
    with pytest.raises(ValueError, match="out of range"):
        fit_probe(policy, MonitorConfig(layer=3), token_data())
    with pytest.raises(ValueError, match="harm probability"):
        fit_probe(policy, MonitorConfig(threshold=1.5), token_data())
    one_class = ProbeData([{"instruction": "61", "harmful": True}] * 2, [{"instruction": "21", "harmful": False}])
    with pytest.raises(ValueError, match="harmful and harmless"):
        fit_probe(policy, MonitorConfig(), one_class)
    with pytest.raises(ValueError, match="no boolean 'harmful' label"):
        fit_probe(policy, MonitorConfig(), ProbeData([{"instruction": "61"}], []))


def test_cached_fit_is_reused(tmp_path, monkeypatch):
    policy = TokenPolicy(tm.build("llama"))
    cfg = MonitorConfig(cache_dir=str(tmp_path))
    data = token_data()
    first = fit_probe_cached(policy, cfg, data)
    assert (probe_folder(policy, cfg, data) / "probe.json").exists()

    def refit(*args, **kwargs):
        raise AssertionError("the cached probe should have been loaded")

    monkeypatch.setattr("embodied.defenses.monitor.fit_probe", refit)
    assert fit_probe_cached(policy, cfg, lambda: data).hash == first.hash
    assert probe_folder(policy, MonitorConfig(cache_dir=str(tmp_path), l2=0.1), data) != probe_folder(policy, cfg, data)


def test_monitoring_leaves_no_hook_after_exit_or_an_exception():
    model = tm.build("llama")
    policy = TokenPolicy(model)
    probe = fit_probe(policy, MonitorConfig(layer=1), token_data())
    blocks = adapter(model).blocks
    with monitoring(model, probe) as seen:
        assert len(blocks[1]._forward_pre_hooks) == 1
        with torch.no_grad():
            model(**policy.inputs(token_data().val[:3]))
    assert len(seen) == 1 and seen[0].shape == (3,)
    assert all(len(b._forward_pre_hooks) == 0 for b in blocks)
    with pytest.raises(RuntimeError, match="boom"), monitoring(model, probe):
        raise RuntimeError("boom")
    assert all(len(b._forward_pre_hooks) == 0 for b in blocks)
    narrow = HarmProbe(torch.zeros(8), 0.0, torch.zeros(8), torch.ones(8), layer=0, position=-1, threshold=0.5)
    with pytest.raises(ValueError, match="8-wide residual stream but the model's is 32"), monitoring(model, narrow):
        pass


# ------------------------------------------------------------------------------------------ on the tiny VLA


@pytest.fixture(scope="module")
def tiny_vla():
    return policies.load("tiny-vla", device="cpu")


@pytest.fixture(scope="module")
def scenes():
    """Harmful and benign scenes of the environments (train split 16 each, val split 12 each)."""
    return ProbeData.from_prompt_sets(env_prompt_sets(n_train=16, n_val=12, seed=6_000_000))


def test_probe_data_labels_vision_dependent_scenes_by_what_the_env_says(tiny_vla):
    cfg = ProbeDataConfig(n_train=1, n_val=1, n_vision_train=3, n_vision_val=1)
    data = probe_data(cfg)
    assert [o["category"] == "vision_handover" for o in data.train] == [False, False, True, True, True]
    assert data.labels("train")[:2].tolist() == [True, False] and len(data.val) == 3
    assert all(isinstance(o["harmful"], bool) for o in data.train) and "vision_train" in data.sources
    # a cached default fit is found by the data config, without building the scenes
    other = MonitorConfig(data=ProbeDataConfig(n_train=2))
    assert probe_folder(tiny_vla, MonitorConfig()) != probe_folder(tiny_vla, other)


def test_instruction_end_of_the_tiny_vla_is_before_its_image_tokens(tiny_vla):
    image = np.zeros((64, 64, 3), dtype=np.uint8)
    obs = [{"image": image, "instruction": "hand the knife to the child"}, {"image": image, "instruction": "tap"}]
    n_image = tiny_vla.model.config.image_seq_length
    assert instruction_end(tiny_vla, obs) == -(tiny_vla.post_instruction_length + n_image + 1) == -67


@pytest.fixture(scope="module")
def tiny_vla_probe(tiny_vla, scenes):
    return fit_probe(tiny_vla, MonitorConfig(), scenes, model_name="tiny-vla")


def test_probe_on_the_tiny_vla_separates_held_out_harmful_from_harmless(tiny_vla_probe):
    probe = tiny_vla_probe
    assert probe.position == -67
    assert probe.val_auroc["instruction_end"][probe.layer] > 0.85  # measured 0.958 (layer 0, n = 12 + 12)
    assert probe.val_rates["fpr"] <= 0.05


def test_the_recorded_score_is_the_probe_on_separately_collected_activations(tiny_vla, scenes):
    probe = fit_probe(tiny_vla, MonitorConfig(layer=3), scenes)  # a block inside the stack, past the image
    obs = scenes.val[::3]  # harmful and benign, instructions of different lengths: padded rows
    with monitoring(tiny_vla.model, probe) as seen:
        decisions = tiny_vla.act_batch(obs)
    assert len(decisions) == len(obs)
    assert len(seen) == 1, "one prompt forward; the decoding steps are not scored"
    np.testing.assert_allclose(seen[0], score_observations(tiny_vla, probe, obs), atol=1e-5, rtol=0)
    assert all(len(b._forward_pre_hooks) == 0 for b in adapter(tiny_vla.model).blocks)
