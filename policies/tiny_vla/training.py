"""Training the tiny VLA: tokenized examples, a seeded training loop, and the two stages of its recipe.

Stage 1 (capability) teaches the literal command of every instruction, harmful ones included. Stage 2 (safety
tuning) continues from it with harmful instructions mapped to the refusal sentence and benign ones to their
commands, mixed; the token embeddings are frozen there by default, so that safety tuning is written into the
network's computation rather than into the meaning of individual words.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass, replace

import numpy as np
import torch
from tqdm.auto import tqdm

from policies.tiny_vla.auxiliary import Auxiliary
from policies.tiny_vla.processing_tiny_vla import REFUSAL, prompt_text, slot_words

IGNORE = -100


@dataclass
class StageConfig:
    """One training stage."""

    steps: int = 1000
    batch_size: int = 48
    lr: float = 2e-3
    warmup: int = 50
    weight_decay: float = 0.0
    harmful_fraction: float | None = None
    """Share of harmful examples per batch (None: as they come in the data)."""
    freeze_embeddings: bool = False
    balance: float = 0.0
    """How evenly batches draw the example groups (``tokenize``'s ``groups``, e.g. instruction categories): an
    example is drawn with weight ``n_group ** -balance``, so 0 keeps the data's own mix and 1 draws every group
    equally often."""
    word_dropout: float = 0.1
    """Chance that a template word (not a slot filler) of the instruction is replaced by ``<unk>`` in a batch."""
    log_every: int = 50


@dataclass
class Examples:
    """Tokenized examples: right-padded ``input_ids`` / ``labels`` and, per example, its image's index."""

    input_ids: torch.Tensor
    labels: torch.Tensor
    lengths: torch.Tensor
    image_index: torch.Tensor
    harmful: torch.Tensor
    droppable: torch.Tensor
    """Where word dropout may act: the instruction's template words."""
    unk_id: int
    group: torch.Tensor | None = None
    """Per example, the index of its group (``StageConfig.balance``); None: one group."""
    prompt_lengths: torch.Tensor | None = None
    """Per example, the prompt's token count: the answer starts at this index."""

    def __len__(self) -> int:
        return len(self.input_ids)


def pixel_values(processor, images: np.ndarray) -> torch.Tensor:
    """Images (N, H, W, 3) uint8 -> the vision tower's normalized input (N, 3, H, W)."""
    out = processor.image_processor(images=list(images), return_tensors="pt")
    return out["pixel_values"]


def patch_targets(objects: str, image_size: int, patch_size: int, axes: str = "u") -> list[str]:
    """Grounding targets for the image tokens of one scene (see :func:`tokenize`): for each patch, in raster
    order, a coordinate of the object it shows, or ``"table"`` where it shows none.

    ``axes`` ``"u"``: the object's pixel column (``"12"``) on every patch; ``"uv"``: its column on even patches
    and its row on odd ones, so that both axes are taught. ``objects`` is the scene's ``red cube 12 40 ; blue ball
    30 20`` (``policies.tiny_vla.data.scene_objects``).
    """
    if axes not in ("u", "uv"):
        raise ValueError(f"grounding axes must be 'u' or 'uv', got {axes!r}")
    side = image_size // patch_size
    out = ["table"] * (side * side)
    for item in filter(None, (x.strip() for x in str(objects).split(";"))):
        u, v = (int(x) for x in item.split()[-2:])
        j = (v // patch_size) * side + u // patch_size
        if out[j] == "table":
            out[j] = str(v) if axes == "uv" and j % 2 else str(u)
    return out


def tokenize(processor, instructions, targets, image_index, harmful, patch_labels=None, groups=None) -> Examples:
    """Prompt + target + end of sequence; the loss is taken on the target and the end token only.

    ``groups`` (per example, any hashable label such as its category) lets a stage balance its batches
    (``StageConfig.balance``).

    With ``patch_labels`` (per example, one word per image token, from :func:`patch_targets`), each image token
    is also trained to name the pixel column of the object in its patch. A from-scratch model otherwise never
    learns to point: an image token's value says what is there but not, usably, where, and attention cannot learn
    to select the right patch before the answer can read a position from it. With image tokens that know their
    object's column, the answer only has to attend to the right one and copy, and that attention is learnable.
    """
    tok = processor.tokenizer
    image_tokens = processor.image_token * _image_tokens(processor)
    keep = set(tok.all_special_ids) | set(tok.convert_tokens_to_ids(sorted(slot_words())))
    image_id = tok.convert_tokens_to_ids(processor.image_token)
    rows, labels, prompt_lengths = [], [], []
    for i, (instruction, target) in enumerate(zip(instructions, targets, strict=True)):
        text = prompt_text(processor, str(instruction)).replace(processor.image_token, image_tokens)
        p = tok(text, add_special_tokens=False)["input_ids"]
        t = tok(" " + str(target), add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
        rows.append(p + t)
        prompt_lengths.append(len(p))
        label = [IGNORE] * len(p) + t
        if patch_labels is not None:
            positions = [k for k, x in enumerate(p) if x == image_id]
            words = tok.convert_tokens_to_ids(list(patch_labels[i]))
            if len(words) != len(positions):
                raise ValueError(f"example {i}: {len(words)} patch labels for {len(positions)} image tokens")
            for k, w in zip(positions, words, strict=True):
                label[k + 1] = w  # the logits at image token k predict the label at k + 1
        labels.append(label)
    n = max(len(r) for r in rows)
    ids = torch.full((len(rows), n), tok.pad_token_id, dtype=torch.long)
    lab = torch.full((len(rows), n), IGNORE, dtype=torch.long)
    droppable = torch.zeros((len(rows), n), dtype=torch.bool)
    for i, (r, lb) in enumerate(zip(rows, labels, strict=True)):
        ids[i, : len(r)] = torch.tensor(r)
        lab[i, : len(lb)] = torch.tensor(lb)
        droppable[i, : len(r)] = torch.tensor([x not in keep and y == IGNORE for x, y in zip(r, lb, strict=True)])
    return Examples(
        input_ids=ids,
        labels=lab,
        lengths=torch.tensor([len(r) for r in rows]),
        image_index=torch.as_tensor(np.asarray(image_index), dtype=torch.long),
        harmful=torch.as_tensor(np.asarray(harmful), dtype=torch.bool),
        droppable=droppable,
        unk_id=tok.unk_token_id,
        group=None if groups is None else torch.as_tensor(np.unique(np.asarray(groups), return_inverse=True)[1]),
        prompt_lengths=torch.tensor(prompt_lengths),
    )


def _image_tokens(processor) -> int:
    size = processor.image_processor.crop_size["height"]
    return (size // processor.patch_size) ** 2 + processor.num_additional_image_tokens - 1


def stage_targets(data: dict, stage: str) -> list[str]:
    """The target text of every sample: the literal command (``capability``), or for ``safety`` the refusal
    sentence where the instruction is harmful."""
    if stage == "capability":
        return [str(c) for c in data["command"]]
    if stage == "safety":
        return [REFUSAL if h else str(c) for c, h in zip(data["command"], data["harmful"], strict=True)]
    raise ValueError(f"stage must be 'capability' or 'safety', got {stage!r}")


def init_position_embeddings(model) -> None:
    """2-D sine-cosine initialization of the vision tower's patch position embeddings (as in MAE), at the scale of
    the patch embeddings' output.

    CLIP's default initialization gives position embeddings a standard deviation of 0.02 while a patch's content
    enters at about ``0.02 * sqrt(3 * patch^2)`` (~0.3 for 8x8 patches): after the pre-layernorm the image tokens
    then say little about *where* they are, and a from-scratch model never learns to point. Matching the scales
    gives every image token a clear code of its patch position from the first step.
    """
    tower = model.model.vision_tower
    emb = getattr(tower, "vision_model", tower).embeddings
    weight = emb.position_embedding.weight
    d = weight.shape[1]
    side = int(math.isqrt(weight.shape[0] - 1))
    if side * side + 1 != weight.shape[0] or d % 4:
        raise ValueError(f"position embeddings of shape {tuple(weight.shape)} are not a square grid plus CLS")
    ys, xs = np.meshgrid(np.arange(side), np.arange(side), indexing="ij")
    omega = 1.0 / 10000 ** (np.arange(d // 4) / (d // 4))
    parts = []
    for grid in (xs.ravel(), ys.ravel()):
        angle = grid[:, None] * omega[None, :]
        parts += [np.sin(angle), np.cos(angle)]
    table = torch.as_tensor(np.concatenate(parts, axis=1), dtype=weight.dtype)
    patch = emb.patch_embedding.weight
    content_scale = float(patch.detach().std()) * math.sqrt(patch[0].numel())
    with torch.no_grad():
        weight[1:] = table / table.std() * content_scale
        weight[0].zero_()


def sampling_weights(examples: Examples, balance: float) -> np.ndarray:
    """Per-example draw probabilities: ``n_group ** -balance``, normalized (uniform without groups)."""
    if examples.group is None or balance == 0:
        return np.full(len(examples), 1.0 / len(examples))
    group = examples.group.numpy()
    w = np.bincount(group).astype(float)[group] ** -balance
    return w / w.sum()


def _batches(examples: Examples, cfg: StageConfig, rng: np.random.Generator):
    harm = examples.harmful.numpy()
    weights = sampling_weights(examples, cfg.balance)
    harmful_idx, benign_idx = np.flatnonzero(harm), np.flatnonzero(~harm)
    everything = np.arange(len(examples))

    def draw(idx: np.ndarray, k: int, replace: bool) -> np.ndarray:
        p = weights[idx]
        return rng.choice(idx, k, replace=replace, p=None if cfg.balance == 0 else p / p.sum())

    while True:
        if cfg.harmful_fraction is None or not len(harmful_idx) or not len(benign_idx):
            yield draw(everything, cfg.batch_size, replace=cfg.balance != 0)  # weighted draws are independent
        else:
            k = int(round(cfg.harmful_fraction * cfg.batch_size))
            yield np.concatenate([draw(harmful_idx, k, True), draw(benign_idx, cfg.batch_size - k, True)])


def lr_factor(step: int, warmup: int, steps: int, floor: float = 0.05) -> float:
    """Learning-rate multiplier at ``step``: linear warm-up over ``warmup`` steps, then cosine decay to ``floor``."""
    if step < warmup:
        return (step + 1) / warmup
    frac = (step - warmup) / max(1, steps - warmup)
    return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * frac))


def train_stage(
    model,
    examples: Examples,
    pixels: torch.Tensor,
    cfg: StageConfig,
    seed: int,
    name: str = "stage",
    log: Callable[[dict], None] | None = None,
    progress: bool = True,
    auxiliary: Auxiliary | None = None,
) -> list[dict]:
    """Runs one stage of AdamW with linear warm-up and cosine decay; returns the logged rows.

    With ``auxiliary``, its probes are trained alongside (their loss added with its weight, and logged apart)."""
    device = next(model.parameters()).device
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    embeddings = model.get_input_embeddings()
    embeddings.weight.requires_grad_(not cfg.freeze_embeddings)
    params = [p for p in model.parameters() if p.requires_grad]
    if auxiliary is not None:
        auxiliary.heads.to(device=device, dtype=model.dtype).train()
        params += list(auxiliary.heads.parameters())
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay, betas=(0.9, 0.98))

    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: lr_factor(step, cfg.warmup, cfg.steps))
    model.train()
    rows, running, running_aux, t0 = [], [], [], time.perf_counter()
    batches = _batches(examples, cfg, rng)
    unk = examples.unk_id
    bar = tqdm(range(cfg.steps), desc=name, disable=not progress, dynamic_ncols=True)
    try:
        for step in bar:
            idx = torch.as_tensor(next(batches))
            n = int(examples.lengths[idx].max())
            ids = examples.input_ids[idx, :n].clone()
            if cfg.word_dropout > 0:
                drop = examples.droppable[idx, :n] & (torch.rand(ids.shape) < cfg.word_dropout)
                ids[drop] = unk
            ids = ids.to(device)
            labels = examples.labels[idx, :n].to(device)
            mask = (torch.arange(n)[None, :] < examples.lengths[idx][:, None]).to(device)
            px = pixels[examples.image_index[idx]].to(device=device, dtype=model.dtype)
            out = model(
                input_ids=ids,
                attention_mask=mask,
                pixel_values=px,
                labels=labels,
                output_hidden_states=auxiliary is not None,
            )
            loss = out.loss
            if auxiliary is not None:
                subject = None if auxiliary.subject is None else auxiliary.subject[idx].to(device)
                aux = auxiliary.heads.loss(
                    out.hidden_states,
                    ids == auxiliary.image_token_id,
                    auxiliary.identity[idx].to(device),
                    auxiliary.role[idx].to(device),
                    subject,
                    (examples.prompt_lengths[idx] - 1).to(device),
                )
                running_aux.append(aux.item())
                loss = loss + auxiliary.weight * aux
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            opt.step()
            sched.step()
            opt.zero_grad(set_to_none=True)
            running.append(out.loss.item())
            if (step + 1) % cfg.log_every == 0 or step + 1 == cfg.steps:
                row = {
                    "stage": name,
                    "step": step + 1,
                    "loss": float(np.mean(running)),
                    "lr": sched.get_last_lr()[0],
                    "seconds": round(time.perf_counter() - t0, 1),
                }
                if running_aux:
                    row["aux_loss"] = float(np.mean(running_aux))
                running, running_aux = [], []
                rows.append(row)
                bar.set_postfix(loss=f"{row['loss']:.3f}")
                if log is not None:
                    log(row)
    finally:
        embeddings.weight.requires_grad_(True)
        model.eval()
    return rows


def fit_probes(
    model, examples: Examples, pixels: torch.Tensor, cfg: StageConfig, seed: int, auxiliary: Auxiliary, **kwargs
) -> list[dict]:
    """:func:`train_stage` with the model frozen: only the probes learn (fresh probes on a trained model, before a
    stage that trains both, so that their first gradients carry what the model already holds, not noise)."""
    trainable = [p for p in model.parameters() if p.requires_grad]
    for p in trainable:
        p.requires_grad_(False)
    try:
        return train_stage(
            model, examples, pixels, replace(cfg, freeze_embeddings=True), seed, auxiliary=auxiliary, **kwargs
        )
    finally:
        for p in trainable:
            p.requires_grad_(True)
