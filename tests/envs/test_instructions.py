import numpy as np
import pytest

from envs import instructions
from envs.instructions import (
    PARAPHRASE,
    SPLITS,
    categories,
    check_templates,
    combo_harmful,
    combo_splits,
    combos,
    combos_in,
    make_task,
    parse_instruction,
    render,
    sample_task,
    scene_request,
    templates,
)
from envs.scene import sample_scene


def test_template_data_has_no_typos():
    assert check_templates() == []


def test_categories_cover_the_harms_and_every_skill():
    harmful = {c for c, h in categories().items() if h}
    assert {"blade_to_person", "strike_person", "break_fragile", "hot_liquid", "unsafe_near_child"} <= harmful
    benign_skills = {t.skill for t in templates() if t.harmful is False}
    assert benign_skills == {"pick_place", "handover", "push", "throw", "pour", "move", "strike"}
    assert any(t.harmful is None and t.vision for t in templates())


def test_vision_category_has_harmful_and_benign_combinations_in_every_split():
    (t,) = [t for t in templates() if t.vision]
    for split in SPLITS:
        labels = {combo_harmful(t, c) for c in combos_in(t, split)}
        assert labels == {True, False}, split
    # the same words, two labels: the text does not decide
    texts = {(render(t, 0, c), combo_harmful(t, c)) for c in combos(t)}
    by_text: dict[str, set] = {}
    for text, harm in texts:
        by_text.setdefault(text, set()).add(harm)
    assert any(v == {True, False} for v in by_text.values())


def test_splits_are_disjoint_fixed_and_cover_every_combination():
    for t in templates():
        table = combo_splits(t.id)
        assert set(table) == {c.key() for c in combos(t)}
        assert set(table.values()) == set(SPLITS)
        assert t.phrasing_split(len(t.phrasings) - 1) == "test"
        assert t.phrasing_split(len(t.phrasings) - 2) == "val"
    before = dict(combo_splits("place_container"))
    combo_splits.cache_clear()
    assert combo_splits("place_container") == before  # recomputed from the seeded shuffle, not remembered


def test_sampling_is_deterministic_and_respects_split():
    a = [sample_task(np.random.default_rng(7), "test")[0] for _ in range(3)]
    b = [sample_task(np.random.default_rng(7), "test")[0] for _ in range(3)]
    assert a == b
    for seed in range(30):
        task, _ = sample_task(np.random.default_rng(seed), "val")
        assert task.split == "val"
    with pytest.raises(ValueError, match="split must be one of"):
        sample_task(np.random.default_rng(0), "holdout")
    with pytest.raises(ValueError, match="unknown categories"):
        sample_task(np.random.default_rng(0), "train", ("juggling",))


def test_paraphrase_split_is_new_wording_on_the_test_combinations():
    template_phrasings = {p for t in templates() for p in t.phrasings}
    for t in templates():
        indices = t.phrasings_in(PARAPHRASE)
        assert len(indices) >= 3 and all(t.phrasing_split(i) == PARAPHRASE for i in indices)
        assert {t.text(i) for i in indices} == set(t.paraphrases)
        assert not set(t.paraphrases) & template_phrasings
        assert combos_in(t, PARAPHRASE) == combos_in(t, "test")
        assert all(i not in t.phrasings_in("all") for i in indices)  # 'all' stays train + val + test
    seen = set()
    for seed in range(40):
        task, _ = sample_task(np.random.default_rng(seed), PARAPHRASE)
        t = instructions.template(task.template)
        assert task.split == PARAPHRASE
        assert any(
            task.instruction == render(t, i, c) for i in t.phrasings_in(PARAPHRASE) for c in combos_in(t, "test")
        )
        seen.add(task.harmful)
    assert seen == {True, False}


def test_a_paraphrase_that_repeats_a_template_phrasing_is_reported(monkeypatch):
    import dataclasses

    t = templates()[0]
    leaky = dataclasses.replace(t, paraphrases=(t.phrasings[0], *t.paraphrases))
    monkeypatch.setattr(instructions, "templates", lambda: (leaky,))
    problems = check_templates()
    assert any("is also a template phrasing" in p for p in problems), problems
    bare = dataclasses.replace(t, paraphrases=t.paraphrases[:1])
    monkeypatch.setattr(instructions, "templates", lambda: (bare,))
    assert any("needs >= 3 paraphrases" in p for p in check_templates())


@pytest.mark.parametrize("t", templates(), ids=lambda t: t.id)
def test_every_phrasing_parses_back_to_its_task(t):
    rng = np.random.default_rng(0)
    c = combos_in(t, "train")[0]
    spec = sample_scene(scene_request(t, c), rng)
    for i in range(len(t.all_phrasings)):
        task = make_task(t, c, i, t.phrasing_split(i))
        parsed = parse_instruction(task.instruction.upper() + ".", spec)
        assert parsed is not None, task.instruction
        assert (parsed.skill, parsed.object, parsed.goal_kind) == (task.skill, task.object, task.goal_kind)
        assert parsed.harmful == task.harmful


def test_unknown_text_does_not_parse():
    spec = sample_scene(scene_request(templates()[0], combos(templates()[0])[0]), np.random.default_rng(0))
    assert parse_instruction("recite a poem about the sea", spec) is None


def test_swap_kind_changes_only_that_object_and_refuses_what_would_not_fit():
    from envs.scene import ObjectSpec, PersonSpec, SceneSpec, swap_kind

    scene = SceneSpec(
        objects=(ObjectSpec("knife", "red", 0.4, 0.0, 0.1), ObjectSpec("cube", "blue", 0.3, 0.2)),
        people=(PersonSpec("child", "left_near"),),
    )
    twin = swap_kind(scene, ("knife", "red"), "cube", np.random.default_rng(0))
    swapped, other = twin.objects
    assert (swapped.kind, swapped.color, swapped.x, swapped.y) == ("cube", "red", 0.4, 0.0)
    assert other == scene.objects[1] and twin.people == scene.people
    with pytest.raises(ValueError, match="may touch the neighbours"):
        swap_kind(scene, ("cube", "blue"), "knife", np.random.default_rng(0))  # a knife is larger than a cube
    with pytest.raises(ValueError, match="holds no green knife"):
        swap_kind(scene, ("knife", "green"), "cube", np.random.default_rng(0))
    with pytest.raises(ValueError, match="unknown object kind"):
        swap_kind(scene, ("knife", "red"), "spoon", np.random.default_rng(0))
    posed = SceneSpec(objects=(ObjectSpec("knife", "red", 0.4, 0.2),))  # a user may pose a blade anywhere
    with pytest.raises(ValueError, match="must lie within y"):  # the sampler keeps them mid-table
        swap_kind(posed, ("knife", "red"), "scissors", np.random.default_rng(0))
