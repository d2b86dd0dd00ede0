"""smol-vla: a pretrained LM (here a tiny random Llama; SmolLM2 in the slow test) composed with ``tiny-vla-base``'s
vision tower, LLaVA-style: the weights it keeps, the prompt training and acting share, the LoRA it trains and its
round trip, and (slow, on SmolLM2) a few-step run whose checkpoints load through ``policies.load`` and act."""

import json

import numpy as np
import pytest
import torch

import policies
from embodied.train_planner import PlannerStage, batch_loss, train_stage
from embodied.train_smol_vla import SmolVLATrainConfig, check_stage_one, encode, lora_config
from envs.tabletop import TabletopEnv
from policies.smol_vla import IMAGE_TOKEN, SmolVLAPolicy, compose, write_policy_file
from policies.tiny_vla.policy import TinyVLAPolicy
from tests.policies.test_hf import build_tokenizer, random_llama

CHATML = ["<|im_start|>", "<|im_end|>", "system", "user", "assistant"]


def tiny_vla_policy(seed: int = 0):
    """A tiny random Llama (with the ChatML words its template uses) given tiny-vla-base's tower; its LM, its source."""
    tok = build_tokenizer()
    tok.add_tokens(CHATML, special_tokens=True)
    language_model = random_llama(tok)
    source = TinyVLAPolicy.from_pretrained(policies.checkpoint_path("tiny-vla-base"), device="cpu")
    torch.manual_seed(seed)
    model, processor = compose(language_model, tok, source.model, source.processor.image_processor)
    return SmolVLAPolicy(model, processor, source.codec, system_prompt="robot"), language_model, source


@pytest.fixture(scope="module")
def composed():
    return tiny_vla_policy()


@pytest.fixture(scope="module")
def observations():
    env = TabletopEnv()
    try:
        return [env.reset(seed=s)[0] for s in (1, 2)]
    finally:
        env.close()


def samples(observations, commands=("pick_place 3 4 to 9 9 h 1 speed 2", "strike 5 6 to 7 8 h 0 speed 1")):
    return {
        "instruction": np.array([o["instruction"] for o in observations]),
        "command": np.array(commands),
        "harmful": np.array([False, True]),
        "scene": np.arange(len(observations)),
    }


def test_the_composition_keeps_the_language_models_and_the_towers_weights(composed):
    policy, language_model, source = composed
    model = policy.model
    for name, weight in language_model.model.state_dict().items():
        got = model.model.language_model.state_dict()[name]
        assert torch.equal(got[: len(weight)], weight), name
    image_id = policy.tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)
    assert image_id == model.config.image_token_index == len(language_model.model.embed_tokens.weight)
    assert not model.model.language_model.embed_tokens.weight[image_id].any(), "the image token's row is never read"
    for name, weight in source.model.model.vision_tower.state_dict().items():
        assert torch.equal(model.model.vision_tower.state_dict()[name], weight), name
    projector = model.model.multi_modal_projector
    assert projector.linear_1.in_features == source.model.config.vision_config.hidden_size
    assert projector.linear_2.out_features == language_model.config.hidden_size
    assert model.config.image_seq_length == policy.image_tokens == 64


def test_training_and_acting_see_the_same_prompt_the_instruction_then_the_image(composed, observations):
    policy, _, _ = composed
    enc = encode(policy, samples(observations), "capability", torch.zeros(2, 3, 64, 64))
    tok = policy.tokenizer
    image_id = tok.convert_tokens_to_ids(IMAGE_TOKEN)
    for i, obs in enumerate(observations):
        acted = policy.inputs([obs])["input_ids"][0].tolist()
        prompt = enc.ids[i][: enc.target_start[i]]
        assert prompt == acted, "the training prompt is the one the policy acts on"
        assert prompt.count(image_id) == 64
        before_image = prompt[: prompt.index(image_id)]
        words = tok.encode(obs["instruction"], add_special_tokens=False)
        assert any(before_image[k : k + len(words)] == words for k in range(len(before_image))), "instruction first"
        post = policy.post_instruction_length
        assert prompt[-post - 1] == image_id and image_id not in prompt[-post:], "post-instruction: after the image"
        target = tok.encode(samples(observations)["command"][i], add_special_tokens=False) + [tok.eos_token_id]
        assert enc.ids[i][enc.target_start[i] :] == target
    assert enc.image_index.tolist() == [0, 1]


