"""The tiny VLA's training pieces: tokenized examples, stage targets, word dropout, a few-step run."""

import numpy as np
import pytest
import torch

from policies.tiny_vla.data import DataSpec, generate
from policies.tiny_vla.modeling_tiny_vla import TinyVLAArch, build_model
from policies.tiny_vla.processing_tiny_vla import REFUSAL, build_processor
from policies.tiny_vla.training import (
    IGNORE,
    StageConfig,
    init_position_embeddings,
    lr_factor,
    pixel_values,
    stage_targets,
    tokenize,
    train_stage,
)

ARCH = TinyVLAArch(vision_hidden=32, vision_layers=1, text_hidden=32, text_layers=2)


@pytest.fixture(scope="module")
def processor():
    return build_processor(ARCH.image_size, ARCH.patch_size)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return generate(DataSpec(scenes=6, tasks_per_scene=3, seed=3), tmp_path_factory.mktemp("data"), workers=1)


def test_safety_targets_refuse_exactly_the_harmful_samples(data):
    cap, safe = stage_targets(data, "capability"), stage_targets(data, "safety")
    for c, s, h, cmd in zip(cap, safe, data["harmful"], data["command"], strict=True):
        assert c == cmd
        assert s == (REFUSAL if h else cmd)
    with pytest.raises(ValueError, match="capability"):
        stage_targets(data, "pretraining")


def test_labels_cover_the_answer_only_and_slot_words_are_never_dropped(processor, data):
    ex = tokenize(processor, data["instruction"], stage_targets(data, "capability"), data["scene"], data["harmful"])
    tok = processor.tokenizer
    for i in range(len(ex)):
        n = int(ex.lengths[i])
        labels = ex.labels[i, :n]
        answer = tok.decode(labels[labels != IGNORE], skip_special_tokens=True)
        assert answer.split() == str(data["command"][i]).split()
        assert tok.convert_ids_to_tokens(int(ex.input_ids[i, n - 1])) == "</s>"
        dropped = tok.convert_ids_to_tokens(ex.input_ids[i, :n][ex.droppable[i, :n]].tolist())
        instruction = tok.tokenize(str(data["instruction"][i]))
        assert set(dropped) <= set(instruction)
        for word in ("red", "knife", "child", "bin"):
            assert word not in dropped
        assert "<image>" not in dropped and "<|end|>" not in dropped


def test_sincos_position_init_gives_distinct_patch_codes(processor):
    model = build_model(ARCH, processor.tokenizer)
    init_position_embeddings(model)
    w = model.model.vision_tower.embeddings.position_embedding.weight[1:].detach()
    sims = torch.nn.functional.cosine_similarity(w[:, None], w[None], dim=-1)
    off_diagonal = sims[~torch.eye(len(w), dtype=torch.bool)]
    assert off_diagonal.max() < 0.999  # every patch has its own code


def _run(processor, data, steps, seed):
    torch.manual_seed(seed)
    model = build_model(ARCH, processor.tokenizer)
    ex = tokenize(processor, data["instruction"], stage_targets(data, "capability"), data["scene"], data["harmful"])
    px = pixel_values(processor, data["image"])
    rows = train_stage(
        model, ex, px, StageConfig(steps=steps, batch_size=8, lr=3e-3, warmup=2, log_every=5), seed, progress=False
    )
    return model, rows


def test_a_few_steps_lower_the_loss_and_are_deterministic(processor, data):
    model_a, rows = _run(processor, data, 30, seed=1)
    assert rows[-1]["loss"] < 0.75 * rows[0]["loss"]
    model_b, rows_b = _run(processor, data, 30, seed=1)
    assert [r["loss"] for r in rows] == [r["loss"] for r in rows_b]
    for (name, a), (_, b) in zip(model_a.state_dict().items(), model_b.state_dict().items(), strict=True):
        assert torch.equal(a, b), name


def test_frozen_embeddings_stay_put(processor, data):
    torch.manual_seed(0)
    model = build_model(ARCH, processor.tokenizer)
    before = model.get_input_embeddings().weight.detach().clone()
    ex = tokenize(processor, data["instruction"], stage_targets(data, "safety"), data["scene"], data["harmful"])
    px = pixel_values(processor, data["image"])
    cfg = StageConfig(steps=5, batch_size=8, freeze_embeddings=True, harmful_fraction=0.5, log_every=5)
    train_stage(model, ex, px, cfg, seed=0, progress=False)
    assert torch.equal(model.get_input_embeddings().weight, before)
    assert model.get_input_embeddings().weight.requires_grad  # restored after the stage
    assert np.isfinite(model.get_output_embeddings().weight.detach().numpy()).all()


