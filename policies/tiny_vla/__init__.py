"""The default policy: a tiny LLaVA-style vision-language-action model trained in this repository.

A CLIP-style vision tower and a Llama decoder composed as ``LlavaForConditionalGeneration``, a word-level
tokenizer with a chat template, and a ``LlavaProcessor``: every piece is a stock Hugging Face class, so the same
code path loads a real checkpoint.
"""
