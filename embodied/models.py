"""Where the residual stream lives in each model family: an explicit registry keyed by ``config.model_type``.

A :class:`Family` names, relative to the model, the decoder stack, the blocks whose inputs are the residual stream,
the attention and MLP output modules, the token (and position) embeddings, and the modules that write image
features into the stream in vision-language models. :func:`adapter` resolves a loaded model into an
:class:`Adapter` holding the modules themselves, which is what extraction, hooks and orthogonalization use.

Two family traits change how a write is projected:

- ``conv1d``: GPT-2's ``Conv1D`` stores its weight as (in, out), transposed from ``nn.Linear``.
- ``write_norms``: Gemma 2 and 3 normalize each attention and MLP output (``post_attention_layernorm``,
  ``post_feedforward_layernorm``) before adding it to the stream. Their output ``g * x / rms(x)`` has no component
  along ``d`` exactly when ``x`` has none along ``g * d``, so the projection at the module output uses that direction.

Register a new family with :func:`register` (see :data:`FAMILIES` for examples).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn


@dataclass(frozen=True)
class Family:
    """Module paths of one model family (dotted, relative to the model the registry key belongs to).

    Args:
        language_model: the decoder stack (the module that holds the blocks and the embeddings).
        blocks: the block list under ``language_model``.
        attn_out: the attention output projection under each block (writes to the residual stream).
        mlp_out: the MLP output projection under each block (writes to the residual stream).
        embeddings: embeddings under ``language_model`` whose sum is the stream's start (token; GPT-2 adds positions).
        image_writers: modules (under the model) whose outputs become the stream at image positions.
        write_norms: norms under each block applied to (attention output, MLP output) before the residual add.
        norm_offset: the norms scale by ``norm_offset + weight`` (Gemma: 1).
        conv1d: the output projections are GPT-2 ``Conv1D`` (weight stored as in x out).
    """

    language_model: str
    blocks: str = "layers"
    attn_out: str = "self_attn.o_proj"
    mlp_out: str = "mlp.down_proj"
    embeddings: tuple[str, ...] = ("embed_tokens",)
    image_writers: tuple[str, ...] = ()
    write_norms: tuple[str, str] | None = None
    norm_offset: float = 0.0
    conv1d: bool = False


_LLAMA = Family("model")
_GEMMA = Family("model", write_norms=("post_attention_layernorm", "post_feedforward_layernorm"), norm_offset=1.0)

FAMILIES: dict[str, Family] = {
    "llama": _LLAMA,
    "mistral": _LLAMA,
    "qwen2": _LLAMA,
    "qwen3": _LLAMA,
    "phi3": _LLAMA,
    "gemma2": _GEMMA,
    "gemma3_text": _GEMMA,
    "gpt2": Family(
        "transformer", blocks="h", attn_out="attn.c_proj", mlp_out="mlp.c_proj", embeddings=("wte", "wpe"), conv1d=True
    ),
    "gpt_neox": Family("gpt_neox", attn_out="attention.dense", mlp_out="mlp.dense_4h_to_h", embeddings=("embed_in",)),
    "llava": Family("model.language_model", image_writers=("model.multi_modal_projector.linear_2",)),
    "qwen2_vl": Family("model.language_model", image_writers=("model.visual.merger.mlp.2",)),
    "qwen2_5_vl": Family("model.language_model", image_writers=("model.visual.merger.mlp.2",)),
    "idefics3": Family("model.text_model", image_writers=("model.connector.modality_projection.proj",)),
}
"""Supported families. The default policy (``tiny-vla``) is a ``llava`` model."""


class UnsupportedModelError(KeyError):
    """The model's ``model_type`` has no registered :class:`Family`."""

    def __str__(self) -> str:  # KeyError would print the repr of its argument
        return str(self.args[0])


def register(model_type: str, family: Family) -> None:
    """Make ``model_type`` (a ``config.model_type``) supported, e.g. ``register("olmo2", Family("model"))``."""
    FAMILIES[model_type] = family


def family_of(model: nn.Module) -> Family:
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if model_type not in FAMILIES:
        raise UnsupportedModelError(
            f"model_type {model_type!r} has no residual-stream adapter; supported: {sorted(FAMILIES)}. Register it "
            "with embodied.models.register(model_type, Family(language_model=..., blocks=..., attn_out=..., "
            "mlp_out=..., embeddings=...)), naming its modules as in model.named_modules()"
        )
    return FAMILIES[model_type]


@dataclass(frozen=True)
class Writer:
    """A module whose output is added to the residual stream, and how to project a direction out of it."""

    module: nn.Module
    conv1d: bool = False
    norm: nn.Module | None = None
    norm_offset: float = 0.0

    def output_direction(self, direction: torch.Tensor) -> torch.Tensor:
        """The unit direction to project out of this module's output so that what reaches the stream has none of
        ``direction`` (``direction`` itself unless a norm rescales the output per channel)."""
        if self.norm is None:
            return direction
        scaled = (self.norm.weight.detach().to(direction) + self.norm_offset) * direction
        return scaled / scaled.norm()


@dataclass(frozen=True)
class Adapter:
    """The residual-stream modules of one loaded model."""

    model: nn.Module
    family: Family
    blocks: tuple[nn.Module, ...]
    attn_writers: tuple[Writer, ...]
    mlp_writers: tuple[Writer, ...]
    embeddings: tuple[nn.Embedding, ...]
    image_writers: tuple[Writer, ...]

    @property
    def n_layers(self) -> int:
        return len(self.blocks)

    @property
    def d_model(self) -> int:
        return self.embeddings[0].weight.shape[1]

    @property
    def writers(self) -> tuple[Writer, ...]:
        """Every module that writes to the stream after the embeddings."""
        return self.attn_writers + self.mlp_writers + self.image_writers


def _get(root: nn.Module, path: str, what: str) -> nn.Module:
    try:
        return root.get_submodule(path)
    except AttributeError as e:
        raise UnsupportedModelError(
            f"{type(root).__name__} has no {what} at {path!r} ({e}); its family's module paths do not match this "
            "transformers version or checkpoint: register a corrected Family with embodied.models.register"
        ) from None


def adapter(model: nn.Module) -> Adapter:
    """The :class:`Adapter` of ``model``, by its ``config.model_type``."""
    fam = family_of(model)
    lm = _get(model, fam.language_model, "language model")
    blocks = tuple(_get(lm, fam.blocks, "block list"))

    def writer(block: nn.Module, path: str, norm_index: int) -> Writer:
        norm = _get(block, fam.write_norms[norm_index], "write norm") if fam.write_norms else None
        return Writer(_get(block, path, "output projection"), fam.conv1d, norm, fam.norm_offset)

    return Adapter(
        model=model,
        family=fam,
        blocks=blocks,
        attn_writers=tuple(writer(b, fam.attn_out, 0) for b in blocks),
        mlp_writers=tuple(writer(b, fam.mlp_out, 1) for b in blocks),
        embeddings=tuple(_get(lm, p, "embedding") for p in fam.embeddings),
        image_writers=tuple(Writer(_get(model, p, "image projector")) for p in fam.image_writers),
    )


def weights_hash(model: nn.Module) -> str:
    """SHA-256 over every parameter and buffer of the state dict (names, dtypes, shapes, bytes), in name order."""
    import hashlib

    h = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        t = tensor.detach().cpu().contiguous()
        h.update(f"{name}:{t.dtype}:{tuple(t.shape)}".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()
