"""Training-only probes on the image tokens: which object each patch shows, and which patch the instruction is about.

Pointing is a copy: the answer must attend to the patch of the object the instruction names and read its pixel
there. The grounding labels (:func:`policies.tiny_vla.training.patch_targets`) teach the image tokens *where* their
object is; these probes teach them *what* it is (its colour and kind) and *whether the instruction names it* (the
command's target, or its goal). Each is a linear head on the residual stream of the image tokens at one decoder
layer (the middle one by default, so the layers above can read what it marks), trained with the model and set
aside afterwards: the saved checkpoint is the stock ``LlavaForConditionalGeneration``, unchanged in shape. The
heads are kept beside it (``probes.safetensors``, :func:`save_heads`), so that safety tuning can be rerun on a
written stage-1 checkpoint with the probes it was trained with (:func:`load_heads`).

Optionally (``subject``) a third head reads the decision position (the last prompt token, where the answer starts)
at the same layer and names the object the command acts on, so that the answer's position has to gather what the
named object is: the vision-dependent category turns on it ("hand the red object to the child" is harmful when the
red object is a knife).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from envs.instructions import describe
from envs.scene import CATALOG, CONTAINERS

ROLES = ("none", "target", "goal")
"""Role of a patch for one instruction: nothing, the object acted on, or where it goes (the command's goal)."""


def object_classes(containers: bool = False) -> tuple[str, ...]:
    """Identity classes of a patch: ``none``, every object description the scenes can show (``red cube``) and,
    with ``containers``, the containers (``bin``)."""
    names = {describe((kind, color)) for kind, k in CATALOG.items() for color in k.colors}
    return ("none", *sorted(names | (set(CONTAINERS) if containers else set())))


def _patch(u: int, v: int, image_size: int, patch_size: int) -> int:
    side = image_size // patch_size
    u, v = min(max(u, 0), image_size - 1), min(max(v, 0), image_size - 1)
    return (v // patch_size) * side + u // patch_size


def patch_identities(objects: str, image_size: int, patch_size: int, classes: tuple[str, ...]) -> np.ndarray:
    """For each patch (raster order), the class index of the object whose pixel falls in it (0: none; the first
    object listed wins a shared patch, as in ``patch_targets``). ``objects``: ``red cube 12 40 ; blue ball 30 20``."""
    index = {name: i for i, name in enumerate(classes)}
    out = np.zeros((image_size // patch_size) ** 2, dtype=np.int64)
    for item in filter(None, (x.strip() for x in str(objects).split(";"))):
        *name, u, v = item.split()
        description = " ".join(name)
        if description not in index:
            raise ValueError(f"object {description!r} is not one of the identity classes")
        j = _patch(int(u), int(v), image_size, patch_size)
        if out[j] == 0:
            out[j] = index[description]
    return out


def patch_roles(command: str, image_size: int, patch_size: int) -> np.ndarray:
    """For each patch, its role in the literal command (``pick_place 21 40 to 33 12 ...``): 1 where the target
    pixel is, 2 where the goal pixel is (a goal in the target's patch leaves it the target), 0 elsewhere."""
    out = np.zeros((image_size // patch_size) ** 2, dtype=np.int64)
    words = str(command).split()
    if not words or words[0] == "refuse":
        return out
    target = _patch(int(words[1]), int(words[2]), image_size, patch_size)
    if "to" in words:
        k = words.index("to")
        out[_patch(int(words[k + 1]), int(words[k + 2]), image_size, patch_size)] = 2
    out[target] = 1
    return out


def command_subject(command: str, identities: np.ndarray, image_size: int, patch_size: int) -> int:
    """The identity class (:func:`patch_identities` of the scene, ``identities``) at the literal command's target
    pixel: the object it acts on; 0 (``none``) for a refusal or a target with no object (``move``)."""
    words = str(command).split()
    if not words or words[0] == "refuse":
        return 0
    return int(identities[_patch(int(words[1]), int(words[2]), image_size, patch_size)])


class AuxiliaryHeads(nn.Module):
    """Linear identity and role heads on the image tokens' residual stream after decoder layer ``layer``, and
    with ``subject`` a head on the decision position's residual stream there."""

    def __init__(
        self, hidden: int, classes: int, layer: int, subject: bool = False, subject_weight: float = 1.0
    ) -> None:
        super().__init__()
        self.layer = layer
        self.subject_weight = subject_weight
        self.identity = nn.Linear(hidden, classes)
        self.role = nn.Linear(hidden, len(ROLES))
        self.subject = nn.Linear(hidden, classes) if subject else None

    def loss(
        self,
        hidden_states,
        image_mask: torch.Tensor,
        identity: torch.Tensor,
        role: torch.Tensor,
        subject: torch.Tensor | None = None,
        decision: torch.Tensor | None = None,
    ):
        """Sum of the heads' mean cross-entropies, the subject head's times ``subject_weight``.
        ``hidden_states``: the model's (embeddings first); ``image_mask`` (B, T) marks the image tokens,
        ``identity`` / ``role`` (B, patches) their labels; ``subject`` (B,) the command's object class and
        ``decision`` (B,) the position it is read at (both needed when the heads have a subject head)."""
        h = hidden_states[self.layer][image_mask].view(*identity.shape, -1)
        ce = nn.functional.cross_entropy
        loss = ce(self.identity(h).flatten(0, 1), identity.flatten()) + ce(self.role(h).flatten(0, 1), role.flatten())
        if self.subject is not None:
            if subject is None or decision is None:
                raise ValueError("heads with a subject head need the subject labels and the decision positions")
            if self.subject_weight:  # at weight 0 the head takes no part, so it gets no gradient either
                rows = torch.arange(len(decision), device=decision.device)
                subject_loss = ce(self.subject(hidden_states[self.layer][rows, decision]), subject)
                loss = loss + self.subject_weight * subject_loss
        return loss


@dataclass
class Auxiliary:
    """The probes of one training stage and their labels, one row per example (``image_index`` order)."""

    heads: AuxiliaryHeads
    identity: torch.Tensor
    """(examples, patches) class indices (:func:`patch_identities`)."""
    role: torch.Tensor
    """(examples, patches) role indices (:func:`patch_roles`)."""
    image_token_id: int
    weight: float = 1.0
    subject: torch.Tensor | None = None
    """(examples,) the class of the object each literal command acts on (:func:`command_subject`); None: no
    subject head."""


def build_auxiliary(
    data: dict,
    image_size: int,
    patch_size: int,
    hidden: int,
    layer: int,
    image_token_id: int,
    weight: float = 1.0,
    containers: bool = False,
    subject: bool = False,
    subject_weight: float = 1.0,
) -> Auxiliary:
    """Probes and labels for generated data (``policies.tiny_vla.data.generate``): identities from each scene's
    objects, roles (and with ``subject`` the object acted on) from each sample's literal command, kept for harmful
    samples too: safety tuning still has to know what it refuses to touch."""
    classes = object_classes(containers)
    per_scene = np.stack([patch_identities(o, image_size, patch_size, classes) for o in data["objects"]])
    identity = per_scene[np.asarray(data["scene"])]
    roles = np.stack([patch_roles(c, image_size, patch_size) for c in data["command"]])
    subjects = None
    if subject:
        subjects = torch.as_tensor(
            [command_subject(c, ids, image_size, patch_size) for c, ids in zip(data["command"], identity, strict=True)]
        )
    return Auxiliary(
        heads=AuxiliaryHeads(hidden, len(classes), layer, subject=subject, subject_weight=subject_weight),
        identity=torch.as_tensor(identity),
        role=torch.as_tensor(roles),
        image_token_id=image_token_id,
        weight=weight,
        subject=subjects,
    )


PROBES_FILE = "probes.safetensors"
"""The heads beside a checkpoint's weights; ``from_pretrained`` ignores the file."""


def save_heads(heads: AuxiliaryHeads, folder: str | Path) -> Path:
    """Writes ``heads`` (and the layer they read) into ``folder/probes.safetensors``, atomically."""
    path = Path(folder) / PROBES_FILE
    tmp = path.with_name(path.name + ".tmp")
    tensors = {k: v.detach().to("cpu", torch.float32).contiguous() for k, v in heads.state_dict().items()}
    save_file(tensors, tmp, metadata={"layer": str(heads.layer)})
    os.replace(tmp, path)
    return path


def load_heads(heads: AuxiliaryHeads, folder: str | Path) -> str:
    """Loads the heads a checkpoint was trained with (:func:`save_heads`) into ``heads`` where they fit: the same
    layer and shapes; a head the file lacks (a subject head added now) starts afresh. Returns what was done, in
    words for the model card; ``heads`` is left untouched when nothing fits."""
    path = Path(folder) / PROBES_FILE
    if not path.is_file():
        return f"probes start afresh: the checkpoint has no {PROBES_FILE}"
    with safe_open(path, framework="pt") as f:
        layer = int((f.metadata() or {}).get("layer", -1))
        saved = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (the file handle is not iterable)
    if layer != heads.layer:
        return f"probes start afresh: the checkpoint's read layer {layer}, these read layer {heads.layer}"
    own = heads.state_dict()
    wrong = sorted(k for k in saved if k in own and saved[k].shape != own[k].shape)
    if wrong:
        return f"probes start afresh: the checkpoint's differ in shape ({', '.join(wrong)}; other data.containers?)"
    heads.load_state_dict({k: v for k, v in saved.items() if k in own}, strict=False)
    fresh = sorted({k.split(".")[0] for k in own} - {k.split(".")[0] for k in saved})
    return f"stage 1's probes loaded from {PROBES_FILE}" + (f"; {', '.join(fresh)} afresh" if fresh else "")
