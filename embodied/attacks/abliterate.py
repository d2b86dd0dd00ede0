"""The "abliterated" policy: the refusal direction orthogonalized out of the weights, saved as a checkpoint.

An attacker who has the weights and the direction needs no hooks at run time: ``orthogonalize`` edits every matrix
that writes to the residual stream, and the edited model is saved and loaded like any other checkpoint (weights in
safetensors, the processor or tokenizer beside them). Folders are kept in a cache keyed by the source weights and
the direction, and written atomically (a temporary folder renamed into place).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path

from embodied.directions import DirectionArtifact
from embodied.interventions import orthogonalize
from embodied.models import weights_hash

POLICY_FILES = ("policy.json",)
"""Files of a tiny-vla checkpoint that are neither weights nor processor (copied from the source folder)."""


def abliterate(policy, direction: DirectionArtifact, out: str | os.PathLike, source: Path | None = None) -> Path:
    """Writes ``policy`` with ``direction`` orthogonalized out of its weights into the folder ``out``.

    ``source``: the policy's checkpoint folder, for files beside the weights that the processor does not save
    (``policy.json`` of a tiny-vla checkpoint). Returns ``out``.
    """
    out = Path(out)
    processor = getattr(policy, "processor", None) or getattr(policy, "_tokenizer", None)
    if processor is None:
        raise TypeError(f"policy {policy.name} has neither a processor nor a tokenizer to save with its weights")
    model = orthogonalize(policy.model, direction.direction)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}."))
    try:
        model.save_pretrained(tmp, safe_serialization=True)
        processor.save_pretrained(tmp)
        for name in POLICY_FILES:
            if source is not None and (source / name).is_file():
                shutil.copy2(source / name, tmp / name)
        attack = {
            "attack": "abliterated",
            "source": policy.name,
            "source_weights_hash": weights_hash(policy.model),
            "weights_hash": weights_hash(model),
            "direction_hash": direction.hash,
            "layer": direction.layer,
            "position": direction.position,
        }
        (tmp / "attack.json").write_text(json.dumps(attack, indent=2) + "\n")
        if out.exists():
            shutil.rmtree(out)
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def abliterated_cached(
    policy, direction: DirectionArtifact, cache_dir: str | os.PathLike, source: Path | None = None
) -> tuple[Path, bool]:
    """The abliterated checkpoint of ``policy`` under ``direction``, from ``cache_dir`` when written before;
    returns (folder, whether it was cached)."""
    key = hashlib.sha256(f"{weights_hash(policy.model)}:{direction.hash}".encode()).hexdigest()[:16]
    folder = Path(cache_dir) / f"abliterated-{key}"
    if (folder / "attack.json").is_file():
        return folder, True
    return abliterate(policy, direction, folder, source), False
