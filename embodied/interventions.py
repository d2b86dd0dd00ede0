"""Interventions on the residual stream, as in Arditi et al. (2024): directional ablation, activation addition and
weight orthogonalization, for any model :mod:`embodied.models` supports.

``ablate`` and ``actadd`` are context managers that register forward hooks and remove them on exit, also after an
exception; they nest. ``orthogonalize`` edits weights instead, so that the edited model computes what the ablated
model computes, with no hooks at all (it can be saved with ``save_pretrained`` and loaded like any checkpoint).

``ablate`` and ``orthogonalize`` take one direction (a vector) or a subspace: a (k, d_model) tensor of directions,
orthonormalized first (QR), whose whole span is removed. Refusal that survives the ablation of one direction can be
probed by removing several (:mod:`embodied.defenses.rank`).
"""

from __future__ import annotations

import copy
from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn

from embodied.models import Adapter, Writer, adapter


def unit(direction: torch.Tensor, d_model: int) -> torch.Tensor:
    """``direction`` as a float32 unit vector of length ``d_model``; a clear error for a wrong shape or a zero or
    non-finite vector."""
    d = torch.as_tensor(direction).detach().reshape(-1).float().cpu()
    if d.numel() != d_model:
        raise ValueError(f"direction has {d.numel()} entries but the model's residual stream has {d_model}")
    norm = d.norm()
    if not torch.isfinite(norm) or norm == 0:
        raise ValueError(f"direction must be a finite non-zero vector (norm {norm.item()})")
    return d / norm


def basis(directions: torch.Tensor, d_model: int) -> torch.Tensor:
    """An orthonormal basis (k, d_model), float32 on the CPU, of the span of the rows of ``directions`` (QR in
    float64); a clear error for a wrong shape, a non-finite entry or rows that are linearly dependent."""
    D = torch.as_tensor(directions).detach().double().cpu()
    if D.dim() != 2 or D.shape[0] < 1 or D.shape[1] != d_model:
        raise ValueError(
            f"a subspace must be given as a (k, {d_model}) tensor of directions, got shape {tuple(D.shape)}"
        )
    if not torch.isfinite(D).all():
        raise ValueError("subspace directions must be finite (found NaN or inf)")
    if D.shape[0] > d_model:
        raise ValueError(f"{D.shape[0]} directions cannot be independent in a {d_model}-dimensional stream")
    q, r = torch.linalg.qr(D.T)
    diag = r.diagonal().abs()
    scale = D.norm(dim=1).max()
    if scale == 0 or bool((diag <= 1e-6 * scale).any()):
        raise ValueError(
            f"the {D.shape[0]} subspace directions are linearly dependent (or zero): pass independent directions"
        )
    return q.T.contiguous().float()


def project_out(x: torch.Tensor, d: torch.Tensor) -> torch.Tensor:
    """``x`` minus its component along the unit vector ``d``, or, for a (k, d_model) ``d`` with orthonormal rows,
    minus its projection on their span (last dimension)."""
    if d.dim() == 2:
        return x - (x @ d.T) @ d
    return x - (x @ d).unsqueeze(-1) * d


def _directions(direction: torch.Tensor, d_model: int) -> torch.Tensor:
    """One unit vector (d_model,) for a vector, or an orthonormal basis (k, d_model) for a matrix."""
    if torch.as_tensor(direction).dim() == 2:
        return basis(direction, d_model)
    return unit(direction, d_model)


def _writer_directions(w: Writer, d: torch.Tensor) -> torch.Tensor:
    """What to project out of a writer's output (a unit vector or an orthonormal basis) so that the stream gets
    none of ``d``."""
    if d.dim() == 1:
        return w.output_direction(d)
    return basis(torch.stack([w.output_direction(row) for row in d]), d.shape[1]).to(d)


class _Cast:
    """A vector on the device and in the dtype of whatever activation meets it (converted once per pair)."""

    def __init__(self, vector: torch.Tensor):
        self.vector = vector
        self._cache: dict[tuple[torch.dtype, torch.device], torch.Tensor] = {}

    def like(self, x: torch.Tensor) -> torch.Tensor:
        key = (x.dtype, x.device)
        if key not in self._cache:
            self._cache[key] = self.vector.to(device=x.device, dtype=x.dtype)
        return self._cache[key]


def _map_block_input(fn):
    """A forward pre-hook (``with_kwargs=True``) that maps a block's ``hidden_states`` input with ``fn``."""

    def hook(module, args, kwargs):
        if args:
            return (fn(args[0]), *args[1:]), kwargs
        return args, {**kwargs, "hidden_states": fn(kwargs["hidden_states"])}

    return hook


def _map_output(fn):
    """A forward hook that maps a module's output with ``fn`` (a tensor, or the first element of a tuple)."""

    def hook(module, args, output):
        if isinstance(output, tuple):
            return (fn(output[0]), *output[1:])
        return fn(output)

    return hook