def test_grounding_labels_sit_on_the_image_tokens(processor, data):
    from policies.tiny_vla.training import patch_targets

    labels = patch_targets(data["objects"][0], ARCH.image_size, ARCH.patch_size)
    assert len(labels) == ARCH.image_tokens
    columns = [int(item.split()[-2]) for item in str(data["objects"][0]).split(" ; ")]
    assert {int(x) for x in labels if x != "table"} <= set(columns)
    n = len(data["scene"])
    per_example = [patch_targets(data["objects"][s], ARCH.image_size, ARCH.patch_size) for s in data["scene"]]
    ex = tokenize(
        processor, data["instruction"], stage_targets(data, "capability"), data["scene"], data["harmful"], per_example
    )
    tok = processor.tokenizer
    image_id = tok.convert_tokens_to_ids("<image>")
    for i in range(n):
        positions = (ex.input_ids[i] == image_id).nonzero().flatten()
        assert tok.convert_ids_to_tokens(ex.labels[i, positions + 1].tolist()) == per_example[i]
    with pytest.raises(ValueError, match="patch labels"):
        tokenize(processor, data["instruction"][:1], ["refuse"], [0], [False], [["table"] * 3])


def test_grounding_on_both_axes_names_the_column_on_even_patches_and_the_row_on_odd_ones():
    from policies.tiny_vla.training import patch_targets

    objects = "red cube 12 40 ; blue ball 30 20"  # patches (5, 1) -> index 41 (odd), (2, 3) -> index 19 (odd)
    both = patch_targets(objects + " ; green cup 20 0", 64, 8, axes="uv")  # (0, 2) -> index 2 (even)
    assert both[41] == "40" and both[19] == "20" and both[2] == "20"
    assert patch_targets(objects, 64, 8)[41] == "12"  # columns only, by default
    assert sum(x != "table" for x in both) == 3
    with pytest.raises(ValueError, match="'u' or 'uv'"):
        patch_targets(objects, 64, 8, axes="v")


def test_learning_rate_warms_up_linearly_then_decays_by_cosine_to_its_floor():
    assert [lr_factor(s, 4, 20) for s in range(4)] == [0.25, 0.5, 0.75, 1.0]
    decay = [lr_factor(s, 4, 20) for s in range(4, 21)]
    assert decay[0] == 1.0 and all(a > b for a, b in zip(decay, decay[1:], strict=False))
    assert lr_factor(20, 4, 20) == pytest.approx(0.05) and lr_factor(20, 4, 20, floor=0.1) == pytest.approx(0.1)
    assert lr_factor(12, 4, 20, floor=0.0) == pytest.approx(0.5)  # half-way through the decay


def test_balance_draws_every_group_about_equally_often(processor, data):
    from policies.tiny_vla.training import _batches, sampling_weights

    n = len(data["instruction"])
    groups = ["rare" if i < 2 else "common" for i in range(n)]
    ex = tokenize(
        processor, data["instruction"], stage_targets(data, "capability"), data["scene"], data["harmful"], groups=groups
    )
    np.testing.assert_allclose(sampling_weights(ex, 0.0), 1 / n)
    weights = sampling_weights(ex, 1.0)
    assert weights[:2].sum() == pytest.approx(0.5) and weights.sum() == pytest.approx(1.0)
    rng = np.random.default_rng(0)
    for balance, share in ((0.0, 2 / n), (1.0, 0.5)):
        batches = _batches(ex, StageConfig(batch_size=4, balance=balance), rng)
        drawn = np.concatenate([next(batches) for _ in range(2000)])
        assert np.mean(drawn < 2) == pytest.approx(share, abs=0.03)
    # with a harmful share per batch, each harm class is drawn by the same weights
    harmful = ex.harmful.numpy()
    rare = int(np.flatnonzero(harmful)[0])
    ex.group = torch.as_tensor([int(i != rare) for i in range(n)])
    weights = sampling_weights(ex, 1.0)
    expected = weights[rare] / weights[harmful].sum()
    assert expected > 2 / harmful.sum()  # far from the unweighted share
    batches = _batches(ex, StageConfig(batch_size=8, balance=1.0, harmful_fraction=0.5), rng)
    drawn = np.stack([next(batches) for _ in range(2000)])
    assert harmful[drawn[:, :4]].all() and not harmful[drawn[:, 4:]].any()
    assert np.mean(drawn[:, :4] == rare) == pytest.approx(expected, abs=0.03)
