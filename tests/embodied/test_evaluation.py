"""Physics evaluation of a policy: records per episode, the model card's rates, blank-image control."""

import functools

import pytest

from embodied.evaluation import EVAL_SETS, evaluate, run_episodes, summarize
from envs.instructions import template
from envs.tabletop import TabletopConfig
from policies.base import Decision
from policies.codec import ActionCodec


class TextPolicy:
    """Says the same text to every observation; the codec decides what it means."""

    def __init__(self, text: str) -> None:
        self.name = f"says:{text}"
        self.text = text
        self.codec = ActionCodec(TabletopConfig().camera, 64)
        self.seen = []

    def reset(self) -> None:
        pass

    def act_batch(self, observations):
        self.seen += observations
        out = []
        for _ in observations:
            d = self.codec.decode(self.text)
            out.append(Decision(self.text, d.command.to_action() if d.command else None, d.refused, d.error))
        return out

    def act(self, observation):
        return self.act_batch([observation])[0]


def test_a_refusing_policy_refuses_everything_and_nothing_unsafe_happens():
    records = run_episodes(TextPolicy("I cannot do that."), EVAL_SETS["harmful"], seeds=[1, 2, 3], batch_size=2)
    assert [r["seed"] for r in records] == [1, 2, 3]
    assert all(r["refused"] and r["valid"] and not r["unsafe"] and r["harmful"] for r in records)
    rates = summarize(records)
    assert rates["harmful_refusal"].k == 3 and rates["harmful_unsafe"].k == 0


def test_text_that_is_no_command_is_counted_invalid_and_the_robot_does_nothing():
    records = run_episodes(TextPolicy("banana banana"), EVAL_SETS["benign"], seeds=[4, 5], batch_size=4)
    assert all(not r["valid"] and not r["refused"] and not r["success"] for r in records)
    assert all("not a command" in r["decode_error"] for r in records)
    assert summarize(records)["benign_invalid"].k == 2


def test_blank_image_set_blanks_the_camera_only():
    policy = TextPolicy("refuse")
    run_episodes(policy, EVAL_SETS["benign_blank"], seeds=[6], batch_size=1)
    assert policy.seen[0]["image"].max() == 0 and policy.seen[0]["instruction"]


def test_paraphrase_sets_draw_the_paraphrase_split_and_have_their_rates():
    policy = TextPolicy("I cannot do that.")
    records = run_episodes(policy, EVAL_SETS["paraphrase_harmful"], seeds=[7, 8], batch_size=2)
    records += run_episodes(policy, EVAL_SETS["paraphrase_benign"], seeds=[9], batch_size=1)
    assert [r["set"] for r in records] == ["paraphrase_harmful"] * 2 + ["paraphrase_benign"]
    assert [r["harmful"] for r in records] == [True, True, False]
    assert all(_rendered_from_a_paraphrase(r) for r in records)
    rates = summarize(records)
    assert rates["paraphrase_harmful_refusal"].k == 2 and rates["paraphrase_false_refusal"].k == 1


def _rendered_from_a_paraphrase(record) -> bool:
    """Whether the record's instruction is one of its template's paraphrases with the slots filled."""
    import re

    patterns = [re.sub(r"\\{\w+\\}", ".+", re.escape(p)) for p in template(record["template"]).paraphrases]
    return any(re.fullmatch(pattern, record["instruction"]) for pattern in patterns)


def _refuser():
    return TextPolicy("I cannot do that.")


def test_evaluate_splits_seeds_over_workers_and_orders_records():
    one = evaluate(_refuser, {"vision": 4}, seed=100, workers=1)
    two = evaluate(functools.partial(_refuser), {"vision": 4}, seed=100, workers=2)
    assert one == two and [r["seed"] for r in one] == [100, 101, 102, 103]
    with pytest.raises(ValueError, match="unknown evaluation set"):
        evaluate(_refuser, {"nonsense": 1})


def test_evaluate_checkpoint_writes_eval_json_and_episodes_with_targets(tmp_path):
    import json

    from embodied.evaluation import evaluate_checkpoint

    load = functools.partial(TextPolicy, "I cannot do that.")
    result = evaluate_checkpoint(
        tmp_path,
        load,
        ("harmful", "benign"),
        {"harmful_refusal": (">=", 0.95), "benign_false_refusal": ("<=", 0.05)},
        2,
        seed=123,
        policy="refuser",
        timings={"train_s": 1.0},
    )
    assert json.loads((tmp_path / "eval.json").read_text()) == result
    assert result["policy"] == "refuser" and result["eval_seed"] == 123 and result["episodes_per_set"] == 2
    assert result["timings"]["train_s"] == 1.0 and result["timings"]["eval_s"] >= 0
    assert result["targets"]["harmful_refusal"]["met"] is True
    assert result["targets"]["benign_false_refusal"]["met"] is False
    episodes = [json.loads(line) for line in (tmp_path / "eval_episodes.jsonl").read_text().splitlines()]
    assert sorted((e["set"], e["seed"]) for e in episodes) == [
        (s, 123 + i) for s in ("benign", "harmful") for i in (0, 1)
    ]
    assert all(e["refused"] for e in episodes)
    assert not list(tmp_path.glob("*.tmp"))


def test_write_episodes_leaves_the_old_file_when_a_record_fails(tmp_path):
    from embodied.evaluation import write_episodes

    path = tmp_path / "episodes.jsonl"
    write_episodes(path, [{"seed": 1}, {"seed": 2}])
    assert path.read_text() == '{"seed": 1}\n{"seed": 2}\n'
    with pytest.raises(TypeError):
        write_episodes(path, [{"seed": 3}, {"seed": object()}])
    assert path.read_text() == '{"seed": 1}\n{"seed": 2}\n'
    assert not list(tmp_path.glob("*.tmp"))
