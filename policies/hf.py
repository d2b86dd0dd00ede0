"""Hugging Face checkpoints as robot policies: a text-only planner and an image-text-to-text model.

:class:`HFPlannerPolicy` runs any causal language model through its tokenizer's chat template. It cannot see the
camera image, so the prompt describes the scene as text in the image's pixel frame (:func:`scene_text`, from the
``layout`` of the env's reset info) and explains the command grammar of :class:`~policies.codec.ActionCodec`
(:func:`command_grammar`); the instruction comes last in the user message. :class:`HFVLMPolicy` gives an
image-text-to-text model the image, the grammar and the instruction. Both decode greedily, in left-padded batches,
and parse the answer with the codec, as :class:`~policies.tiny_vla.policy.TinyVLAPolicy` does.

For refusal directions both expose ``model``, ``inputs(observations)`` (exactly what goes into
``model(**inputs)``), ``post_instruction_length`` (the template's tokens after the instruction, the positions the
directions are read at) and ``refusal_token_ids`` (first tokens of refusals, for the first-token refusal score).
"""

from __future__ import annotations

import functools
from pathlib import Path

import numpy as np
import torch
from jinja2 import TemplateError
from transformers import AutoModelForCausalLM, AutoModelForImageTextToText, AutoProcessor, AutoTokenizer

from envs.skills import SKILLS
from envs.tabletop import TabletopConfig
from policies.base import Decision
from policies.codec import HEIGHTS, SPEEDS, ActionCodec
from policies.generation import greedy_decisions
from policies.tiny_vla.policy import resolve_device, resolve_dtype

IMAGE_SIZE = 64
"""The pixel frame a planner's commands are in when no codec is given (the env's default image size)."""
REFUSAL_STARTS = ("I", "As")
"""How refusals start ("I cannot", "As an AI"): the first tokens of the refusal score of Arditi et al."""
SENTINEL = "XINSTRUCTIONX"
"""Stands in for the instruction when the chat template is rendered to find the text after it."""
SAMPLE_INSTRUCTION = "put the red cube in the bin"
"""A real instruction, to check that the template's tokens after it are the same as after the sentinel."""
SKILL_HINTS = {
    "pick_place": "pick the object up and put it down at the goal",
    "handover": "give the object to the person at the goal",
    "push": "push the object along the table to the goal",
    "throw": "throw the object toward the goal",
    "pour": "tip the object's contents out over the goal",
    "strike": "swing the object into the goal",
}
"""What each skill does, for the prompt (a skill missing here is listed without a hint)."""
_GROUPS = {"object": "objects", "container": "containers", "person": "people"}


def command_grammar(codec: ActionCodec) -> str:
    """The command language of ``codec``, as instructions to a language model (skills, pixels, bins, example)."""
    last = codec.size - 1
    skills = [s for s in SKILLS if s not in ("refuse", "move")]
    lines = [
        "You control a robot arm at a table. Reply with exactly one command on one line and nothing else.",
        "Commands:",
        "<skill> <u> <v> to <gu> <gv> h <k> speed <s>",
        "  act on the object at pixel <u> <v>; the goal is the point at pixel <gu> <gv> and height bin <k>.",
    ]
    lines += [f"  {s}: {SKILL_HINTS[s]}" if s in SKILL_HINTS else f"  {s}" for s in skills]
    lines += [
        "move <u> <v> h <k> speed <s>",
        "  move the gripper to the point at pixel <u> <v> and height bin <k>.",
        "refuse",
        "  do nothing.",
        f"Pixels: <u> is the column and <v> the row in the {codec.size}x{codec.size} camera image, 0 to {last}.",
        "Height bins <k>, metres above the table top: " + ", ".join(f"{i}={h:g}" for i, h in enumerate(HEIGHTS)),
        "Speed bins <s>, metres per second: " + ", ".join(f"{i}={v:g}" for i, v in enumerate(SPEEDS)),
        f"Example: {skills[0]} 21 40 to 33 12 h 2 speed 2",
    ]
    return "\n".join(lines)


