"""Training-only probes of the tiny VLA: their labels, their training, and checkpoints that stay stock."""

import numpy as np
import pytest
import torch

from policies.tiny_vla.auxiliary import (
    PROBES_FILE,
    ROLES,
    AuxiliaryHeads,
    build_auxiliary,
    command_subject,
    load_heads,
    object_classes,
    patch_identities,
    patch_roles,
    save_heads,
)
from policies.tiny_vla.data import DataSpec, generate
from policies.tiny_vla.modeling_tiny_vla import TinyVLAArch, build_model
from policies.tiny_vla.processing_tiny_vla import build_processor
from policies.tiny_vla.training import (
    StageConfig,
    fit_probes,
    pixel_values,
    stage_targets,
    tokenize,
    train_stage,
)

ARCH = TinyVLAArch(vision_hidden=32, vision_layers=1, text_hidden=32, text_layers=2)


def test_identities_name_the_object_at_its_patch_and_the_first_listed_wins():
    classes = object_classes()
    labels = patch_identities("red cube 12 40 ; blue ball 13 41 ; green cup 63 0", 64, 8, classes)
    assert labels.shape == (64,)
    assert classes[labels[5 * 8 + 1]] == "red cube"  # (12, 40) -> row 5, column 1; the blue ball shares it
    assert classes[labels[7]] == "green cup"
    assert (labels > 0).sum() == 2
    with pytest.raises(ValueError, match="purple unicorn"):
        patch_identities("purple unicorn 1 1", 64, 8, classes)


def test_roles_mark_target_and_goal_patches_of_the_command():
    roles = patch_roles("pick_place 21 40 to 33 12 h 2 speed 2", 64, 8)
    assert ROLES[roles[5 * 8 + 2]] == "target" and ROLES[roles[1 * 8 + 4]] == "goal"
    assert (roles > 0).sum() == 2
    move = patch_roles("move 40 15 h 9 speed 7", 64, 8)
    assert ROLES[move[1 * 8 + 5]] == "target" and (move > 0).sum() == 1
    assert not patch_roles("refuse", 64, 8).any()
    same_patch = patch_roles("push 30 30 to 31 29 h 3 speed 2", 64, 8)
    assert ROLES[same_patch[3 * 8 + 3]] == "target" and (same_patch > 0).sum() == 1


def test_subject_is_the_object_at_the_commands_target_pixel():
    classes = object_classes()
    ids = patch_identities("red knife 12 40 ; blue ball 50 10", 64, 8, classes)
    assert classes[command_subject("handover 12 40 to 55 31 h 2 speed 2", ids, 64, 8)] == "red knife"
    assert classes[command_subject("pick_place 50 10 to 12 40 h 1 speed 1", ids, 64, 8)] == "blue ball"
    assert command_subject("move 30 30 h 9 speed 7", ids, 64, 8) == 0  # no object there
    assert command_subject("refuse", ids, 64, 8) == 0


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return generate(DataSpec(scenes=6, tasks_per_scene=3, seed=3), tmp_path_factory.mktemp("data"), workers=1)


def test_probes_learn_beside_the_model_and_the_checkpoint_stays_stock(data, tmp_path):
    processor = build_processor(ARCH.image_size, ARCH.patch_size)
    torch.manual_seed(0)
    model = build_model(ARCH, processor.tokenizer)
    stock_keys = set(model.state_dict())
    image_id = processor.tokenizer.convert_tokens_to_ids(processor.image_token)
    aux = build_auxiliary(data, ARCH.image_size, ARCH.patch_size, ARCH.text_hidden, 1, image_id)
    assert aux.identity.shape == aux.role.shape == (len(data["command"]), ARCH.image_tokens)
    for command, roles in zip(data["command"], aux.role.numpy(), strict=True):
        np.testing.assert_array_equal(roles, patch_roles(command, ARCH.image_size, ARCH.patch_size))
    ex = tokenize(processor, data["instruction"], stage_targets(data, "capability"), data["scene"], data["harmful"])
    cfg = StageConfig(steps=30, batch_size=8, lr=3e-3, warmup=2, log_every=5)
    rows = train_stage(model, ex, pixel_values(processor, data["image"]), cfg, 0, progress=False, auxiliary=aux)
    assert all("aux_loss" in r for r in rows)
    assert rows[-1]["aux_loss"] < 0.5 * rows[0]["aux_loss"]
    model.save_pretrained(tmp_path, safe_serialization=True)
    assert set(model.state_dict()) == stock_keys  # the probes were never part of the model


def test_containers_are_opt_in_identity_classes_listed_with_the_scene_objects():
    from envs import TabletopEnv
    from policies.codec import ActionCodec
    from policies.tiny_vla.data import scene_objects

    assert not {"bin", "tray"} & set(object_classes())  # the committed checkpoints' probes
    classes = object_classes(containers=True)
    assert {"bin", "tray"} <= set(classes)
    env = TabletopEnv(image_size=64, categories=("place",))
    try:
        env.reset(seed=0)
        codec = ActionCodec.for_env(env)
        container = env.task.goal_entity
        assert f"{container} " not in scene_objects(env, codec)
        listed = scene_objects(env, codec, containers=True)
        assert f"{container} " in listed
        assert classes.index(container) in patch_identities(listed, 64, 8, classes)
    finally:
        env.close()


def _model_with_subject_probe(data):
    """A fresh tiny model, its processor, the image token's id and probes (a subject head too) at layer 1."""
    processor = build_processor(ARCH.image_size, ARCH.patch_size)
    torch.manual_seed(0)
    model = build_model(ARCH, processor.tokenizer)
    image_id = processor.tokenizer.convert_tokens_to_ids(processor.image_token)
    aux = build_auxiliary(data, ARCH.image_size, ARCH.patch_size, ARCH.text_hidden, 1, image_id, subject=True)
    return processor, model, image_id, aux


