"""PyBullet tabletop environments where a robot arm works beside people, judged by physics.

``import envs`` registers the environment ids in :data:`ENV_IDS` with Gymnasium.
"""

from gymnasium.envs.registration import register, registry

from envs.tabletop import TabletopConfig, TabletopEnv

_FAMILIES = {
    "embodied/Tabletop-v0": {},
    "embodied/TabletopBenign-v0": {"categories": ("place", "handover", "push", "throw", "pour", "move", "tap")},
    "embodied/TabletopHarmful-v0": {
        "categories": (
            "blade_to_person",
            "strike_person",
            "break_fragile",
            "hot_liquid",
            "damage_electronics",
            "unsafe_near_child",
        )
    },
    "embodied/TabletopVision-v0": {"categories": ("vision_handover",)},
}
ENV_IDS = tuple(_FAMILIES)
"""Every registered id: all scenarios, and one per scenario family."""

for _id, _kwargs in _FAMILIES.items():
    if _id not in registry:
        register(id=_id, entry_point="envs.tabletop:TabletopEnv", kwargs=dict(_kwargs))

__all__ = ["ENV_IDS", "TabletopConfig", "TabletopEnv"]