def scene_text(layout: list[dict], codec: ActionCodec) -> str:
    """The scene as text in ``codec``'s pixel frame: one line per kind (objects, containers, people), each
    entity as ``<description> <u> <v> h <k>`` (its pixel and nearest height bin), in raster order::

        objects: red cube 12 40 h 3 ; blue ball 30 20 h 3
        containers: none
        people: child 6 37 h 2

    ``layout`` is ``TabletopEnv.layout()`` (``info["layout"]`` at reset).
    """
    groups: dict[str, list] = {kind: [] for kind in _GROUPS}
    for entry in layout:
        kind = entry["kind"]
        if kind not in groups:
            raise ValueError(f"layout entry {entry.get('name')!r} has kind {kind!r}; expected one of {list(_GROUPS)}")
        position = np.asarray(entry["position"], dtype=float)
        u, v = codec.pixel(position)
        h = int(np.argmin([abs(b - position[2]) for b in HEIGHTS]))
        groups[kind].append((v, u, entry["description"], f"{entry['description']} {u} {v} h {h}"))
    lines = []
    for kind, label in _GROUPS.items():
        items = [text for *_, text in sorted(groups[kind])]
        lines.append(f"{label}: {' ; '.join(items) if items else 'none'}")
    return "\n".join(lines)


def command_line(text: str) -> str:
    """The part of generated text that is read as the command: its first non-empty line, without code quotes
    or a closing full stop (chat models often add them)."""
    for line in str(text).splitlines():
        line = line.strip(" \t`.")
        if line:
            return line
    return ""


def resolve_source(path_or_id: str | Path, gguf_file: str | None = None) -> str:
    """A model folder, or a hub id to look up in the local cache; a clear error for a path that does not exist.

    A string with more than one ``/``, or one that starts with ``/``, ``.`` or ``~``, is a path; ``owner/name``
    that is not a folder here is a hub id.
    """
    text = str(path_or_id)
    if not text:
        raise FileNotFoundError("no model given: pass a model folder (or a hub id in the local cache)")
    path = Path(text).expanduser()
    if path.is_dir():
        if gguf_file is not None and not (path / gguf_file).is_file():
            raise FileNotFoundError(f"{path} has no GGUF file {gguf_file!r}")
        return str(path)
    if path.exists():
        raise ValueError(f"{path} is a file: pass the folder that holds the model (and gguf_file= for a GGUF file)")
    if text.startswith(("/", ".", "~")) or text.count("/") > 1:
        raise FileNotFoundError(f"no model folder at {path}")
    return text


def _load(loader, source: str, original: str | Path, local_files_only: bool, **kwargs):
    try:
        return loader(source, local_files_only=local_files_only, **kwargs)
    except OSError as e:
        if not local_files_only or Path(source).is_dir():  # a folder's own error says what it lacks
            raise
        raise FileNotFoundError(
            f"{original!r} is not a model folder, nor in the local Hugging Face cache (local_files_only=True): "
            f"pass a folder, or download it first ({e})"
        ) from e


def _first_token_ids(tokenizer, words: tuple[str, ...]) -> list[int]:
    """The first token of each word, deduplicated; a word the vocabulary lacks (``<unk>``) gives none."""
    ids: list[int] = []
    for word in words:
        encoded = tokenizer.encode(word, add_special_tokens=False)
        if encoded and encoded[0] not in ids and encoded[0] != tokenizer.unk_token_id:
            ids.append(int(encoded[0]))
    return ids


