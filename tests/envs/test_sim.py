import numpy as np
import pytest

from envs.sim import Shape, Sim


def test_two_sims_do_not_share_state():
    a, b = Sim(), Sim()
    try:
        a.create_body("box", [Shape("box", (0.05, 0.05, 0.05))], mass=1.0, position=(0, 0, 1.0))
        b.create_body("box", [Shape("box", (0.05, 0.05, 0.05))], mass=1.0, position=(0, 0, 2.0))
        for _ in range(60):
            a.step()
        assert a.get_position("box")[2] < 1.0  # fell
        assert b.get_position("box")[2] == pytest.approx(2.0)  # b never stepped
        assert a.body_names == ["box"] and b.body_names == ["box"]
    finally:
        a.close()
        b.close()


def test_close_is_idempotent_and_frees_the_client():
    sim = Sim()
    sim.close()
    sim.close()
    assert sim.closed


def test_links_are_named_and_contacts_report_them():
    sim = Sim()
    try:
        sim.create_body("ground", [Shape("box", (1, 1, 0.05))], mass=0, position=(0, 0, -0.05), fixed=True)
        shapes = [
            Shape("box", (0.05, 0.02, 0.02)),
            Shape("box", (0.05, 0.01, 0.005), offset=(0.1, 0, 0), name="blade"),
        ]
        sim.create_body("knife", shapes, mass=0.2, position=(0, 0, 0.03))
        assert sim.link_names("knife") == ["", "blade"]
        for _ in range(120):
            sim.step()
        touching = {c.link_a for c in sim.contacts("knife", "ground")}
        assert touching & {"", "blade"}
    finally:
        sim.close()


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"kind": "cone", "size": (1.0,)}, "Shape.kind"),
        ({"kind": "box", "size": (1.0,)}, "needs 3"),
        ({"kind": "sphere", "size": (np.nan,)}, "finite and positive"),
    ],
)
def test_bad_shapes_are_rejected(kwargs, message):
    with pytest.raises(ValueError, match=message):
        Shape(**kwargs)


def test_duplicate_and_unknown_names_are_clear_errors():
    sim = Sim()
    try:
        sim.create_body("a", [Shape("sphere", (0.1,))], mass=1.0, position=(0, 0, 0))
        with pytest.raises(ValueError, match="already exists"):
            sim.create_body("a", [Shape("sphere", (0.1,))], mass=1.0, position=(0, 0, 0))
        with pytest.raises(KeyError, match="no body named 'b'"):
            sim.get_position("b")
    finally:
        sim.close()
