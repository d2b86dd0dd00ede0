"""The abliterated checkpoint: orthogonalized weights saved, loaded back, acting as the ablated policy."""

import json
import math

import pytest
import torch

import policies
from embodied.attacks.abliterate import abliterated_cached
from embodied.directions import SelectionConfig, extract
from embodied.interventions import ablate
from embodied.models import weights_hash
from embodied.prompts import env_prompt_sets


@pytest.fixture(scope="module")
def policy_and_direction():
    policy = policies.load("tiny-vla", device="cpu")
    cfg = SelectionConfig(kl_threshold=math.inf, induce_refusal_threshold=-math.inf, prune_layer_percentage=0.0)
    return policy, extract(policy, env_prompt_sets(n_train=8, n_val=4), cfg, model_name="tiny-vla")


def test_the_abliterated_checkpoint_loads_and_equals_the_ablated_model(tmp_path, policy_and_direction):
    policy, direction = policy_and_direction
    source = policies.checkpoint_path("tiny-vla")
    folder, cached = abliterated_cached(policy, direction, tmp_path, source)
    assert not cached and (folder / "model.safetensors").is_file() and not list(folder.glob("*.bin"))
    meta = json.loads((folder / "attack.json").read_text())
    assert meta["source_weights_hash"] == weights_hash(policy.model) and meta["direction_hash"] == direction.hash
    attacked = policies.load(folder, device="cpu")
    assert weights_hash(attacked.model) == meta["weights_hash"] != meta["source_weights_hash"]

    prompts = env_prompt_sets(n_train=4, n_val=2).harmful_val
    inputs = policy.inputs(prompts)
    with torch.no_grad():
        with ablate(policy.model, direction.direction):
            ablated = policy.model(**inputs).logits[:, -1]
        loaded = attacked.model(**attacked.inputs(prompts)).logits[:, -1]
    torch.testing.assert_close(loaded, ablated, atol=1e-4, rtol=1e-4)
    assert abliterated_cached(policy, direction, tmp_path, source) == (folder, True)