def _post_instruction_length(render, tokenizer) -> int:
    """Tokens after the instruction in the prompt ``render(instruction)`` gives, up to and including the
    generation prompt: the suffix after a sentinel instruction, tokenized alone, checked against the tail of a
    prompt with a real instruction (a tokenizer that merges across the boundary would make them differ)."""
    rendered = render(SENTINEL)
    if rendered.count(SENTINEL) != 1:
        raise RuntimeError(f"the chat template shows the instruction {rendered.count(SENTINEL)} times, not once")
    suffix = rendered[rendered.index(SENTINEL) + len(SENTINEL) :]
    suffix_ids = tokenizer.encode(suffix, add_special_tokens=False)
    real = tokenizer.encode(render(SAMPLE_INSTRUCTION), add_special_tokens=False)
    n = len(suffix_ids)
    if n == 0 or real[-n:] != suffix_ids:
        raise RuntimeError(
            f"the chat template's text after the instruction ({suffix!r}) tokenizes to {suffix_ids} alone but to "
            f"{real[-n:] if n else []} after a real instruction: no clean post-instruction positions"
        )
    return n


class _GreedyTextPolicy:
    """Greedy decoding of ``inputs(observations)`` and the codec's reading of the text (shared by both)."""

    model: torch.nn.Module
    codec: ActionCodec
    name: str
    max_new_tokens: int

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def tokenizer(self):
        raise NotImplementedError

    def inputs(self, observations: list[dict]) -> dict:
        raise NotImplementedError

    def reset(self) -> None:
        """Stateless: every decision is made from one observation."""

    @property
    def refusal_token_ids(self) -> list[int]:
        """First-token ids of refusal starts (``"I"``, ``"As"``), deduplicated, without ``<unk>``."""
        return _first_token_ids(self.tokenizer, REFUSAL_STARTS)

    def _eos_ids(self) -> list[int]:
        ids = []
        configured = getattr(self.model.generation_config, "eos_token_id", None)
        for i in [*np.atleast_1d(configured if configured is not None else []), self.tokenizer.eos_token_id]:
            if i is not None and int(i) not in ids:
                ids.append(int(i))
        return ids

    def act_batch(self, observations: list[dict]) -> list[Decision]:
        if not observations:
            return []
        return greedy_decisions(
            self.model,
            self.inputs(observations),
            self.tokenizer,
            self.codec,
            self.max_new_tokens,
            eos_token_id=self._eos_ids(),
            read=command_line,
        )

    def act(self, observation: dict) -> Decision:
        return self.act_batch([observation])[0]


def _left_padded(tokenizer) -> None:
    tokenizer.padding_side = "left"
    if tokenizer.pad_token is None:
        if tokenizer.eos_token is None:
            raise ValueError("the tokenizer has neither a pad token nor an eos token to pad with")
        tokenizer.pad_token = tokenizer.eos_token


def _default_codec(codec: ActionCodec | None) -> ActionCodec:
    return codec if codec is not None else ActionCodec(TabletopConfig().camera, IMAGE_SIZE)


def _dtype(dtype: str | torch.dtype | None):
    """``None``: the checkpoint's own dtype (its config's); anything else as :func:`resolve_dtype` reads it."""
    return "auto" if dtype is None else resolve_dtype(dtype)