def test_lora_trains_the_language_model_and_the_projector_and_lowers_the_loss(composed, observations):
    from peft import get_peft_model

    policy, _, _ = composed
    model = get_peft_model(tiny_vla_policy(seed=1)[0].model, lora_config(SmolVLATrainConfig()))
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert any("lora_" in n for n in trainable) and any("multi_modal_projector" in n for n in trainable)
    assert all(("language_model" in n and "lora_" in n) or "multi_modal_projector" in n for n in trainable)
    with torch.no_grad():  # a random 32-wide unembedding of scale 0.02 cannot make any token likely: scale it up
        model.get_base_model().lm_head.weight.mul_(50)
    with_tower = get_peft_model(tiny_vla_policy(seed=1)[0].model, lora_config(SmolVLATrainConfig(train_vision=True)))
    assert any("vision_tower" in n for n, p in with_tower.named_parameters() if p.requires_grad)

    pixels = policy.inputs(observations)["pixel_values"]
    enc = encode(policy, samples(observations), "capability", pixels)
    pad = policy.tokenizer.pad_token_id
    idx = np.arange(2)
    before = batch_loss(model, enc, idx, pad).item()
    swapped = batch_loss(model, encode(policy, samples(observations), "capability", pixels.flip(0)), idx, pad).item()
    assert swapped != before, "the images go into the loss"
    cfg = SmolVLATrainConfig(progress=False, log_every=20)
    stage = PlannerStage(steps=40, lr=5e-2, batch_size=2, warmup=1)  # a random 32-wide model learns slowly
    rows = []
    train_stage(model, enc, stage, "capability", pad, 0, rows.append, cfg)
    assert batch_loss(model, enc, idx, pad).item() < 0.5 * before
    assert [r["step"] for r in rows] == [20, 40]


def test_a_saved_checkpoint_puts_the_same_model_back_on_a_fresh_composition(composed, observations, tmp_path):
    from peft import PeftModel, get_peft_model

    policy, _, _ = composed
    model = get_peft_model(tiny_vla_policy(seed=2)[0].model, lora_config(SmolVLATrainConfig()))
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(0.05 * torch.randn_like(p))  # a trained adapter, not the identity LoRA starts as
    model.save_pretrained(tmp_path, safe_serialization=True)
    assert not list(tmp_path.glob("*.bin"))
    inputs = policy.inputs(observations)
    want = model.merge_and_unload()(**inputs).logits
    fresh = tiny_vla_policy(seed=3)[0].model  # another projector: the checkpoint's must replace it
    assert not torch.allclose(fresh(**inputs).logits, want)
    loaded = PeftModel.from_pretrained(fresh, str(tmp_path), use_safetensors=True).merge_and_unload()
    torch.testing.assert_close(loaded(**inputs).logits, want)

    write_policy_file(tmp_path, "smollm2", "tiny-vla-base", policy.codec, "robot", 24)
    assert policies.checkpoint_kind(tmp_path) == "smol_vla"
    assert json.loads((tmp_path / "policy.json").read_text())["vision"] == "tiny-vla-base"
    cfg = SmolVLATrainConfig(base_checkpoint=str(tmp_path), system_prompt="robot")
    assert check_stage_one(cfg) == tmp_path
    cfg.lora.r, cfg.train_vision = 4, True
    with pytest.raises(ValueError, match=r"other settings: pass train_vision=False lora.r=8"):
        check_stage_one(cfg)


def test_a_policy_kind_that_does_not_match_the_checkpoint_fails_naming_the_right_one():
    from embodied.loading import PolicyConfig, load_policy

    with pytest.raises(ValueError, match="set policy.kind=tiny_vla"):
        load_policy(PolicyConfig(kind="smol_vla", path="tiny-vla"))
    with pytest.raises(ValueError, match="set policy.kind=planner"):
        load_policy(PolicyConfig(kind="smol_vla", path="smol-planner"))


@pytest.mark.slow  # ~4 min on 2 cores: SmolLM2 is loaded to train twice and once per checkpoint to evaluate
def test_a_few_step_smol_vla_run_writes_checkpoints_that_load_merged_and_act(tmp_path, observations):
    from hydra import compose as compose_config
    from hydra import initialize_config_module
    from omegaconf import OmegaConf
    from safetensors.torch import load_file

    from embodied.train_smol_vla import train

    with initialize_config_module(config_module="conf", version_base="1.3"):
        cfg = compose_config(
            "smol_vla",
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
    assert set(results) == {"smol-vla-base", "smol-vla"}
    for name in results:
        path = tmp_path / "out" / name
        assert (path / "adapter_model.safetensors").exists() and not list(path.glob("*.bin"))
        assert json.loads((path / "eval.json").read_text())["eval"]["harmful_refusal"]["n"] == 2
        assert "Wilson" in (path / "README.md").read_text()
    policy = policies.load(tmp_path / "out" / "smol-vla", device="cpu")
    assert not any("lora" in n for n, _ in policy.model.named_parameters()), "the adapter is merged"
    assert type(policy.model).__name__ == "LlavaForConditionalGeneration"
    assert policy.system_prompt == cfg.system_prompt and policy.post_instruction_length > 0
    assert len(policy.act_batch(observations)) == 2

    # stage 2 alone, on the written stage-1 checkpoint, is the full recipe's stage 2: the same weights
    resumed = OmegaConf.to_object(cfg)
    resumed.base_checkpoint = str(tmp_path / "out" / "smol-vla-base")
    assert set(train(resumed, tmp_path / "resumed")) == {"smol-vla"}
    full = load_file(tmp_path / "out" / "smol-vla" / "adapter_model.safetensors")
    again = load_file(tmp_path / "resumed" / "smol-vla" / "adapter_model.safetensors")
    assert full.keys() == again.keys() and all(torch.equal(full[k], again[k]) for k in full)
    assert any("multi_modal_projector" in k for k in full), "the projector is saved with the adapter"
