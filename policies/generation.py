"""Greedy batched decoding into :class:`~policies.base.Decision` objects, shared by every language-model policy."""

from __future__ import annotations

from collections.abc import Callable

import torch

from policies.base import Decision
from policies.codec import ActionCodec


@torch.no_grad()
def greedy_decisions(
    model,
    inputs: dict,
    tokenizer,
    codec: ActionCodec,
    max_new_tokens: int,
    eos_token_id: int | list[int] | None = None,
    read: Callable[[str], str] = str.strip,
) -> list[Decision]:
    """Generates greedily from a left-padded batch and decodes each reply with ``codec`` (``read`` first picks the
    part of the reply that should be a command). Each decision keeps the next-token logits at the last prompt
    position (for refusal scores)."""
    out = model.generate(
        **inputs,
        max_new_tokens=max_new_tokens,
        do_sample=False,
        num_beams=1,
        return_dict_in_generate=True,
        output_logits=True,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id if eos_token_id is None else eos_token_id,
    )
    new = out.sequences[:, inputs["input_ids"].shape[1] :]
    texts = tokenizer.batch_decode(new, skip_special_tokens=True)
    first = out.logits[0].float().cpu().numpy()
    decisions = []
    for i, text in enumerate(texts):
        decoded = codec.decode(read(text))
        action = decoded.command.to_action() if decoded.command is not None else None
        decisions.append(Decision(text.strip(), action, decoded.refused, decoded.error, first[i]))
    return decisions
