"""The planner recipe: prompts and targets, the loss on target tokens only, LoRA training that lowers it, and (slow,
on SmolLM2) a few-step run whose adapters load, merge and act."""

import json
from dataclasses import asdict

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from embodied.train_planner import Encoded, PlannerStage, PlannerTrainConfig, _validate, batch_loss, encode, targets
from policies.hf import HFPlannerPolicy
from policies.tiny_vla.data import DATA_VERSION, DataSpec
from policies.tiny_vla.processing_tiny_vla import REFUSAL
from tests.policies.test_hf import build_tokenizer, random_llama

DATA = {
    "scene_text": np.array(["objects: red cube 3 4 h 1\ncontainers: bin 9 9 h 0\npeople: none"]),
    "scene": np.array([0, 0]),
    "instruction": np.array(["put the red cube in the bin", "put the red cube in the bin"]),
    "command": np.array(["pick_place 3 4 to 9 9 h 1 speed 2", "strike 3 4 to 9 9 h 1 speed 2"]),
    "harmful": np.array([False, True]),
}


@pytest.fixture
def planner():
    tok = build_tokenizer()
    return HFPlannerPolicy(random_llama(tok), tok, system_prompt="robot")


def test_targets_are_commands_then_refusals_where_harmful():
    assert targets(DATA, "capability") == list(DATA["command"])
    assert targets(DATA, "safety") == [DATA["command"][0], REFUSAL]
    with pytest.raises(ValueError, match="stage must be"):
        targets(DATA, "other")


def test_encoded_samples_are_the_planners_prompt_then_the_target_and_eos(planner):
    enc = encode(planner, DATA, "capability")
    tok = planner.tokenizer
    for ids, start, command in zip(enc.ids, enc.target_start, DATA["command"], strict=True):
        prompt = planner.prompt_from_scene(str(DATA["scene_text"][0]), "put the red cube in the bin")
        assert ids[:start] == tok.encode(prompt, add_special_tokens=False)
        assert ids[start:] == tok.encode(str(command), add_special_tokens=False) + [tok.eos_token_id]
    assert enc.harmful.tolist() == [False, True]


def test_word_dropout_leaves_out_template_words_only_and_never_touches_the_target(planner):
    from embodied.train_planner import drop_words

    rng = np.random.default_rng(0)
    assert drop_words("put the red cube in the bin", 0.0, rng) == "put the red cube in the bin"
    assert drop_words("put the red cube in the bin", 0.999, rng) == "red cube bin"
    assert drop_words("nudge the red sponge toward you", 0.999, rng) == "red sponge toward you"
    assert drop_words("put it there", 0.999, rng) == "put it there", "an instruction is never emptied"
    assert drop_words("drive the knife into the child's chest", 0.999, rng) == "knife child's chest"
    kept = [drop_words("put the red cube in the bin", 0.5, rng).split() for _ in range(400)]
    assert all({"red", "cube", "bin"} <= set(k) for k in kept)
    assert 0.4 < np.mean(["put" not in k for k in kept]) < 0.6

    enc = encode(planner, DATA, "safety")
    idx = np.array([1, 0])
    same = enc.with_words_dropped(idx, 0.0, rng)
    assert same.ids == [enc.ids[1], enc.ids[0]] and same.target_start == [enc.target_start[1], enc.target_start[0]]
    assert same.harmful.tolist() == [True, False]
    dropped = enc.with_words_dropped(idx, 0.999, rng)
    tok = planner.tokenizer
    for row, start, i in zip(dropped.ids, dropped.target_start, idx, strict=True):
        assert row[start:] == enc.ids[i][enc.target_start[i] :], "the target is the sample's own"
        prompt = planner.prompt_from_scene(str(DATA["scene_text"][0]), "red cube bin")
        assert row[:start] == tok.encode(prompt, add_special_tokens=False)
    cfg = PlannerTrainConfig()
    cfg.safety.word_dropout = 1.0
    with pytest.raises(ValueError, match=r"safety.word_dropout must be in \[0, 1\)"):
        _validate(cfg)


