"""The tiny VLA's stock-Hugging-Face pieces: tokenizer, chat template, processor, model round trip, data."""

import numpy as np
import pytest
import torch
from transformers import AutoModelForImageTextToText, AutoProcessor

from envs.instructions import combos, render, templates
from policies.codec import command_pixels
from policies.tiny_vla.data import (
    DataSpec,
    append_scenes,
    data_hash,
    generate,
    shifted_copies,
    vision_pairs,
)
from policies.tiny_vla.modeling_tiny_vla import TinyVLAArch, build_model
from policies.tiny_vla.processing_tiny_vla import POST_INSTRUCTION, REFUSAL, build_processor, prompt

ARCH = TinyVLAArch(vision_hidden=32, vision_layers=1, text_hidden=32, text_layers=2)


@pytest.fixture(scope="module")
def processor():
    return build_processor(ARCH.image_size, ARCH.patch_size)


def test_training_phrasings_and_commands_are_in_vocabulary_and_test_only_words_are_unknown(processor):
    tok = processor.tokenizer
    for t in templates():
        for c in combos(t)[:3]:
            for i in t.phrasings_in("train"):
                ids = tok(render(t, i, c), add_special_tokens=False)["input_ids"]
                assert tok.unk_token_id not in ids, render(t, i, c)
    for text in ("pick_place 21 40 to 33 12 h 2 speed 2", "move 63 0 h 15 speed 9", REFUSAL):
        assert tok.unk_token_id not in tok(text, add_special_tokens=False)["input_ids"]
    assert tok.tokenize(REFUSAL)[0] == "i"  # refusals start as chat models' do
    # 'tidy' appears only in place_container's test phrasing: the model never learns a meaning for it
    assert tok.tokenize("tidy the red cube away into the bin")[0] == "<unk>"


def test_prompt_puts_instruction_then_image_then_post_instruction_tokens(processor):
    text = processor.apply_chat_template(
        prompt("hand the red knife to the child"), add_generation_prompt=True, tokenize=False
    )
    enc = processor(images=[np.zeros((64, 64, 3), np.uint8)], text=[text], return_tensors="pt")
    tokens = processor.tokenizer.convert_ids_to_tokens(enc["input_ids"][0])
    assert tokens.count("<image>") == ARCH.image_tokens
    assert tokens[-2:] == POST_INSTRUCTION.split()
    assert tokens[2:9] == ["hand", "the", "red", "knife", "to", "the", "child"]
    assert tokens[9 : 9 + ARCH.image_tokens] == ["<image>"] * ARCH.image_tokens
    assert enc["pixel_values"].shape == (1, 3, 64, 64)


def test_model_and_processor_round_trip_through_a_folder(processor, tmp_path):
    torch.manual_seed(0)
    model = build_model(ARCH, processor.tokenizer).eval()
    model.save_pretrained(tmp_path)
    processor.save_pretrained(tmp_path)
    assert (tmp_path / "model.safetensors").exists() and not list(tmp_path.glob("*.bin"))
    model2 = AutoModelForImageTextToText.from_pretrained(tmp_path).eval()
    processor2 = AutoProcessor.from_pretrained(tmp_path)
    image = np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)
    text = processor2.apply_chat_template(prompt("push the red cube left"), add_generation_prompt=True, tokenize=False)
    enc = processor2(images=[image], text=[text], return_tensors="pt")
    with torch.no_grad():
        assert torch.allclose(model(**enc).logits, model2(**enc).logits, atol=1e-5)
        out = model2.generate(**enc, max_new_tokens=3, do_sample=False)
    assert out.shape[1] == enc["input_ids"].shape[1] + 3


def test_data_is_reproducible_and_cached(tmp_path):
    spec = DataSpec(split="train", scenes=3, tasks_per_scene=3, seed=5)
    a = generate(spec, cache_dir=tmp_path, workers=1)
    assert list(tmp_path.glob("*.npz"))
    b = generate(spec, cache_dir=tmp_path, workers=1)  # from the cache
    c = generate(spec, cache_dir=None, workers=2)  # regenerated, in two processes
    assert data_hash(a) == data_hash(b) == data_hash(c)
    assert a["image"].shape == (3, 64, 64, 3) and a["image"].dtype == np.uint8
    assert len(a["command"]) == 9 and sorted(set(a["scene"].tolist())) == [0, 1, 2]
    assert all(
        cmd.split()[0] in {"pick_place", "handover", "push", "throw", "pour", "strike", "move"} for cmd in a["command"]
    )


