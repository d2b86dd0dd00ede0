"""`embodied-train` end to end on a tiny config: both checkpoints, model cards, eval JSON; config errors."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_module
from omegaconf import OmegaConf
from transformers import AutoModelForImageTextToText, AutoProcessor

import policies
from embodied.train import EVAL_SETS, TrainConfig, train

TINY = [
    "data.scenes=6",
    "data.tasks_per_scene=2",
    "data.workers=1",
    "arch.vision_hidden=32",
    "arch.vision_layers=1",
    "arch.text_hidden=32",
    "arch.text_layers=2",
    "capability.steps=3",
    "capability.batch_size=4",
    "safety.steps=2",
    "safety.batch_size=4",
    "eval.episodes=2",
    "eval.workers=1",
    "eval.batch_size=2",
    "progress=false",
]


def _config(tmp_path, extra=()) -> TrainConfig:
    with initialize_config_module(config_module="conf", version_base="1.3"):
        cfg = compose("train", overrides=[*TINY, f"data.cache_dir={tmp_path / 'cache'}", *extra])
    return OmegaConf.to_object(cfg)


def test_train_writes_both_checkpoints_with_cards_and_evaluations(tmp_path):
    cfg = _config(tmp_path, ["probes=false"])  # the probes have their own test below
    results = train(cfg, tmp_path / "out")
    assert set(results) == {"tiny-vla-base", "tiny-vla"}
    for name in results:
        path = tmp_path / "out" / name
        assert (path / "model.safetensors").exists() and not list(path.glob("*.bin"))
        AutoModelForImageTextToText.from_pretrained(path)
        AutoProcessor.from_pretrained(path)
        policies.load(path, device="cpu")
        result = json.loads((path / "eval.json").read_text())
        assert result["data_hash"] == results[name]["data_hash"]
        card = (path / "README.md").read_text()
        assert result["data_hash"] in card and "Wilson" in card and "harmful_refusal" in card
        episodes = (path / "eval_episodes.jsonl").read_text().splitlines()
        sets = {json.loads(e)["set"] for e in episodes}
        assert len(episodes) == 2 * len(sets) and sets == set(EVAL_SETS[name])
    assert "vision_decided_right" in results["tiny-vla"]["eval"]
    log = [json.loads(line) for line in (tmp_path / "out" / "train_log.jsonl").read_text().splitlines()]
    assert [r["stage"] for r in log if "stage" in r] == ["capability", "safety"]
    assert not any("aux_loss" in r for r in log)


def test_vision_pairs_join_the_rendered_scenes_and_the_card_says_so(tmp_path):
    cfg = _config(tmp_path, ["data.vision_pairs=2", "data.shifted_copies=1"])
    data, digest = cfg.data.load()
    plain, _ = _config(tmp_path).data.load()
    assert len(data["image"]) == 2 * (6 + 4) and len(data["command"]) == 2 * (len(plain["command"]) + 4)
    n = len(plain["command"])
    assert list(data["scene"][n : n + 4]) == [6, 7, 8, 9] and list(data["harmful"][n : n + 4]) == [1, 0, 1, 0]
    from embodied.train import model_card

    result = {"timings": dict.fromkeys(("data_s", "capability_s", "safety_s", "train_s", "eval_s"), 0.0)}
    result |= {"eval_seed": 0, "episodes_per_set": 0, "data_hash": digest, "eval": {}, "targets": {}}
    card = model_card("tiny-vla", cfg, result, data, 1)
    assert "with 2 minimal pairs of the vision-dependent category" in card and "1 copies shifted" in card


def test_probes_train_in_both_stages_and_a_bad_layer_is_named(tmp_path):
    with pytest.raises(ValueError, match="probe_layer must be in 1..2"):
        train(_config(tmp_path, ["probes=true", "probe_layer=5"]), tmp_path / "bad")
    assert _config(tmp_path).probes  # the default recipe
    cfg = _config(tmp_path, ["capability.log_every=1", "safety.log_every=1", "eval.episodes=1"])
    train(cfg, tmp_path / "out")
    log = [json.loads(line) for line in (tmp_path / "out" / "train_log.jsonl").read_text().splitlines()]
    stages = [r for r in log if "stage" in r]
    assert [r["stage"] for r in stages] == ["capability"] * 3 + ["safety"] * 2
    assert all(r["aux_loss"] > 0 for r in stages)
    assert "probes: true" in (tmp_path / "out" / "tiny-vla" / "README.md").read_text()


def test_bad_keys_and_values_fail_with_the_name():
    with initialize_config_module(config_module="conf", version_base="1.3"):
        with pytest.raises(Exception, match="capability.stepz"):
            compose("train", overrides=["capability.stepz=3"])
        with pytest.raises(Exception, match="steps"):
            compose("train", overrides=["capability.steps=many"])


def test_cli_prints_the_composed_config():
    out = subprocess.run(
        [sys.executable, "-m", "embodied.train", "--cfg", "job", "safety.steps=7"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert "steps: 7" in out and "freeze_embeddings: true" in out


def test_subject_probe_can_train_in_safety_only_and_bad_values_are_named(tmp_path):
    for bad, message in (
        ("subject_probe_weight=-1", "subject_probe_weight must be >= 0"),
        ("subject_probe_stages=[pretraining]", "subject_probe_stages may hold"),
    ):
        with pytest.raises(ValueError, match=message):
            train(_config(tmp_path, ["subject_probe=true", bad]), tmp_path / "bad")
    common = ["capability.log_every=1", "safety.log_every=1", "eval.episodes=1", "subject_probe=true"]
    rows = {}
    for stages in ("[safety]", "[capability,safety]"):
        out = tmp_path / stages.strip("[]").replace(",", "_")
        train(_config(tmp_path, [*common, f"subject_probe_stages={stages}"]), out)
        rows[stages] = [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]
    without = tmp_path / "without"
    train(_config(tmp_path, [*common[:3], "subject_probe=false"]), without)
    plain = [json.loads(line) for line in (without / "train_log.jsonl").read_text().splitlines()]

    def losses(log, stage):
        return [x for r in log if r.get("stage") == stage for x in (r["loss"], r["aux_loss"])]

    # off in stage 1, stage 1 trains as without the subject probe; on, its loss is in stage 1's aux loss
    assert losses(rows["[safety]"], "capability") == pytest.approx(losses(plain, "capability"))
    assert losses(rows["[capability,safety]"], "capability") != pytest.approx(losses(plain, "capability"))
    assert losses(rows["[safety]"], "safety") != pytest.approx(losses(plain, "safety"))


def test_safety_tuning_from_a_written_base_checkpoint(tmp_path):
    train(_config(tmp_path), tmp_path / "full")  # with the probes, which stage 1 writes beside its weights
    base = tmp_path / "full" / "tiny-vla-base"
    assert (base / "probes.safetensors").is_file()
    results = train(_config(tmp_path, [f"base_checkpoint={base}"]), tmp_path / "resumed")
    assert set(results) == {"tiny-vla"} and not (tmp_path / "resumed" / "tiny-vla-base").exists()
    log = [json.loads(line) for line in (tmp_path / "resumed" / "train_log.jsonl").read_text().splitlines()]
    assert [r["stage"] for r in log if "stage" in r] == ["safety"]
    card = (tmp_path / "resumed" / "tiny-vla" / "README.md").read_text()
    assert f"safety-tuned from `{base}` (stage 1's probes loaded from probes.safetensors)" in card

    def weights(folder):
        return AutoModelForImageTextToText.from_pretrained(folder).state_dict()

    # the same safety stage on the same weights and probes: the same model as the full recipe's
    full = weights(tmp_path / "full" / "tiny-vla")
    for k, v in weights(tmp_path / "resumed" / "tiny-vla").items():
        assert torch.allclose(full[k], v, atol=1e-6), k
    # without the probes file they start afresh (the card says so), and the model is another
    (base / "probes.safetensors").unlink()
    train(_config(tmp_path, [f"base_checkpoint={base}"]), tmp_path / "afresh")
    card = (tmp_path / "afresh" / "tiny-vla" / "README.md").read_text()
    assert "(probes start afresh: the checkpoint has no probes.safetensors)" in card
    afresh = weights(tmp_path / "afresh" / "tiny-vla")
    assert any(not torch.allclose(full[k], v, atol=1e-6) for k, v in afresh.items())
    with pytest.raises(ValueError, match="arch.text_layers"):
        train(_config(tmp_path, ["probes=false", f"base_checkpoint={base}", "arch.text_layers=3"]), tmp_path / "bad")


def test_probe_warmup_fits_fresh_probes_on_the_base_before_safety_tuning(tmp_path):
    train(_config(tmp_path, ["safety.steps=0"]), tmp_path / "full")
    base = f"base_checkpoint={tmp_path / 'full' / 'tiny-vla-base'}"
    with pytest.raises(ValueError, match="probe_warmup.steps must be >= 0"):
        train(_config(tmp_path, [base, "probe_warmup.steps=-1"]), tmp_path / "bad")
    with pytest.raises(ValueError, match="it needs base_checkpoint"):
        train(_config(tmp_path, ["probe_warmup.steps=3"]), tmp_path / "bad")
    cfg = _config(
        tmp_path,
        [
            base,
            "probe_warmup.steps=3",
            "probe_warmup.log_every=1",
            "probe_warmup.batch_size=4",
            "safety.log_every=1",
            "eval.episodes=1",
        ],
    )
    train(cfg, tmp_path / "resumed")
    log = [json.loads(line) for line in (tmp_path / "resumed" / "train_log.jsonl").read_text().splitlines()]
    assert [r["stage"] for r in log if "stage" in r] == ["probes"] * 3 + ["safety"] * 2


COMMITTED = Path(__file__).parents[2] / "policies" / "checkpoints"


def _card_config(name: str) -> dict:
    card = (COMMITTED / name / "README.md").read_text()
    return OmegaConf.to_container(OmegaConf.create(card.split("```yaml", 1)[1].split("```", 1)[0]))


def _differences(card: dict, defaults: dict, prefix: str = "") -> list[str]:
    out = []
    for key, value in card.items():
        if isinstance(value, dict):
            out += _differences(value, defaults.get(key, {}), f"{prefix}{key}.")
        elif defaults.get(key, "<absent>") != value:
            out.append(f"{prefix}{key}: card {value!r}, default {defaults.get(key, '<absent>')!r}")
    return out


@pytest.mark.parametrize("name", ["tiny-vla-base", "tiny-vla"])
def test_the_recipes_defaults_are_the_committed_checkpoints_config(name):
    """``embodied-train`` with no overrides is the recipe the committed checkpoints were trained with: every key
    their model card records has its default value (keys added later are absent from the card)."""
    defaults = OmegaConf.to_container(OmegaConf.structured(TrainConfig()))
    card = {k: v for k, v in _card_config(name).items() if k not in ("out", "progress")}
    assert _differences(card, defaults) == []


@pytest.mark.slow  # generates the full training data (~165 s on 2 cores, then cached) and trains 50 steps
def test_the_recipe_starts_as_the_committed_training_log(tmp_path):
    """The default recipe's data and first 50 capability steps are those of the committed run: the same data
    hash, and the logged losses within float noise (the committed log's step-50 loss was reproduced to about
    2e-9 on another machine). Catches a change to the data, the initialization, the batches or the losses that
    the committed checkpoints would no longer match. The warm-up lasts 50 steps, so a 50-step stage runs the
    full recipe's first 50 steps exactly."""
    log = [json.loads(line) for line in (COMMITTED / "train_log.jsonl").read_text().splitlines()]
    committed = next(r for r in log if r.get("stage") == "capability" and r["step"] == 50)
    data_event = next(r for r in log if r.get("event") == "data")
    cfg = TrainConfig(progress=False)
    assert cfg.capability.warmup == 50
    cfg.data.cache_dir = str(COMMITTED.parents[1] / ".cache" / "embodied")  # shared with embodied-train
    cfg.capability.steps, cfg.safety.steps = 50, 1
    cfg.eval.episodes = 1
    train(cfg, tmp_path)
    rows = [json.loads(line) for line in (tmp_path / "train_log.jsonl").read_text().splitlines()]
    data = next(r for r in rows if r.get("event") == "data")
    assert (data["hash"], data["samples"]) == (data_event["hash"], data_event["samples"])
    step50 = next(r for r in rows if r.get("stage") == "capability" and r["step"] == 50)
    assert step50["loss"] == pytest.approx(committed["loss"], rel=1e-6)
    assert step50["aux_loss"] == pytest.approx(committed["aux_loss"], rel=1e-6)
