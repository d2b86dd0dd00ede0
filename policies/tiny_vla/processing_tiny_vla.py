"""Tokenizer, chat template and processor of the tiny VLA.

The vocabulary is closed and known in advance: the words of every instruction template and its slot fillers,
the codec's command tokens (skills, pixel and bin numbers), and the refusal sentence. Words outside it map to
``<unk>``, as a real tokenizer's rare pieces would carry little meaning for a model trained on this data.
"""

from __future__ import annotations

import re

from tokenizers import Regex, Tokenizer, models, normalizers, pre_tokenizers
from transformers import CLIPImageProcessorPil, LlavaProcessor, PreTrainedTokenizerFast

from envs.instructions import DIRECTIONS, REGION_WORDS, describe, templates
from envs.scene import CATALOG, CONTAINERS, PEOPLE
from envs.skills import SKILLS
from policies.codec import HEIGHTS, SPEEDS

SPECIAL = ["<pad>", "<unk>", "<s>", "</s>", "<image>", "<|user|>", "<|end|>", "<|assistant|>"]
REFUSAL = "I cannot do that: it could hurt someone or damage something."
"""What the policy says when it refuses. It starts as chat models' refusals do, so the paper's refusal
substrings and its first-token refusal score both apply."""
POST_INSTRUCTION = "<|end|> <|assistant|>"
"""The chat template's text after the instruction: the positions where refusal directions are read."""

CHAT_TEMPLATE = (
    "{% for m in messages %}"
    "{% if m['role'] == 'user' %}<s> <|user|> "
    "{% for c in m['content'] %}{% if c['type'] == 'image' %}<image> {% else %}{{ c['text'] }} {% endif %}{% endfor %}"
    "<|end|> "
    "{% else %}<|assistant|> {{ m['content'][0]['text'] if m['content'] is not string else m['content'] }} </s> "
    "{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)

_WORD = re.compile(r"\w+|[^\w\s]")
_SPLIT = Regex(r"\w+|[^\w\s]")


def words(text: str) -> list[str]:
    """How the tokenizer splits text (lower-cased words and single punctuation marks)."""
    return _WORD.findall(text.lower())


def vocabulary(image_size: int) -> list[str]:
    vocab: list[str] = list(SPECIAL)
    seen = set(vocab)

    def add(text: str) -> None:
        for w in words(text):
            if w not in seen:
                seen.add(w)
                vocab.append(w)

    for t in templates():
        for p in t.phrasings:
            add(re.sub(r"{\w+}", " ", p))
    for kind, k in CATALOG.items():
        for color in k.colors:
            add(describe((kind, color)))
    for text in (*PEOPLE, *CONTAINERS, *DIRECTIONS, *REGION_WORDS, *SKILLS, "to h speed", REFUSAL):
        add(text)
    for i in range(max(image_size, len(HEIGHTS), len(SPEEDS))):
        add(str(i))
    return vocab


def build_tokenizer(image_size: int) -> PreTrainedTokenizerFast:
    vocab = {w: i for i, w in enumerate(vocabulary(image_size))}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Split(pattern=_SPLIT, behavior="isolated")]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        unk_token="<unk>",
        pad_token="<pad>",
        bos_token="<s>",
        eos_token="</s>",
        additional_special_tokens=SPECIAL[4:],
        padding_side="left",
        chat_template=CHAT_TEMPLATE,
    )


def build_processor(image_size: int, patch_size: int) -> LlavaProcessor:
    image_processor = CLIPImageProcessorPil(
        do_resize=False,
        do_center_crop=False,
        do_rescale=True,
        do_normalize=True,
        size={"shortest_edge": image_size},
        crop_size={"height": image_size, "width": image_size},
    )
    return LlavaProcessor(
        image_processor=image_processor,
        tokenizer=build_tokenizer(image_size),
        patch_size=patch_size,
        vision_feature_select_strategy="default",
        chat_template=CHAT_TEMPLATE,
        image_token="<image>",
        num_additional_image_tokens=1,
    )


def prompt(instruction: str) -> list[dict]:
    """The chat messages for one observation: the image, then the instruction."""
    return [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": instruction}]}]
