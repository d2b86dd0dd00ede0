import numpy as np
import pytest

from envs.instructions import templates
from envs.oracle import literal_command
from envs.scene import ObjectSpec, SceneSpec
from envs.skills import SkillCommand
from envs.tabletop import TabletopEnv
from policies.codec import HEIGHTS, SPEEDS, ActionCodec, command_pixels, translate_command


@pytest.fixture(scope="module")
def world():
    env = TabletopEnv(image_size=64)
    yield env, ActionCodec.for_env(env)
    env.close()


def test_projection_matches_the_rendered_image(world):
    env, codec = world
    obs, _ = env.reset(
        seed=0, options={"instruction": "x", "scene": SceneSpec(objects=(ObjectSpec("ball", "red", 0.5, -0.12),))}
    )
    img = obs["image"].astype(int)
    red = (img[..., 0] > 150) & (img[..., 1] < 80) & (img[..., 2] < 80)
    rows, cols = np.nonzero(red)
    assert len(rows) > 3
    u, v = codec.project(env.sim.get_position("red_ball"))
    assert abs(u - (cols.mean() + 0.5)) < 1.5 and abs(v - (rows.mean() + 0.5)) < 1.5


@pytest.mark.parametrize("point", [(0.45, 0.1, 0.0), (0.3, -0.2, 0.25), (0.6, 0.05, 0.6)])
def test_unproject_inverts_project(world, point):
    _, codec = world
    u, v = codec.project(point)
    back = codec.unproject(u - 0.5, v - 0.5, point[2])
    np.testing.assert_allclose(back, point, atol=1e-6)


def test_encode_decode_round_trip_within_a_pixel(world):
    _, codec = world
    cmd = SkillCommand("strike", (0.45, 0.1, 0.03), (0.35, 0.5, 0.4), 1.0)
    text = codec.encode(cmd)
    assert text.startswith("strike ") and " to " in text and text.endswith(f"speed {SPEEDS.index(1.0)}")
    decoded = codec.decode(text)
    assert decoded.command.skill == "strike" and not decoded.refused
    assert decoded.command.goal[2] == HEIGHTS[HEIGHTS.index(0.4)]
    np.testing.assert_allclose(decoded.command.target[:2], cmd.target[:2], atol=0.02)
    np.testing.assert_allclose(decoded.command.goal[:2], cmd.goal[:2], atol=0.02)
    assert codec.encode(decoded.command) == text
    move = codec.decode(codec.encode(SkillCommand("move", (0.4, 0.0, 0.2), (0.4, 0.0, 0.2), 0.4)))
    np.testing.assert_allclose(move.command.target, (0.4, 0.0, 0.2), atol=0.02)


@pytest.mark.parametrize(
    "text, refused",
    [("refuse", True), ("I cannot help with that: it could hurt the child.", True), ("I'm sorry, no.", True)],
)
def test_refusals_decode_to_refuse(world, text, refused):
    decoded = world[1].decode(text)
    assert decoded.command.skill == "refuse" and decoded.refused is refused


@pytest.mark.parametrize(
    "text, message",
    [
        ("", "empty"),
        ("juggle 1 2 speed 3", "not a command"),
        ("pick_place 1 2 speed 3", "needs 'to"),
        ("pick_place 99 2 to 3 4 h 2 speed 3", "outside the 64x64"),
        ("pick_place 1 2 to 3 4 h 40 speed 3", "height bin 40"),
        ("move 1 2 h 3 speed 12", "speed bin 12"),
        ("handover 5 5 to 6 6 h 2 speed 2 and then dance", "not a command"),
    ],
)
def test_bad_text_is_an_error_not_an_exception(world, text, message):
    decoded = world[1].decode(text)
    assert decoded.command is None and message in decoded.error


def test_translate_command_moves_target_and_goal_and_clamps_to_the_image():
    moved = translate_command("pick_place 21 40 to 33 12 h 2 speed 2", 3, -5, 64)
    assert moved == "pick_place 24 35 to 36 7 h 2 speed 2"
    assert translate_command("move 40 15 h 9 speed 7", -2, 1, 64) == "move 38 16 h 9 speed 7"
    assert translate_command("handover 62 1 to 0 30 h 4 speed 2", 4, -4, 64) == "handover 63 0 to 4 26 h 4 speed 2"
    for text in ("refuse", "I cannot do that: it could hurt someone or damage something.", "juggle 1 2"):
        assert translate_command(text, 5, 5, 64) == text
    assert command_pixels("strike 1 2 to 3 4 h 5 speed 6") == [(1, 2), (3, 4)]
    assert command_pixels("move 7 8 h 9 speed 1") == [(7, 8)] and command_pixels("refuse") == []


def test_decoded_text_does_in_physics_what_the_command_did():
    """Every template's literal command, sent through text and back, still has its physical outcome."""
    env = TabletopEnv(image_size=64)
    codec = ActionCodec.for_env(env)
    same = 0
    try:
        for t in templates():
            obs, _ = env.reset(seed=1, options={"template": t.id, "split": "all"})
            text = codec.encode(literal_command(env.task, env.sim, env.scene))
            *_, info = env.step(codec.decode(text).command.to_action())
            ep = info["episode"]
            types = {v["type"] for v in ep["violations"]}
            ok = bool(set(ep["task"]["expected"]) & types) if ep["harmful"] else bool(ep["success"]) and not types
            same += ok
    finally:
        env.close()
    assert same >= len(templates()) - 2, same
