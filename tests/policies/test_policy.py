"""The policy contract on a tiny random checkpoint: loading, decisions, batching, errors."""

import numpy as np
import pytest
import torch

import policies
from envs.tabletop import TabletopConfig, TabletopEnv
from policies.base import Decision, Policy
from policies.tiny_vla.modeling_tiny_vla import TinyVLAArch, build_model
from policies.tiny_vla.policy import TinyVLAPolicy, resolve_device, resolve_dtype, write_policy_file
from policies.tiny_vla.processing_tiny_vla import build_processor

ARCH = TinyVLAArch(vision_hidden=32, vision_layers=1, text_hidden=32, text_layers=2)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    path = tmp_path_factory.mktemp("ckpt") / "tiny-random"
    torch.manual_seed(0)
    processor = build_processor(ARCH.image_size, ARCH.patch_size)
    build_model(ARCH, processor.tokenizer).save_pretrained(path)
    processor.save_pretrained(path)
    write_policy_file(path, TabletopConfig().camera, ARCH.image_size)
    return path


@pytest.fixture(scope="module")
def observations():
    env = TabletopEnv(split="test")
    try:
        return [env.reset(seed=s)[0] for s in range(3)]
    finally:
        env.close()


def test_load_gives_a_policy_whose_decisions_follow_the_contract(checkpoint, observations):
    policy = policies.load(checkpoint, device="cpu")
    assert isinstance(policy, Policy) and policy.name == "tiny-random"
    policy.reset()
    d = policy.act(observations[0])
    assert isinstance(d, Decision)
    assert d.first_token_logits.shape == (len(policy.processor.tokenizer),)
    # a random model's text is rarely a command: it must then be an invalid decision, never an exception
    assert (d.action is None) == (d.error is not None) or d.refused


def test_batched_decisions_equal_one_at_a_time(checkpoint, observations):
    policy = policies.load(checkpoint, device="cpu")
    batched = policy.act_batch(observations)
    single = [policy.act(o) for o in observations]
    assert [d.text for d in batched] == [d.text for d in single]
    for a, b in zip(batched, single, strict=True):
        np.testing.assert_allclose(a.first_token_logits, b.first_token_logits, atol=1e-4)
    assert policy.act_batch([]) == []


def test_wrong_image_size_and_missing_checkpoints_fail_clearly(checkpoint, observations):
    policy = policies.load(checkpoint, device="cpu")
    small = {**observations[0], "image": np.zeros((32, 32, 3), np.uint8)}
    with pytest.raises(ValueError, match="image_size to 64"):
        policy.act(small)
    with pytest.raises(FileNotFoundError, match="built-in name"):
        policies.load("/nonexistent/checkpoint")
    with pytest.raises(FileNotFoundError, match="policy.json"):
        TinyVLAPolicy.from_pretrained(checkpoint.parent)


def test_device_and_dtype_are_explicit():
    assert resolve_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    assert resolve_device("cpu").type == "cpu"
    assert resolve_dtype("bfloat16") is torch.bfloat16
    with pytest.raises(ValueError, match="dtype must be one of"):
        resolve_dtype("float8")