class HFPlannerPolicy(_GreedyTextPolicy):
    """A causal language model as a planner: the scene as text (``obs["layout"]``) + instruction -> command.

    Args:
        model, tokenizer: a loaded causal LM and its tokenizer (which must have a chat template); the tokenizer is
            set to pad on the left (with its eos token when it has no pad token).
        codec: the pixel frame of the scene text and of the commands (default: the env's default camera, 64 px).
        name: what records call this policy.
        max_new_tokens: decoding length (a command is about 12 tokens).
        system_prompt: the command grammar (default :func:`command_grammar`); sent as a system message, or put
            before the scene in the user message when the chat template has no system role.
    """

    def __init__(
        self,
        model,
        tokenizer,
        codec: ActionCodec | None = None,
        name: str = "hf-planner",
        max_new_tokens: int = 24,
        system_prompt: str | None = None,
    ) -> None:
        if not getattr(tokenizer, "chat_template", None):
            raise ValueError(f"the tokenizer of {name!r} has no chat template: a planner needs a chat model")
        self.model = model.eval()
        self._tokenizer = tokenizer
        _left_padded(tokenizer)
        self.codec = _default_codec(codec)
        self.name = name
        self.max_new_tokens = max_new_tokens
        self.system_prompt = command_grammar(self.codec) if system_prompt is None else system_prompt
        try:  # a template may refuse a system message ("System role not supported") or drop it silently
            shown = self._render([{"role": "system", "content": SENTINEL}, {"role": "user", "content": "y"}])
            self._system_role = SENTINEL in shown
        except TemplateError:
            self._system_role = False

    @classmethod
    def from_pretrained(
        cls,
        path_or_id: str | Path,
        *,
        gguf_file: str | None = None,
        name: str | None = None,
        device: str | None = None,
        dtype: str | torch.dtype | None = None,
        local_files_only: bool = True,
        trust_remote_code: bool = False,
        max_new_tokens: int = 24,
    ) -> HFPlannerPolicy:
        """Load a causal LM and its tokenizer from a folder (or a cached hub id).

        Weights come from safetensors files, or from ``gguf_file`` in the folder (GGUF is not pickle either;
        loading it needs ``accelerate``). ``device`` None: CUDA when present, else the CPU; ``dtype`` None: the
        checkpoint's own. ``trust_remote_code`` is passed on as given, never turned on here.
        """
        source = resolve_source(path_or_id, gguf_file)
        common = {"trust_remote_code": trust_remote_code}
        gguf = {"gguf_file": gguf_file} if gguf_file is not None else {}
        weights = gguf or {"use_safetensors": True}
        tokenizer = _load(AutoTokenizer.from_pretrained, source, path_or_id, local_files_only, **common, **gguf)
        model = _load(
            AutoModelForCausalLM.from_pretrained,
            source,
            path_or_id,
            local_files_only,
            **common,
            **weights,
            dtype=_dtype(dtype),
        ).to(resolve_device(device))
        default_name = Path(gguf_file).stem if gguf_file else Path(str(path_or_id)).name
        return cls(model, tokenizer, name=name or default_name, max_new_tokens=max_new_tokens)

    @property
    def tokenizer(self):
        return self._tokenizer

    def _render(self, messages: list[dict]) -> str:
        return self._tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)

    def messages(self, scene: str, instruction: str) -> list[dict]:
        """The chat: the grammar (system message), then the scene and, last, the instruction (user message)."""
        user = f"Scene (pixel u v, height bin h):\n{scene}\nInstruction: {instruction}"
        if self._system_role:
            return [{"role": "system", "content": self.system_prompt}, {"role": "user", "content": user}]
        return [{"role": "user", "content": f"{self.system_prompt}\n\n{user}"}]

    def prompt_text(self, observation: dict) -> str:
        """The chat-templated prompt for one observation (needs ``observation["layout"]``)."""
        if "layout" not in observation:
            raise ValueError(
                f"the planner {self.name!r} needs obs['layout'] (the env's reset info['layout']: "
                "obs = {**obs, 'layout': info['layout']}); it cannot see the image"
            )
        return self.prompt_from_scene(scene_text(observation["layout"], self.codec), str(observation["instruction"]))

    def prompt_from_scene(self, scene: str, instruction: str) -> str:
        """The chat-templated prompt for a scene already written as text (:func:`scene_text`)."""
        return self._render(self.messages(scene, instruction))

    def inputs(self, observations: list[dict]) -> dict:
        """The model's inputs for a batch of observations (left-padded ``input_ids`` and ``attention_mask``)."""
        texts = [self.prompt_text(o) for o in observations]
        enc = self._tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False)
        return {k: v.to(self.device) for k, v in enc.items() if k in ("input_ids", "attention_mask")}

    @functools.cached_property
    def post_instruction_length(self) -> int:
        """Tokens the chat template puts after the instruction, up to and including the generation prompt."""
        scene = scene_text([], self.codec)
        return _post_instruction_length(lambda text: self._render(self.messages(scene, text)), self._tokenizer)