def test_subject_probe_reads_the_decision_position_and_learns(data):
    processor, model, image_id, aux = _model_with_subject_probe(data)
    classes = object_classes()
    expected = [
        command_subject(c, patch_identities(data["objects"][s], ARCH.image_size, ARCH.patch_size, classes), 64, 8)
        for c, s in zip(data["command"], data["scene"], strict=True)
    ]
    assert aux.subject.tolist() == expected and any(expected)
    ex = tokenize(processor, data["instruction"], stage_targets(data, "capability"), data["scene"], data["harmful"])
    first_target = [int((row != -100).nonzero()[0]) for row in ex.labels]
    assert ex.prompt_lengths.tolist() == first_target  # the answer starts right after the prompt

    # the subject head reads the decision position: changing the hidden state there changes its loss, elsewhere not
    idx = torch.arange(4)
    hidden = [torch.randn(4, int(ex.lengths[:4].max()), ARCH.text_hidden) for _ in range(ARCH.text_layers + 1)]
    mask = ex.input_ids[idx, : hidden[0].shape[1]] == image_id
    args = (mask, aux.identity[idx], aux.role[idx], aux.subject[idx], ex.prompt_lengths[idx] - 1)
    base = aux.heads.loss(hidden, *args)
    moved = [h.clone() for h in hidden]
    moved[1][0, int(ex.prompt_lengths[0]) - 1] += 5.0
    assert not torch.isclose(aux.heads.loss(moved, *args), base)
    moved = [h.clone() for h in hidden]
    moved[1][0, int(ex.prompt_lengths[0])] += 5.0  # the first answer token: not read
    assert torch.isclose(aux.heads.loss(moved, *args), base)
    with pytest.raises(ValueError, match="subject labels"):
        aux.heads.loss(hidden, *args[:3])

    # the subject head's loss is added times its weight
    read = hidden[1][torch.arange(4), ex.prompt_lengths[idx] - 1]
    subject_loss = torch.nn.functional.cross_entropy(aux.heads.subject(read), aux.subject[idx])
    aux.heads.subject_weight = 0.25
    assert torch.isclose(aux.heads.loss(hidden, *args), base - 0.75 * subject_loss)
    # at weight 0 the head takes no part: the identity and role loss alone, and no gradient for the head
    aux.heads.subject_weight = 0.0
    aux.heads.zero_grad(set_to_none=True)
    alone = aux.heads.loss(hidden, *args)
    assert torch.isclose(alone, base - subject_loss)
    alone.backward()
    assert aux.heads.subject.weight.grad is None and aux.heads.identity.weight.grad is not None
    aux.heads.zero_grad(set_to_none=True)
    aux.heads.subject_weight = 1.0

    cfg = StageConfig(steps=30, batch_size=8, lr=3e-3, warmup=2, log_every=5)
    rows = train_stage(model, ex, pixel_values(processor, data["image"]), cfg, 0, progress=False, auxiliary=aux)
    assert rows[-1]["aux_loss"] < 0.5 * rows[0]["aux_loss"]


def test_fit_probes_trains_the_probes_and_leaves_the_model_as_it_was(data):
    processor, model, image_id, aux = _model_with_subject_probe(data)
    ex = tokenize(processor, data["instruction"], stage_targets(data, "safety"), data["scene"], data["harmful"])
    before = {k: v.clone() for k, v in model.state_dict().items()}
    head = aux.heads.subject.weight.detach().clone()
    cfg = StageConfig(steps=40, batch_size=8, lr=3e-2, warmup=2, log_every=5)
    rows = fit_probes(model, ex, pixel_values(processor, data["image"]), cfg, 0, aux, progress=False)
    assert rows[-1]["aux_loss"] < 0.7 * rows[0]["aux_loss"]
    assert not torch.equal(aux.heads.subject.weight, head)
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k
    assert all(p.requires_grad for p in model.parameters())  # trainable again for the stage that follows


def test_saved_heads_load_back_where_they_fit_and_are_left_alone_where_not(tmp_path):
    torch.manual_seed(0)
    saved = AuxiliaryHeads(32, 5, layer=1)
    save_heads(saved, tmp_path)
    assert [p.name for p in tmp_path.iterdir()] == [PROBES_FILE]

    # the same heads, and a subject head the file lacks: loaded, the subject head starts afresh
    torch.manual_seed(1)
    loaded = AuxiliaryHeads(32, 5, layer=1, subject=True)
    fresh_subject = loaded.subject.weight.detach().clone()
    assert load_heads(loaded, tmp_path) == f"stage 1's probes loaded from {PROBES_FILE}; subject afresh"
    for k, v in saved.state_dict().items():
        assert torch.equal(loaded.state_dict()[k], v), k
    assert torch.equal(loaded.subject.weight, fresh_subject)

    # another layer, other classes, or no file: nothing is loaded, and the note says why
    for other, why in (
        (AuxiliaryHeads(32, 5, layer=2), "read layer 1, these read layer 2"),
        (AuxiliaryHeads(32, 7, layer=1), "differ in shape (identity.bias, identity.weight"),
    ):
        before = {k: v.clone() for k, v in other.state_dict().items()}
        note = load_heads(other, tmp_path)
        assert note.startswith("probes start afresh") and why in note
        for k, v in other.state_dict().items():
            assert torch.equal(v, before[k]), k
    assert "no probes.safetensors" in load_heads(saved, tmp_path / "missing")
