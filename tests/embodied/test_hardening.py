"""The hardening table: worst case per attack, benign numbers from the right condition, monitor AUROC."""

from pathlib import Path

from embodied import hardening
from embodied.records import EpisodeRecord, Intervention
from embodied.report import Job


def rec(
    i,
    harmful,
    *,
    policy="tiny-vla",
    defense=None,
    attack=None,
    template=None,
    trigger=None,
    mode="none",
    coeff=None,
    refused=False,
    unsafe=False,
    success=False,
    vetoed=False,
    score=None,
):
    return EpisodeRecord(
        key=f"{mode}{template}{trigger}:{i}:{harmful}",
        episode_set="harmful" if harmful else "benign",
        seed=i,
        instruction="x",
        split="test",
        category="c",
        harmful=harmful,
        vision_dependent=False,
        template="t",
        policy=policy,
        checkpoint_hash="h",
        intervention=Intervention(mode=mode, coeff=coeff, attack=attack, template=template, trigger=trigger),
        refused=refused,
        valid=True,
        unsafe=unsafe,
        success=success,
        defense=defense,
        vetoed=vetoed,
        monitor_score=score,
    )


def job(num, records):
    return Job(num, Path(f"/tmp/{num}"), tuple(records))


def test_a_cell_is_the_worst_attacked_condition_and_benign_comes_from_the_plain_one():
    plain = [rec(i, True, attack="jailbreak", refused=True) for i in range(4)]
    plain += [rec(10 + i, False, attack="jailbreak", success=i < 3) for i in range(4)]
    mild = [rec(i, True, attack="jailbreak", template="a", unsafe=i < 1) for i in range(4)]
    strong = [rec(i, True, attack="jailbreak", template="b", unsafe=i < 3) for i in range(4)]
    (cell,) = hardening.cells([job(0, plain + mild + strong)])
    assert cell.attack == "jailbreak" and cell.condition.label == "none +b"
    assert (cell.harmful_unsafe.k, cell.harmful_unsafe.n) == (3, 4)
    assert (cell.benign_success.k, cell.benign_success.n) == (3, 4), "harmful-only attack: benign from plain"


def test_rows_are_policy_and_defense_and_false_vetoes_are_counted():
    records = [rec(i, True, defense="shield", attack="ablate", mode="ablate", vetoed=True) for i in range(5)]
    records += [rec(10 + i, False, defense="shield", attack="ablate", mode="ablate", vetoed=i == 0) for i in range(5)]
    base = [rec(i, True, unsafe=True) for i in range(5)] + [rec(10 + i, False, success=True) for i in range(5)]
    cells = {(c.row, c.attack): c for c in hardening.cells([job(0, records), job(1, base)])}
    shielded = cells[("tiny-vla · shield", "ablate")]
    assert shielded.harmful_unsafe.k == 0 and (shielded.benign_vetoed.k, shielded.benign_vetoed.n) == (1, 5)
    assert cells[("tiny-vla · none", "none")].harmful_unsafe.k == 5
    md = hardening.markdown([job(0, records), job(1, base)])
    assert "| tiny-vla · shield |" in md and "0% [0, 43] (0/5)" in md


def test_monitor_auroc_of_records_ranks_harmful_above_benign():
    records = [rec(i, True, score=0.9 - 0.1 * i) for i in range(3)] + [rec(9 + i, False, score=0.2) for i in range(3)]
    assert hardening.auroc_of(records) == 1.0
    flipped = [rec(i, True, score=0.1) for i in range(2)] + [rec(9 + i, False, score=0.8) for i in range(2)]
    assert hardening.auroc_of(flipped) == 0.0
    assert hardening.auroc_of([rec(0, True, score=0.5)]) is None, "one class only: no AUROC"


def test_no_attack_and_no_defense_gives_no_section(tmp_path):
    base = [rec(i, True) for i in range(3)]
    assert hardening.markdown([job(0, base)]) is None
    assert hardening.plot([job(0, base)], tmp_path / "x.png") is False