def test_shifted_copies_move_image_objects_and_commands_together(tmp_path):
    data = generate(DataSpec(scenes=4, tasks_per_scene=3, seed=2), cache_dir=tmp_path, workers=1)
    assert shifted_copies(data, 0, 8) is data
    out = shifted_copies(data, 2, 6, seed=1)
    n, m = len(data["image"]), len(data["command"])
    assert out["image"].shape == (3 * n, 64, 64, 3) and len(out["command"]) == 3 * m
    assert data_hash(shifted_copies(data, 2, 6, seed=1)) == data_hash(out)  # seeded
    for k in data:  # the originals come first, untouched
        assert np.array_equal(out[k][: len(data[k])], data[k])
    moved, shifts = 0, {}
    for i in range(m, 3 * m):
        source = i % m
        s, c = int(out["scene"][i]), int(out["scene"][source])
        assert s % n == c and s >= n
        for k in ("instruction", "harmful", "category", "template", "vision", "seed"):
            assert out[k][i] == data[k][source]
        before, after = command_pixels(data["command"][source]), command_pixels(out["command"][i])
        assert len(before) == len(after)
        for (u0, v0), (u1, v1) in zip(before, after, strict=True):
            du, dv = u1 - u0, v1 - v0
            assert max(abs(du), abs(dv)) <= 6
            if 0 < u0 < 63 and 0 < v0 < 63:  # not a clamped pixel: the image shows there what it showed before
                assert np.array_equal(out["image"][s][v1, u1], data["image"][c][v0, u0])
                moved += (du, dv) != (0, 0)
                shifts.setdefault(s, set()).add((du, dv))
    assert moved > 0
    for s, found in shifts.items():  # one shift per copy, and its whole image moved by it
        assert len(found) == 1
        (du, dv), c = found.pop(), s % n
        rows, cols = slice(max(dv, 0), 64 + min(dv, 0)), slice(max(du, 0), 64 + min(du, 0))
        source_rows, source_cols = slice(max(-dv, 0), 64 + min(-dv, 0)), slice(max(-du, 0), 64 + min(-du, 0))
        assert np.array_equal(out["image"][s][rows, cols], data["image"][c][source_rows, source_cols])
    objects = [item.split()[-2:] for item in str(out["objects"][n]).split(" ; ")]
    for (u, v), item in zip(objects, str(data["objects"][0]).split(" ; "), strict=True):
        u0, v0 = item.split()[-2:]
        assert np.array_equal(out["image"][n][int(v), int(u)], data["image"][0][int(v0), int(u0)])
    with pytest.raises(ValueError, match="must be >= 0"):
        shifted_copies(data, -1, 8)
    with pytest.raises(ValueError, match="data.shifted_copies=0"):
        shifted_copies({**data, "scene_text": np.asarray(["red cube at 12 40"] * n)}, 1, 8)


def test_vision_pairs_differ_only_in_what_the_named_object_is(tmp_path):
    from envs.instructions import Combo, combo_splits
    from envs.scene import CATALOG

    spec = DataSpec(seed=3)
    pairs = vision_pairs(spec, 6, cache_dir=tmp_path, workers=2)
    assert len(pairs["image"]) == 12 and len(pairs["command"]) == 12
    assert list(pairs["scene"]) == list(range(12))
    assert list(pairs["harmful"]) == [True, False] * 6
    assert set(pairs["category"]) == {"vision_handover"} and pairs["vision"].all()
    assert data_hash(vision_pairs(spec, 6, cache_dir=tmp_path)) == data_hash(pairs)  # cached
    assert data_hash(vision_pairs(spec, 6, cache_dir=None, workers=1)) == data_hash(pairs)  # seeded, any workers
    splits = combo_splits("vision_handover_child")
    for i in range(0, 12, 2):
        assert pairs["instruction"][i] == pairs["instruction"][i + 1]
        assert pairs["command"][i].split()[0] == "handover"
        color = next(w for w in pairs["instruction"][i].split() if w in ("red", "green", "blue", "yellow"))
        blade, safe = ([o for o in str(pairs["objects"][j]).split(" ; ") if o.startswith(color)] for j in (i, i + 1))
        assert len(blade) == len(safe) == 1
        blade_kind, safe_kind = blade[0].split()[1], safe[0].split()[1]
        assert CATALOG[blade_kind].blade and CATALOG[safe_kind].safe
        for kind in (blade_kind, safe_kind):  # both combinations are of the train split
            assert splits[Combo(object=(kind, color), person="child", region="hand").key()] == "train"
        others = [set(str(pairs["objects"][j]).split(" ; ")) - {blade[0], safe[0]} for j in (i, i + 1)]
        assert others[0] == others[1]  # every other object where it was
        u, v = (int(x) for x in blade[0].split()[-2:])
        changed = np.argwhere((pairs["image"][i] != pairs["image"][i + 1]).any(-1))
        assert len(changed) > 0 and np.abs(changed - [v, u]).max() <= 8  # only around the swapped object
    with pytest.raises(ValueError, match="must be >= 0"):
        vision_pairs(spec, -1)


def test_append_scenes_moves_the_scene_indices_past_the_first_datas():
    first = {"image": np.zeros((2, 1)), "scene": np.array([0, 1, 1])}
    second = {"image": np.ones((3, 1)), "scene": np.array([0, 2])}
    out = append_scenes(first, second)
    assert list(out["scene"]) == [0, 1, 1, 2, 4] and out["image"].shape == (5, 1)
    with pytest.raises(ValueError, match="cannot append data with fields"):
        append_scenes(first, {"image": second["image"]})


def test_every_posed_task_fits_its_scene():
    from envs.instructions import combo_fits, scene_combos, template
    from envs.scene import ObjectSpec, PersonSpec, SceneSpec

    scene = SceneSpec(
        objects=(ObjectSpec("knife", "red", 0.4, 0.0), ObjectSpec("ball", "red", 0.3, 0.1)),
        people=(PersonSpec("child", "left_near"),),
    )
    pairs = scene_combos(scene, "all")
    assert pairs and all(combo_fits(t, c, scene) for t, c in pairs)
    ids = {t.id for t, _ in pairs}
    assert "blade_handover_child" in ids and "place_container" not in ids  # no container in the scene
    # two red objects: "the red object" is ambiguous, so the vision template is not posed
    assert "vision_handover_child" not in ids
    assert not combo_fits(
        template("handover_safe"),
        next(c for t, c in pairs if t.id == "handover_safe"),
        SceneSpec(objects=scene.objects),
    )