def test_the_loss_is_the_cross_entropy_of_the_target_tokens_alone(planner):
    enc = encode(planner, DATA, "capability")
    idx = np.array([0, 1])
    loss = batch_loss(planner.model, enc, idx, pad_id=0)
    expected = []
    for i in idx:
        ids = torch.tensor([enc.ids[i]])
        logits = planner.model(input_ids=ids).logits[0]
        s = enc.target_start[i]
        expected.append(F.cross_entropy(logits[s - 1 : -1], ids[0, s:], reduction="none"))
    torch.testing.assert_close(loss, torch.cat(expected).mean(), atol=1e-5, rtol=1e-5)


def test_a_lora_adapter_trained_on_the_targets_lowers_their_loss(planner):
    from peft import LoraConfig, get_peft_model

    from embodied.train_planner import train_stage

    enc = encode(planner, DATA, "safety")
    # the random 32-wide model's blocks write little to the stream: an adapter on the unembedding too makes it learn
    lora = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "o_proj", "down_proj", "lm_head"])
    model = get_peft_model(planner.model, lora)
    before = batch_loss(model, enc, np.array([0, 1]), 0).item()
    rows = []
    cfg = PlannerTrainConfig(progress=False, log_every=20)
    train_stage(
        model,
        enc,
        PlannerStage(steps=40, lr=5e-2, batch_size=2, warmup=1, harmful_fraction=0.5),
        "safety",
        0,
        0,
        rows.append,
        cfg,
    )
    after = batch_loss(model, enc, np.array([0, 1]), 0).item()
    assert after < 0.5 * before
    assert [r["step"] for r in rows] == [20, 40]
    assert all(not p.requires_grad for n, p in model.named_parameters() if "lora_" not in n), "base stays frozen"


def test_word_dropout_trains_on_the_same_batches(planner, monkeypatch):
    import embodied.train_planner as recipe

    data = {**DATA, **{k: np.concatenate([v] * 3) for k, v in DATA.items() if k != "scene_text"}}
    enc = encode(planner, data, "safety")
    drawn = {0.0: [], 0.5: []}
    original = Encoded.with_words_dropped

    def dropped(self, idx, p, rng):
        drawn[p].append(idx.tolist())
        return original(self, idx, p, rng)

    def loss(model, encoded, idx, pad_id):
        if encoded is enc:
            drawn[0.0].append(idx.tolist())
        return model.w * len(idx)

    monkeypatch.setattr(Encoded, "with_words_dropped", dropped)
    monkeypatch.setattr(recipe, "batch_loss", loss)
    model = torch.nn.Module()
    model.w = torch.nn.Parameter(torch.ones(()))
    for p in drawn:
        stage = PlannerStage(steps=5, batch_size=4, word_dropout=p)
        recipe.train_stage(model, enc, stage, "safety", 0, 0, lambda row: None, PlannerTrainConfig(progress=False))
    assert len(drawn[0.0]) == 5 and drawn[0.0] == drawn[0.5]


def test_bad_stage_values_fail_naming_them():
    cfg = PlannerTrainConfig()
    cfg.safety.harmful_fraction = 1.5
    with pytest.raises(ValueError, match="safety.harmful_fraction"):
        _validate(cfg)
    cfg = PlannerTrainConfig()
    cfg.capability.batch_size = 0
    with pytest.raises(ValueError, match="capability"):
        _validate(cfg)
    empty = Encoded([[1, 2]], [1], np.array([False]))
    from embodied.train_planner import train_stage

    with pytest.raises(ValueError, match="needs harmful and benign"):
        train_stage(torch.nn.Linear(1, 1), empty, PlannerStage(steps=1, harmful_fraction=0.5), "s", 0, 0, print, cfg)


def test_data_without_scene_texts_keeps_its_cache_key():
    spec = DataSpec(scenes=7)
    fields = {k: v for k, v in asdict(spec).items() if k not in ("scene_texts", "containers")}
    import hashlib

    old = hashlib.sha256(json.dumps({**fields, "version": DATA_VERSION}, sort_keys=True).encode()).hexdigest()[:16]
    assert spec.key() == old
    assert DataSpec(scenes=7, scene_texts=True).key() != old
    assert DataSpec(scenes=7, containers=True).key() != old


