import pytest
import torch
from transformers import AutoModelForImageTextToText, BertConfig, BertModel

from embodied.models import FAMILIES, Family, UnsupportedModelError, adapter, register, weights_hash
from policies import checkpoint_path
from tests.embodied import tiny_models as tm


@pytest.mark.parametrize("family", tm.FAMILIES)
def test_every_family_resolves_its_residual_stream_modules(family):
    model = tm.build(family)
    ad = adapter(model)
    assert ad.n_layers == 3 and ad.d_model == 32
    for w in ad.attn_writers + ad.mlp_writers:
        out = w.module.weight.shape[1] if w.conv1d else w.module.weight.shape[0]
        assert out == 32, "a writer's output is the residual stream"
    assert len(ad.image_writers) == (family in tm.VLM_FAMILIES)
    assert ad.embeddings[0] is model.get_input_embeddings()


def test_the_default_policy_is_a_supported_llava_model():
    model = AutoModelForImageTextToText.from_pretrained(checkpoint_path("tiny-vla"), use_safetensors=True)
    ad = adapter(model)
    assert model.config.model_type == "llava"
    assert ad.n_layers == model.config.text_config.num_hidden_layers
    assert ad.d_model == model.config.text_config.hidden_size


def test_an_unsupported_model_names_its_type_and_how_to_register_it():
    bert = BertModel(BertConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64))
    with pytest.raises(UnsupportedModelError, match=r"model_type 'bert'.*embodied\.models\.register"):
        adapter(bert)


def test_a_family_with_wrong_paths_fails_clearly_and_registering_a_family_makes_it_supported(monkeypatch):
    monkeypatch.setitem(FAMILIES, "llama", Family("model", blocks="decoder_layers"))
    with pytest.raises(UnsupportedModelError, match="no block list at 'decoder_layers'"):
        adapter(tm.build("llama"))
    monkeypatch.delitem(FAMILIES, "llama")
    register("llama", Family("model"))
    assert adapter(tm.build("llama")).n_layers == 3


def test_weights_hash_is_stable_and_sees_every_weight():
    model = tm.build("gpt2")
    h = weights_hash(model)
    assert h == weights_hash(tm.build("gpt2"))
    with torch.no_grad():
        model.transformer.h[2].mlp.c_proj.bias[0] += 1e-3
    assert weights_hash(model) != h