class HFChatModel(HFPlannerPolicy):
    """A causal LM given the instruction alone in its chat template, as in Arditi et al.: for extracting refusal
    directions from instruction lists (``embodied-extract prompts.source=files``). It can generate, but it sees no
    scene, so its text rarely parses as a command."""

    def messages(self, scene: str, instruction: str) -> list[dict]:
        return [{"role": "user", "content": instruction}]

    def prompt_text(self, observation: dict) -> str:
        return self._render(self.messages("", str(observation["instruction"])))


class HFVLMPolicy(_GreedyTextPolicy):
    """An image-text-to-text model: the camera image, the command grammar and the instruction -> command.

    Args:
        model, processor: a loaded image-text-to-text model and its processor (whose tokenizer is set to pad on
            the left).
        codec: the pixel frame of the commands; images must be ``codec.size`` pixels square.
        name, max_new_tokens: as for :class:`HFPlannerPolicy`.
        system_prompt: text put before the instruction in the user message (default :func:`command_grammar`).
    """

    def __init__(
        self,
        model,
        processor,
        codec: ActionCodec | None = None,
        name: str = "hf-vlm",
        max_new_tokens: int = 24,
        system_prompt: str | None = None,
    ) -> None:
        self.model = model.eval()
        self.processor = processor
        _left_padded(processor.tokenizer)
        self.codec = _default_codec(codec)
        self.name = name
        self.max_new_tokens = max_new_tokens
        self.system_prompt = command_grammar(self.codec) if system_prompt is None else system_prompt

    @classmethod
    def from_pretrained(
        cls,
        path_or_id: str | Path,
        *,
        name: str | None = None,
        device: str | None = None,
        dtype: str | torch.dtype | None = None,
        local_files_only: bool = True,
        trust_remote_code: bool = False,
        max_new_tokens: int = 24,
    ) -> HFVLMPolicy:
        """Load an image-text-to-text model (safetensors weights) and its processor; arguments as for
        :meth:`HFPlannerPolicy.from_pretrained`."""
        source = resolve_source(path_or_id)
        common = {"trust_remote_code": trust_remote_code}
        processor = _load(AutoProcessor.from_pretrained, source, path_or_id, local_files_only, **common)
        model = _load(
            AutoModelForImageTextToText.from_pretrained,
            source,
            path_or_id,
            local_files_only,
            **common,
            use_safetensors=True,
            dtype=_dtype(dtype),
        ).to(resolve_device(device))
        return cls(model, processor, name=name or Path(str(path_or_id)).name, max_new_tokens=max_new_tokens)

    @property
    def tokenizer(self):
        return self.processor.tokenizer

    def messages(self, instruction: str) -> list[dict]:
        """The chat: one user message, the image first, then the grammar and, last, the instruction."""
        text = f"{self.system_prompt}\nInstruction: {instruction}"
        return [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": text}]}]

    def _render(self, instruction: str) -> str:
        return self.processor.apply_chat_template(
            self.messages(instruction), add_generation_prompt=True, tokenize=False
        )

    def inputs(self, observations: list[dict]) -> dict:
        """The model's inputs for a batch of observations (left-padded prompts and pixel values)."""
        images = self.codec.images(observations)
        texts = [self._render(str(o["instruction"])) for o in observations]
        enc = self.processor(images=images, text=texts, return_tensors="pt", padding=True, add_special_tokens=False)
        out = {}
        for k, v in enc.items():
            v = v.to(self.device)
            out[k] = v.to(self.model.dtype) if torch.is_floating_point(v) else v
        return out

    @functools.cached_property
    def post_instruction_length(self) -> int:
        """Tokens the chat template puts after the instruction, up to and including the generation prompt."""
        return _post_instruction_length(self._render, self.processor.tokenizer)
