"""Tokenizer, chat template and processor of the tiny VLA.

The vocabulary is closed: the words of the *training* phrasings of every instruction template, their slot fillers
(objects, colours, people, containers, directions, body regions), the codec's command tokens (skills, pixel and
bin numbers) and the refusal sentence. Words seen only in validation or test phrasings map to ``<unk>``, as a word
never seen in training would carry no learned meaning anyway; training drops template words to ``<unk>`` at
random so that the model learns to act on what it does understand.
"""

from __future__ import annotations

import re

import numpy as np
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
CAPTION_INSTRUCTION = "list the objects on the table"
"""The grounding instruction of capability training: its answer names every object and its pixel
(``red cube 12 40 ; blue ball 30 20``)."""
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
        for i in t.phrasings_in("train"):
            add(re.sub(r"{\w+}", " ", t.phrasings[i]))
    for text in sorted(slot_words()):
        add(text)
    for text in (*SKILLS, "to h speed", REFUSAL, CAPTION_INSTRUCTION, ";"):
        add(text)
    for i in range(max(image_size, len(HEIGHTS), len(SPEEDS))):
        add(str(i))
    return vocab


def slot_words() -> set[str]:
    """The words that fill template slots (object kinds and colours, people, containers, directions, regions):
    training never drops these, since they say what to act on."""
    out: set[str] = set()
    for kind, k in CATALOG.items():
        for color in k.colors:
            out.update(words(describe((kind, color))))
    for text in (*PEOPLE, *CONTAINERS, *DIRECTIONS, *REGION_WORDS):
        out.update(words(text))
    return out


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


def image_statistics(images) -> tuple[list[float], list[float]]:
    """Normalization of the training images: the modal colour (the work surface, most of every image) as the
    mean, so that an empty patch of table is zero and whatever stands on it is the signal; the per-channel
    standard deviation as the scale."""
    pixels = np.asarray(images, dtype=np.uint8).reshape(-1, 3)
    colours, counts = np.unique(pixels, axis=0, return_counts=True)
    mode = colours[int(np.argmax(counts))] / 255.0
    std = (pixels / 255.0).std(axis=0)
    return [round(float(x), 4) for x in mode], [round(float(max(x, 1e-3)), 4) for x in std]


def build_processor(
    image_size: int, patch_size: int, image_mean: list[float] | None = None, image_std: list[float] | None = None
) -> LlavaProcessor:
    """The processor; ``image_mean`` / ``image_std`` default to CLIP's (training sets them from its data with
    :func:`image_statistics`)."""
    stats = {}
    if image_mean is not None:
        stats["image_mean"] = list(image_mean)
    if image_std is not None:
        stats["image_std"] = list(image_std)
    image_processor = CLIPImageProcessorPil(
        **stats,
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
    """The chat messages for one observation: the instruction, then the image.

    Text first lets every image token attend to the instruction (the decoder is causal), so the model can mark
    the patches the instruction is about where they are, instead of searching the image from the answer."""
    return [{"role": "user", "content": [{"type": "text", "text": instruction}, {"type": "image"}]}]


def prompt_text(processor, instruction: str) -> str:
    """The chat-templated prompt for one instruction (image placeholder included)."""
    return processor.apply_chat_template(prompt(instruction), add_generation_prompt=True, tokenize=False)
