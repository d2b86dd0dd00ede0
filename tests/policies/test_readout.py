"""The blade-or-safe read-outs: which pixel and token they read, and the probe itself."""

import numpy as np
import pytest
import torch

import policies
from envs.tabletop import TabletopConfig
from policies.tiny_vla.data import DataSpec, vision_pairs
from policies.tiny_vla.modeling_tiny_vla import TinyVLAArch, build_model
from policies.tiny_vla.policy import write_policy_file
from policies.tiny_vla.processing_tiny_vla import build_processor
from policies.tiny_vla.readout import linear_readout, named_object_pixel, pixel_crops, pixel_patches, residuals

ARCH = TinyVLAArch(vision_hidden=32, vision_layers=1, text_hidden=32, text_layers=2)


@pytest.fixture(scope="module")
def pairs(tmp_path_factory):
    return vision_pairs(DataSpec(seed=5), 3, cache_dir=tmp_path_factory.mktemp("cache"), workers=1)


def test_the_named_object_is_found_by_its_colour_and_ambiguity_is_an_error():
    objects = "blue knife 29 30 ; yellow scissors 29 37"
    assert named_object_pixel("hand the yellow object to the child", objects) == (29, 37)
    with pytest.raises(ValueError, match="names no colour that exactly one object"):
        named_object_pixel("hand the red object to the child", objects)


def test_pixel_crops_are_centred_on_the_named_object(pairs):
    crops = pixel_crops(pairs, 6)
    assert crops.shape == (6, 6 * 6 * 3)
    u, v = named_object_pixel(str(pairs["instruction"][0]), str(pairs["objects"][0]))
    centre = crops[0].reshape(6, 6, 3)[3, 3]
    assert torch.allclose(centre, torch.as_tensor(pairs["image"][0][v, u] / 255, dtype=torch.float32))
    patches = pixel_patches(pairs, 8).reshape(6, 8, 8, 3)
    top, left = v // 8 * 8, u // 8 * 8
    assert torch.allclose(patches[0, v - top, u - left], centre)


def test_residuals_read_the_object_patch_and_the_last_prompt_token(pairs, tmp_path):
    torch.manual_seed(0)
    processor = build_processor(ARCH.image_size, ARCH.patch_size)
    build_model(ARCH, processor.tokenizer).save_pretrained(tmp_path)
    processor.save_pretrained(tmp_path)
    write_policy_file(tmp_path, TabletopConfig().camera, ARCH.image_size)
    policy = policies.load(tmp_path, device="cpu")
    at_object, at_last = residuals(policy, pairs, batch_size=4)
    assert at_object.shape == at_last.shape == (6, ARCH.text_layers + 1, ARCH.text_hidden)
    enc = policy.inputs([{"image": pairs["image"][0], "instruction": str(pairs["instruction"][0])}])
    with torch.no_grad():
        features = policy.model.get_image_features(pixel_values=enc["pixel_values"])
    features = (features.pooler_output if hasattr(features, "pooler_output") else features)[0]
    u, v = named_object_pixel(str(pairs["instruction"][0]), str(pairs["objects"][0]))
    patch = (v // ARCH.patch_size) * (ARCH.image_size // ARCH.patch_size) + u // ARCH.patch_size
    assert torch.allclose(at_object[0, 0], features.reshape(-1, ARCH.text_hidden)[patch], atol=1e-5)
    embeddings = policy.model.get_input_embeddings()(enc["input_ids"])[0, -1]
    assert torch.allclose(at_last[0, 0], embeddings, atol=1e-6)


def test_linear_readout_separates_what_is_separable_and_not_noise():
    rng = np.random.default_rng(0)
    x, x_test = (torch.as_tensor(rng.normal(size=(n, 5))) for n in (200, 200))
    y, y_test = (x[:, 2] > 0).numpy(), (x_test[:, 2] > 0).numpy()
    fit, held = linear_readout(x, y, x_test, y_test)
    assert fit > 0.97 and held > 0.95
    noise = rng.random(200) < 0.5
    _, held = linear_readout(x, noise, x_test, rng.random(200) < 0.5)
    assert 0.35 < held < 0.65
