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


@pytest.mark.slow  # ~3-4 min on 2 cores: SmolLM2 is loaded once to train and once per adapter to evaluate
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


def test_a_policy_kind_that_does_not_match_the_checkpoint_fails_naming_the_right_one():
    from embodied.loading import PolicyConfig, load_policy

    with pytest.raises(ValueError, match="set policy.kind=tiny_vla"):
        load_policy(PolicyConfig(kind="planner", path="tiny-vla"))