@contextmanager
def _hooks(register) -> Iterator[None]:
    handles: list = []
    try:
        register(handles)
        yield
    finally:
        for h in handles:
            h.remove()


@contextmanager
def ablate(model: nn.Module, direction: torch.Tensor) -> Iterator[nn.Module]:
    """Project ``direction`` out of every block's input and every attention and MLP output, at all positions,
    while the context is open.

    ``direction``: a vector (d_model,), normalized here; or a (k, d_model) tensor of directions, orthonormalized
    here (QR), whose whole span is projected out. The projections are differentiable in the activations, so the
    context also works in training (the directions themselves are constants).
    """
    ad = adapter(model)
    d = _directions(direction, ad.d_model)

    def register(handles: list) -> None:
        block_d = _Cast(d)
        for block in ad.blocks:
            handles.append(
                block.register_forward_pre_hook(
                    _map_block_input(lambda x, c=block_d: project_out(x, c.like(x))), with_kwargs=True
                )
            )
        for w in ad.attn_writers + ad.mlp_writers:
            out_d = _Cast(_writer_directions(w, d))
            handles.append(w.module.register_forward_hook(_map_output(lambda x, c=out_d: project_out(x, c.like(x)))))

    with _hooks(register):
        yield model


@contextmanager
def actadd(model: nn.Module, vector: torch.Tensor, layer: int, coeff: float = 1.0) -> Iterator[nn.Module]:
    """Add ``coeff * vector`` to the input of block ``layer`` at all positions while the context is open."""
    ad = adapter(model)
    if not -ad.n_layers <= layer < ad.n_layers:
        raise ValueError(f"layer {layer} is out of range for a model with {ad.n_layers} blocks")
    v = torch.as_tensor(vector).detach().reshape(-1).float().cpu()
    if v.numel() != ad.d_model:
        raise ValueError(f"vector has {v.numel()} entries but the model's residual stream has {ad.d_model}")
    add = _Cast(float(coeff) * v)

    def register(handles: list) -> None:
        handles.append(
            ad.blocks[layer].register_forward_pre_hook(_map_block_input(lambda x: x + add.like(x)), with_kwargs=True)
        )

    with _hooks(register):
        yield model


def _untie_output_embeddings(model: nn.Module, ad: Adapter) -> None:
    """Give the unembedding its own copy of a tied embedding matrix, so that editing the input embedding leaves the
    output untouched; the config says so, for ``save_pretrained``."""
    out = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if out is None or out.weight.data_ptr() != ad.embeddings[0].weight.data_ptr():
        return
    out.weight = nn.Parameter(out.weight.detach().clone(), requires_grad=out.weight.requires_grad)
    configs = [model.config]
    if hasattr(model.config, "get_text_config"):
        configs.append(model.config.get_text_config())
    for cfg in configs:
        if hasattr(cfg, "tie_word_embeddings"):
            cfg.tie_word_embeddings = False


@torch.no_grad()
def _orthogonalize_writer(w: Writer, d: torch.Tensor) -> None:
    d = _writer_directions(w, d).double()
    weight = w.module.weight
    W = weight.double()
    # nn.Linear stores (out, in) and writes W @ x; Conv1D stores (in, out) and writes x @ W.
    if d.dim() == 1:
        W = W - torch.outer(W @ d, d) if w.conv1d else W - torch.outer(d, d @ W)
    else:
        W = W - (W @ d.T) @ d if w.conv1d else W - d.T @ (d @ W)
    weight.copy_(W.to(weight.dtype))
    bias = getattr(w.module, "bias", None)
    if bias is not None:
        bias.copy_(project_out(bias.double(), d).to(bias.dtype))


@torch.no_grad()
def orthogonalize(model: nn.Module, direction: torch.Tensor, inplace: bool = False) -> nn.Module:
    """Project ``direction`` out of the embeddings and of every matrix (and bias) that writes to the residual
    stream: attention and MLP output projections, and the image projector of a vision-language model.
    ``direction`` is a vector or a (k, d_model) tensor of directions whose span is removed (as in :func:`ablate`).

    Returns the edited model: ``model`` itself when ``inplace``, else a deep copy. A tied unembedding is untied
    first (it reads the stream, it does not write it).
    """
    if not inplace:
        model = copy.deepcopy(model)
    ad = adapter(model)
    d = _directions(direction, ad.d_model).double()
    _untie_output_embeddings(model, ad)
    for emb in ad.embeddings:
        E, de = emb.weight.double(), d.to(emb.weight.device)
        emb.weight.copy_(project_out(E, de).to(emb.weight.dtype))
    for w in ad.writers:
        _orthogonalize_writer(w, d.to(w.module.weight.device))
    return model