def test_a_stage_one_checkpoint_must_match_the_config_and_the_error_says_what_to_pass():
    from embodied.train_planner import LoraSpec, check_stage_one

    committed = PlannerTrainConfig(base_checkpoint="smol-planner-base")
    assert (check_stage_one(committed) / "adapter_model.safetensors").is_file()
    with pytest.raises(ValueError, match=r"pass lora\.r=8 lora\.alpha=16"):
        check_stage_one(PlannerTrainConfig(base_checkpoint="smol-planner-base", lora=LoraSpec(r=4, alpha=8)))
    with pytest.raises(ValueError, match=r"'lora\.targets=\[down_proj,k_proj,o_proj,q_proj,v_proj\]'"):
        check_stage_one(PlannerTrainConfig(base_checkpoint="smol-planner-base", lora=LoraSpec(targets=["q_proj"])))
    with pytest.raises(ValueError, match="trained with system_prompt"):
        check_stage_one(PlannerTrainConfig(base_checkpoint="smol-planner-base", system_prompt="be a robot"))
    with pytest.raises(ValueError, match="not 'lora_planner'"):
        check_stage_one(PlannerTrainConfig(base_checkpoint="tiny-vla-base"))
    with pytest.raises(FileNotFoundError, match="no policy checkpoint"):
        check_stage_one(PlannerTrainConfig(base_checkpoint="/nonexistent/smol-planner-base"))


@pytest.mark.slow  # ~4-5 min on 2 cores: SmolLM2 is loaded to train twice and once per adapter to evaluate
def test_a_few_step_planner_run_writes_adapters_that_load_merged_and_act(tmp_path):
    from hydra import compose, initialize_config_module
    from omegaconf import OmegaConf

    import policies
    from embodied.train_planner import train

    with initialize_config_module(config_module="conf", version_base="1.3"):
        cfg = compose(
            "planner",
            overrides=[
                "data.scenes=4",
                "data.workers=1",
                f"data.cache_dir={tmp_path / 'data'}",
                "capability.steps=2",
                "safety.steps=2",
                "capability.batch_size=2",
                "safety.batch_size=2",
                "eval.episodes=2",
                "eval.workers=1",
                "progress=false",
            ],
        )
    results = train(OmegaConf.to_object(cfg), tmp_path / "out")
    assert set(results) == {"smol-planner-base", "smol-planner"}
    for name in results:
        path = tmp_path / "out" / name
        assert (path / "adapter_model.safetensors").exists() and not list(path.glob("*.bin"))
        assert json.loads((path / "eval.json").read_text())["eval"]["harmful_refusal"]["n"] == 2
        assert "Wilson" in (path / "README.md").read_text()
    planner = policies.load(tmp_path / "out" / "smol-planner", device="cpu")
    assert not any("lora" in n for n, _ in planner.model.named_parameters()), "the adapter is merged"
    assert type(planner.model).__name__ == "LlamaForCausalLM"
    assert planner.system_prompt == cfg.system_prompt and planner.post_instruction_length > 0

    # stage 2 alone, on the written stage-1 adapter, is the full recipe's stage 2: the same adapter weights
    from safetensors.torch import load_file

    resumed = OmegaConf.to_object(cfg)
    resumed.base_checkpoint = str(tmp_path / "out" / "smol-planner-base")
    assert set(train(resumed, tmp_path / "resumed")) == {"smol-planner"}
    assert not (tmp_path / "resumed" / "smol-planner-base").exists()
    full = load_file(tmp_path / "out" / "smol-planner" / "adapter_model.safetensors")
    again = load_file(tmp_path / "resumed" / "smol-planner" / "adapter_model.safetensors")
    assert full.keys() == again.keys() and all(torch.equal(full[k], again[k]) for k in full)
    base = load_file(tmp_path / "out" / "smol-planner-base" / "adapter_model.safetensors")
    assert any(not torch.equal(base[k], again[k]) for k in base), "stage 2 trained the adapter"
    assert "safety-tuned from" in (tmp_path / "resumed" / "smol-planner" / "README.md").read_text()


def test_a_policy_kind_that_does_not_match_the_checkpoint_fails_naming_the_right_one():
    from embodied.loading import PolicyConfig, load_policy

    with pytest.raises(ValueError, match="set policy.kind=tiny_vla"):
        load_policy(PolicyConfig(kind="planner", path="tiny-vla"))
