"""Query stage: answer many questions about a video from one cached prefix.

STTM never looks at the question, so everything before the question -- the chat
template's system prompt, the text before the video and the merged video tokens -- is the
same for every question about a video. ``QueryEngine.prefill`` runs the LLM over that
prefix once and keeps its KV cache; ``QueryEngine.answer`` runs one question's tokens on
top of the cache, decodes the answer, and crops the cache back to the prefix, so the next
question starts from the same state. (Query-aware token reduction cannot do this: its
video tokens depend on the question.) ``QueryEngine.prefill_and_answer`` does both for a
video's first question in one forward over prefix and question: attention is causal, so
the prefix's keys and values do not depend on the question, and cropping the question
off leaves the same prefix state -- without a second forward (tens of milliseconds of
per-layer launch overhead on a 7B model) before the first answer token.

How a prompt is built, for a stored token set of ``N`` merged tokens:

1. The model's own chat template renders one user turn ``[video, question]`` with a single
   video placeholder token; the text before the placeholder is the prefix's text, the
   text after it (question, end of turn, assistant header) is the question's.
2. The placeholder becomes the ``N`` merged features in stored order (LLaVA-OneVision:
   followed by the one ``image_newline`` embedding the model appends to every video).
3. The LLM runs on ``inputs_embeds`` with explicit ``position_ids`` (STTM_SPEC section 5):

   - LLaVA-OneVision (1-D rotary): consecutive positions, as for any sequence;
   - Qwen2-VL / Qwen2.5-VL (3-D multimodal rotary, ``[3, 1, L]``): each merged token takes
     the position the model gives the top-left patch of its root in the full, unmerged
     video, and the text after the video keeps its full-video positions. Both come from
     the loaded model's own ``get_rope_index`` on the unmerged placeholder sequence, so
     they follow whatever the installed transformers version computes.

Decoding is a plain loop over the model's forward (greedy, or sampling with a
temperature) rather than ``generate``: ``generate`` derives positions itself, which is
right for 1-D positions but not for merged 3-D ones.

A ``VideoPrefix`` is used by one question at a time (answering extends its cache and
crops it back); prefill again for another thread.
"""
from __future__ import annotations

import inspect
import json
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from transformers import AutoModelForImageTextToText, AutoTokenizer, DynamicCache, ProcessorMixin

from pipeline.models import UnsupportedModelError, load_adapter, resolve_model
from pipeline.store import StoredTokenSet, StoreError, TokenStore

# config.model_type -> how video tokens sit in the prompt
CONSECUTIVE_POSITIONS = ("llava_onevision",)
MULTIMODAL_ROPE_POSITIONS = ("qwen2_vl", "qwen2_5_vl")


class IncompatibleTokenSetError(ValueError):
    """A stored token set was not made for the loaded model (hidden size, encoder
    fingerprint or grid disagree)."""


@dataclass(frozen=True, eq=False)
class VideoPrefix:
    """The prefilled prompt prefix of one video: everything before the question.

    Attributes:
        video_id: the video's id in the store.
        cache: the KV cache of the ``length`` prefix tokens; ``answer`` extends it and
            crops it back.
        length: ``L``, tokens in the prefix (text before the video + visual tokens).
        position_ids: the positions the prefix ran at: ``[1, L]`` (1-D rotary) or
            ``[3, 1, L]`` (multimodal rotary: temporal, height, width).
        text_position: position of the first token after the video.
        text_before_video: token ids of the chat template before the video placeholder.
        num_visual_tokens: ``N``, merged video tokens in the prefix (not counting
            LLaVA-OneVision's one newline embedding).
        prefill_s: seconds to build the embeddings and run the LLM over the prefix (from
            ``prefill_and_answer``: over the prefix and the first question's prompt, in the
            one forward that yields the first answer token's logits).
    """

    video_id: str
    cache: DynamicCache
    length: int
    position_ids: torch.Tensor
    text_position: int
    text_before_video: tuple[int, ...]
    num_visual_tokens: int
    prefill_s: float


@dataclass(frozen=True)
class Answer:
    """One decoded answer.

    Attributes:
        text: the answer, special tokens removed, stripped.
        token_ids: generated token ids, without the end-of-turn token.
        token_logprobs: the model's log-probability of each generated token (at
            temperature 1), e.g. to tell a confident answer from a guess.
        num_question_tokens: prompt tokens run on top of the prefix (question, end of turn,
            assistant header).
        ttft_s: seconds from the start of ``answer`` to the first generated token (from
            ``prefill_and_answer``: from the start of the prefill, which it includes -- the
            time to first token of a question on a video not yet prefilled).
        total_s: seconds for the whole answer, counted from the same start as ``ttft_s``.
    """

    text: str
    token_ids: list[int]
    token_logprobs: list[float]
    num_question_tokens: int
    ttft_s: float
    total_s: float


class QueryEngine:
    """A full Video LLM (language model included) that answers questions from stored
    token sets; loads the model once.

    Args:
        model_spec: a checkpoint directory, a hub id, or ``tiny-random:<family>``.
        device: where the model runs.
        dtype: model dtype; ``None`` keeps the checkpoint's.
    """

    def __init__(self, model_spec: str, device: str | torch.device = "cpu", dtype: torch.dtype | None = None):
        model_path = resolve_model(model_spec)
        self.model_spec = model_spec
        self.model = AutoModelForImageTextToText.from_pretrained(model_path, dtype=dtype or "auto").to(device).eval()
        self.model_type = self.model.config.model_type
        if self.model_type not in CONSECUTIVE_POSITIONS + MULTIMODAL_ROPE_POSITIONS:
            raise UnsupportedModelError(
                f"{model_spec}: model_type {self.model_type!r} is not supported by the query stage; "
                f"supported: {sorted(CONSECUTIVE_POSITIONS + MULTIMODAL_ROPE_POSITIONS)}"
            )
        self.device = self.model.device
        self.dtype = self.model.dtype
        self.tokenizer = AutoTokenizer.from_pretrained(model_path)
        self.chat_template = _chat_template(model_path, self.tokenizer)
        self.video_token_id = self.model.config.video_token_id
        self.hidden_size = self.model.config.get_text_config().hidden_size
        eos = self.model.generation_config.eos_token_id
        self.eos_token_ids = set(eos if isinstance(eos, list) else [eos]) - {None}
        # transformers renamed the forward's `past_key_values` to `cache` within 5.x.
        forward_parameters = inspect.signature(self.model.forward).parameters
        self._cache_argument = "cache" if "cache" in forward_parameters else "past_key_values"
        self._encoder_fingerprints: dict[torch.dtype, str] = {}
        # Every prompt's text before the video: the question comes after the video.
        self._text_before_video = tuple(self._prompt_ids("")[0])

    # -- prefix ----------------------------------------------------------------------------

    @torch.inference_mode()
    def prefill(self, stored: StoredTokenSet) -> VideoPrefix:
        """Run the LLM over the prompt prefix of ``stored`` (its ``N`` merged tokens in
        stored order) and keep the KV cache.

        Raises IncompatibleTokenSetError when ``stored`` was made for another model.
        """
        self.check(stored)
        prefix, _ = self._prefill(stored, [], self._now())
        return prefix

    @torch.inference_mode()
    def prefill_and_answer(
        self,
        stored: StoredTokenSet,
        question: str,
        *,
        max_new_tokens: int = 64,
        do_sample: bool = False,
        temperature: float = 1.0,
        seed: int | None = None,
    ) -> tuple[VideoPrefix, Answer]:
        """``prefill(stored)`` and ``answer(prefix, question, ...)`` with the question's
        prompt in the prefill's forward: that one forward gives the first answer token,
        decoding goes on as in ``answer``, and the cache is cropped back to the prefix, so
        the returned prefix serves further questions exactly as ``prefill``'s would.

        Timings: the prefix's ``prefill_s`` is the time of that one forward (prefix and
        question prompt); the answer's ``ttft_s`` and ``total_s`` count from the start of
        the prefill, which they include.

        Raises what ``prefill`` and ``answer`` raise, before running the model.
        """
        sample = self._sampler(max_new_tokens, do_sample, temperature, seed)
        self.check(stored)
        start = self._now()
        question_ids = self._question_ids(question)
        prefix, logits = self._prefill(stored, question_ids, start)
        # No try/finally: when decoding fails, the prefix and its cache are never handed out.
        answer = self._decode(prefix, question_ids, logits, sample, max_new_tokens, start)
        self._crop_to_prefix(prefix)
        return prefix, answer

    def _prefill(
        self, stored: StoredTokenSet, question_ids: list[int], start: float
    ) -> tuple[VideoPrefix, torch.Tensor]:
        """Run the LLM on a new cache over the prompt prefix of ``stored`` followed by
        ``question_ids`` (none: the prefix alone), these at the positions ``answer`` gives
        them. Returns the prefix, whose cache still holds the question, with ``prefill_s``
        counted from ``start``, and the last position's logits ``[vocab]``."""
        features = stored.tokens.features.to(self.device, self.dtype)  # [N, C]
        if self.model_type in CONSECUTIVE_POSITIONS:
            # LlavaOnevisionModel.get_video_features appends one image_newline after the
            # last frame's tokens; it stays after the merged tokens.
            visual = torch.cat([features, self.model.model.image_newline[None]])
            length = len(self._text_before_video) + len(visual)
            position_ids = torch.arange(length, device=self.device)[None]  # [1, L]
            text_position = length
        else:
            visual = features
            position_ids, text_position = self._multimodal_rope_prefix_positions(stored)
            length = position_ids.shape[-1]
        embeds = torch.cat([self._embed(self._text_before_video), visual, self._embed(question_ids)])[None]  # [1, L + Q, C]
        positions = torch.cat([position_ids, self._text_positions(text_position, len(question_ids))], dim=-1)
        cache = DynamicCache(config=self.model.config)
        logits = self._forward(embeds, positions, cache)
        prefix = VideoPrefix(
            video_id=stored.video_id,
            cache=cache,
            length=length,
            position_ids=position_ids,
            text_position=text_position,
            text_before_video=self._text_before_video,
            num_visual_tokens=stored.num_tokens,
            prefill_s=self._now() - start,
        )
        return prefix, logits

    def check(self, stored: StoredTokenSet) -> None:
        """Raise IncompatibleTokenSetError unless ``stored`` holds this model's visual
        tokens: same hidden size, same vision encoder (weights, config and preprocessing,
        by the encode stage's fingerprint), merged at layer 0, and for multimodal rotary
        models a ``model_extra`` video grid that matches the token grid."""
        channels = stored.tokens.features.shape[1]
        if channels != self.hidden_size:
            raise IncompatibleTokenSetError(
                f"video {stored.video_id!r}: stored tokens have {channels} channels, {self.model_spec} "
                f"takes {self.hidden_size} (the store was made for {stored.model_id})"
            )
        if stored.merge_layer != 0:
            raise IncompatibleTokenSetError(
                f"video {stored.video_id!r}: tokens merged after decoder layer {stored.merge_layer}; "
                "only merge_layer 0 (visual embeddings) can be queried"
            )
        fingerprint = self._encoder_fingerprint(stored.tokens.features.dtype)
        if stored.encoder_fingerprint != fingerprint:
            raise IncompatibleTokenSetError(
                f"video {stored.video_id!r}: stored tokens come from another vision encoder "
                f"({stored.model_id}, {stored.encoder_fingerprint}) than {self.model_spec} ({fingerprint})"
            )
        # model_extra comes from the encoder: its grid means something once the encoder is ours.
        if self.model_type in MULTIMODAL_ROPE_POSITIONS:
            t, h, w = stored.tokens.grid
            merge = self.model.config.vision_config.spatial_merge_size
            grid_thw = stored.model_extra.get("video_grid_thw")
            if grid_thw != [t, h * merge, w * merge]:
                raise IncompatibleTokenSetError(
                    f"video {stored.video_id!r}: model_extra video_grid_thw {grid_thw} does not match the token grid "
                    f"{[t, h, w]} with spatial merge {merge}"
                )

    def _encoder_fingerprint(self, dtype: torch.dtype) -> str:
        """The encode stage's fingerprint of this model's vision side in ``dtype`` (the
        adapter hashes the weights in the dtype it ran in, which is the stored tokens')."""
        if dtype not in self._encoder_fingerprints:
            adapter = load_adapter(self.model_spec, device="cpu", dtype=dtype)
            self._encoder_fingerprints[dtype] = adapter.fingerprint
        return self._encoder_fingerprints[dtype]

    def _multimodal_rope_prefix_positions(self, stored: StoredTokenSet) -> tuple[torch.Tensor, int]:
        """``([3, 1, L], text_position)``: Qwen2-VL positions of the prefix with merged tokens.

        The model's own ``get_rope_index`` runs on the unmerged sequence (text before the
        video, ``T*H*W`` video placeholders, one text token); each merged token takes the
        position of its root's top-left patch, and the text after the video starts where
        the unmerged sequence's text would. (``check`` made sure ``model_extra``'s grid is
        the token grid.)
        """
        extra = stored.model_extra
        t, h, w = stored.tokens.grid
        text_before_video = list(self._text_before_video)
        before = len(text_before_video)
        # One text token after the video (which one does not matter) shows where text resumes.
        input_ids = torch.tensor([text_before_video + [self.video_token_id] * (t * h * w) + text_before_video[:1]])
        token_types = torch.zeros_like(input_ids, dtype=torch.int32)
        token_types[0, before : before + t * h * w] = 2  # transformers' mm_token_type_ids: 2 = video
        rope_inputs = dict(mm_token_type_ids=token_types, video_grid_thw=torch.tensor([extra["video_grid_thw"]]))
        if self.model_type == "qwen2_5_vl":
            rope_inputs["second_per_grid_ts"] = torch.tensor([extra["second_per_grid_t"]])
        full_positions, _ = self.model.model.get_rope_index(input_ids, **rope_inputs)  # [3, 1, before + T*H*W + 1]

        tokens = stored.tokens
        root_patch = (tokens.frame.long() * h + tokens.box[:, 0].long()) * w + tokens.box[:, 1].long()  # [N]
        keep = torch.cat([torch.arange(before), before + root_patch])
        position_ids = full_positions[:, :, keep].to(self.device)
        text_position = int(full_positions[0, 0, -1])
        return position_ids, text_position

    # -- answers ---------------------------------------------------------------------------

    @torch.inference_mode()
    def answer(
        self,
        prefix: VideoPrefix,
        question: str,
        *,
        max_new_tokens: int = 64,
        do_sample: bool = False,
        temperature: float = 1.0,
        seed: int | None = None,
    ) -> Answer:
        """Answer ``question`` about the video of ``prefix`` from its cached prefix.

        Greedy decoding by default; ``do_sample`` draws from ``softmax(logits /
        temperature)`` with a generator seeded by ``seed`` (``None``: torch's global RNG).
        Stops at the model's end-of-turn token or after ``max_new_tokens``.
        """
        sample = self._sampler(max_new_tokens, do_sample, temperature, seed)
        start = self._now()
        question_ids = self._question_ids(question)
        try:
            logits = self._forward(
                self._embed(question_ids)[None], self._text_positions(prefix.text_position, len(question_ids)), prefix.cache
            )
            return self._decode(prefix, question_ids, logits, sample, max_new_tokens, start)
        finally:
            self._crop_to_prefix(prefix)

    @torch.inference_mode()
    def next_token_logits(self, prefix: VideoPrefix, question: str) -> torch.Tensor:
        """float32 ``[vocab]`` logits of the first answer token (leaves the prefix as it was)."""
        question_ids = self._question_ids(question)
        try:
            logits = self._forward(
                self._embed(question_ids)[None], self._text_positions(prefix.text_position, len(question_ids)), prefix.cache
            )
        finally:
            self._crop_to_prefix(prefix)
        return logits.float()

    def _sampler(
        self, max_new_tokens: int, do_sample: bool, temperature: float, seed: int | None
    ) -> Callable[[torch.Tensor], int]:
        """Check the decoding options; returns how a token is picked from float32 logits:
        their argmax, or with ``do_sample`` a draw from ``softmax(logits / temperature)``
        (a new generator seeded by ``seed``, so that each answer repeats; ``None``: torch's
        global RNG)."""
        if max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
        if not do_sample:
            return lambda logits: int(logits.argmax())
        if not temperature > 0:
            raise ValueError(f"temperature must be > 0 for sampling, got {temperature}")
        generator = None if seed is None else torch.Generator(self.device).manual_seed(seed)
        return lambda logits: int(torch.multinomial(torch.softmax(logits / temperature, dim=-1), 1, generator=generator))

    def _decode(
        self,
        prefix: VideoPrefix,
        question_ids: list[int],
        logits: torch.Tensor,
        sample: Callable[[torch.Tensor], int],
        max_new_tokens: int,
        start: float,
    ) -> Answer:
        """Decode an answer from ``logits``, the first answer token's, which the question's
        prompt (now in ``prefix.cache``) gave. Each generated token extends the cache (the
        caller crops it back); ``ttft_s`` and ``total_s`` count from ``start``."""
        generated: list[int] = []
        logprobs: list[float] = []
        ttft_s = None
        while True:
            logits = logits.float()
            token = sample(logits)
            if ttft_s is None:
                ttft_s = self._now() - start
            if token in self.eos_token_ids:
                break
            generated.append(token)
            logprobs.append(float(torch.log_softmax(logits, dim=-1)[token]))
            if len(generated) == max_new_tokens:
                break
            position = prefix.text_position + len(question_ids) + len(generated) - 1
            logits = self._forward(self._embed([token])[None], self._text_positions(position, 1), prefix.cache)
        text = self.tokenizer.decode(generated, skip_special_tokens=True).strip()
        return Answer(text, generated, logprobs, len(question_ids), ttft_s, self._now() - start)

    @staticmethod
    def _crop_to_prefix(prefix: VideoPrefix) -> None:
        """Drop what a question added to the prefix's cache, so the next question starts
        from the prefix alone. Layer by layer: a forward that failed part-way extended
        only the layers it reached. (A negative crop removes that many tokens in every
        transformers release we support; a positive one means "keep that many" in some
        and is refused in others.)"""
        for layer in prefix.cache.layers:
            if (added := layer.get_seq_length() - prefix.length) > 0:
                layer.crop(-added)

    # -- prompt pieces ---------------------------------------------------------------------

    def _prompt_ids(self, question: str) -> tuple[list[int], list[int]]:
        """Token ids of the chat template's single user turn ``[video, question]`` with the
        generation prompt, split at the video placeholder: ``(before, after)``."""
        conversation = [{"role": "user", "content": [{"type": "video"}, {"type": "text", "text": question}]}]
        text = self.tokenizer.apply_chat_template(
            conversation, chat_template=self.chat_template, add_generation_prompt=True, tokenize=False
        )
        # The template writes every special token itself (as the processor relies on).
        ids = self.tokenizer(text, add_special_tokens=False)["input_ids"]
        if ids.count(self.video_token_id) != 1:
            raise ValueError(f"{self.model_spec}: the chat template should hold one video placeholder, got {ids.count(self.video_token_id)}")
        split = ids.index(self.video_token_id)
        return ids[:split], ids[split + 1 :]

    def _question_ids(self, question: str) -> list[int]:
        """Token ids of the prompt after the video: question, end of turn, assistant header."""
        if not question.strip():
            raise ValueError("the question is empty")
        before, after = self._prompt_ids(question)
        if tuple(before) != self._text_before_video:
            raise ValueError(f"{self.model_spec}: the chat template puts question-dependent text before the video")
        return after

    def _text_positions(self, start: int, count: int) -> torch.Tensor:
        """Positions of ``count`` text tokens from ``start``: ``[1, count]`` or, for
        multimodal rotary, the same for all three axes ``[3, 1, count]``."""
        positions = torch.arange(start, start + count, device=self.device)[None]
        if self.model_type in MULTIMODAL_ROPE_POSITIONS:
            return positions[None].expand(3, 1, count)
        return positions

    def _embed(self, token_ids: Sequence[int]) -> torch.Tensor:
        """``[len, C]`` input embeddings of text tokens (``[0, C]`` for none: the explicit
        dtype keeps an empty list from becoming a float tensor)."""
        return self.model.get_input_embeddings()(torch.tensor(token_ids, dtype=torch.long, device=self.device))

    def _forward(self, embeds: torch.Tensor, position_ids: torch.Tensor, cache: DynamicCache) -> torch.Tensor:
        """Run ``embeds [1, n, C]`` at ``position_ids`` on top of ``cache`` (which grows by
        ``n``); returns the last position's logits ``[vocab]``."""
        output = self.model(
            inputs_embeds=embeds, position_ids=position_ids, use_cache=True, logits_to_keep=1, **{self._cache_argument: cache}
        )
        return output.logits[0, -1]

    def _now(self) -> float:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        return time.perf_counter()


# ---------------------------------------------------------------------------------------
# Questions files


@dataclass(frozen=True)
class Question:
    """One question about one video; ``id`` is the caller's (a string in a questions file: its ``id``, else
    its line number)."""

    id: Any
    video_id: str
    text: str


@dataclass(frozen=True)
class InputProblem:
    """An input line that could not be read as a question."""

    line: int
    message: str


@dataclass(frozen=True)
class QuestionResult:
    """The outcome of one question: an ``answer`` or, when its video could not be used,
    an ``error``. ``load_s`` (reading the token set) and ``prefill_s`` belong to the video
    and are the same for all its questions. ``prefix_reused`` is false for the video's
    first question, whose prompt rode in the prefill's forward
    (``QueryEngine.prefill_and_answer``): its answer's ``ttft_s`` and ``total_s`` include
    ``prefill_s`` (not ``load_s``). The other questions' times start at their question."""

    question: Question
    answer: Answer | None = None
    error: str | None = None
    num_visual_tokens: int | None = None
    load_s: float | None = None
    prefill_s: float | None = None
    prefix_reused: bool = False

    def to_json(self) -> dict[str, Any]:
        """The output JSONL line of an answered question."""
        return {
            "id": self.question.id,
            "video_id": self.question.video_id,
            "answer": self.answer.text,
            "num_visual_tokens": self.num_visual_tokens,
            "num_generated_tokens": len(self.answer.token_ids),
            "load_s": round(self.load_s, 6),
            "prefill_s": round(self.prefill_s, 6),
            "ttft_s": round(self.answer.ttft_s, 6),
            "total_s": round(self.answer.total_s, 6),
            "prefix_reused": self.prefix_reused,
        }


def read_questions(path: str | Path) -> tuple[list[Question], list[InputProblem]]:
    """Questions from a JSONL file, one ``{"video_id": ..., "question": ..., "id": ...}``
    object per line (``id`` optional; blank lines skipped), and the lines that are not
    such an object, by line number."""
    questions, problems = [], []
    with open(path, encoding="utf-8") as lines:
        for number, line in enumerate(lines, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except ValueError as error:
                problems.append(InputProblem(number, f"not valid JSON ({error})"))
                continue
            if not isinstance(record, dict):
                problems.append(InputProblem(number, f"expected a JSON object, got {type(record).__name__}"))
                continue
            missing = [key for key in ("video_id", "question") if not isinstance(record.get(key), str) or not record[key].strip()]
            if missing:
                problems.append(InputProblem(number, f"needs non-empty string fields {missing}"))
                continue
            questions.append(Question(id=str(record.get("id", number)), video_id=record["video_id"], text=record["question"]))
    return questions, problems


def answer_questions(
    engine: QueryEngine,
    store: TokenStore,
    questions: Iterable[Question],
    *,
    config_fingerprint: str | None = None,
    max_new_tokens: int = 64,
    do_sample: bool = False,
    temperature: float = 1.0,
    seed: int | None = None,
) -> Iterator[QuestionResult]:
    """Answer ``questions``, reading and prefilling each video once.

    Questions are grouped by video (videos in order of first appearance, questions in
    input order within a video). Each video's first question is answered in its prefill's
    forward (``QueryEngine.prefill_and_answer``), the others from the prefix it leaves. A
    video whose token set cannot be read or does not fit the model gives each of its
    questions an ``error`` result; the others go on.
    """
    decoding = dict(max_new_tokens=max_new_tokens, do_sample=do_sample, temperature=temperature, seed=seed)
    by_video: dict[str, list[Question]] = {}
    for question in questions:
        by_video.setdefault(question.video_id, []).append(question)

    for video_id, video_questions in by_video.items():
        try:
            start = time.perf_counter()
            stored = store.read(video_id, config_fingerprint)
            load_s = time.perf_counter() - start
            # Checked before the fused call (which checks again), so that what makes a video
            # unusable is told apart from a bad question or decoding option (both ValueError).
            engine.check(stored)
        except (StoreError, ValueError) as error:  # ValueError: bad video id, IncompatibleTokenSetError
            for question in video_questions:
                yield QuestionResult(question, error=str(error))
            continue
        first, *others = video_questions
        prefix, answer = engine.prefill_and_answer(stored, first.text, **decoding)
        video = dict(num_visual_tokens=prefix.num_visual_tokens, load_s=load_s, prefill_s=prefix.prefill_s)
        yield QuestionResult(first, answer, **video)
        for question in others:
            yield QuestionResult(question, engine.answer(prefix, question.text, **decoding), **video, prefix_reused=True)


def prefix_reuse_timings(results: Iterable[QuestionResult]) -> dict[str, float | int]:
    """What prefix reuse bought over answered ``results``: ``num_videos``, total
    ``prefill_s`` (once per video), total ``answer_s`` beyond the prefills (a video's
    first answer counts without the ``prefill_s`` its times include), and ``saved_s``, the
    prefills a fresh prefill per question would have added (each video's ``prefill_s``
    times its answered questions minus one; slightly more than the time saved, as a fresh
    prefill would carry its question's prompt, which a reused prefix runs on its own)."""
    prefill_s: dict[str, float] = {}
    answered: dict[str, int] = {}
    answer_s = 0.0
    for result in results:
        if result.answer is None:
            continue
        video_id = result.question.video_id
        prefill_s[video_id] = result.prefill_s
        answered[video_id] = answered.get(video_id, 0) + 1
        answer_s += result.answer.total_s - (0.0 if result.prefix_reused else result.prefill_s)
    saved_s = sum(prefill_s[video_id] * (count - 1) for video_id, count in answered.items())
    return {
        "num_videos": len(prefill_s),
        "prefill_s": round(sum(prefill_s.values()), 6),
        "answer_s": round(answer_s, 6),
        "saved_s": round(saved_s, 6),
    }


@dataclass(frozen=True)
class QueryRunSummary:
    """What ``run_questions_file`` did. ``problems``: one ``{"line": ..., "error": ...}``
    per unreadable input line and one ``{"id", "video_id", "error"}`` per question whose
    video could not be used. ``timings``: ``prefix_reuse_timings`` plus ``wall_s``."""

    num_questions: int
    num_answered: int
    problems: list[dict[str, Any]]
    timings: dict[str, float | int]


def run_questions_file(
    engine: QueryEngine,
    store: TokenStore,
    questions_path: str | Path,
    out_path: str | Path,
    **options: Any,
) -> QueryRunSummary:
    """Answer every question of a JSONL questions file (``read_questions``) and write one
    JSON line per answered question to ``out_path`` (``QuestionResult.to_json``), in the
    order they are answered. ``options`` go to ``answer_questions``.

    Raises ValueError when the file holds no question at all.
    """
    start = time.perf_counter()
    questions, input_problems = read_questions(questions_path)
    problems = [{"line": problem.line, "error": problem.message} for problem in input_problems]
    if not questions:
        details = "".join(f"\n  line {problem['line']}: {problem['error']}" for problem in problems)
        raise ValueError(f"{questions_path} holds no questions{details}")
    results = []
    with open(out_path, "w", encoding="utf-8") as out:
        for result in answer_questions(engine, store, questions, **options):
            results.append(result)
            if result.answer is None:
                problems.append({"id": result.question.id, "video_id": result.question.video_id, "error": result.error})
                continue
            out.write(json.dumps(result.to_json(), ensure_ascii=False) + "\n")
            out.flush()
    timings = prefix_reuse_timings(results) | {"wall_s": round(time.perf_counter() - start, 6)}
    answered = sum(result.answer is not None for result in results)
    return QueryRunSummary(len(questions), answered, problems, timings)


def _chat_template(model_path: str, tokenizer) -> str:
    """The processor's chat template (``chat_template.jinja``/``.json`` of the checkpoint),
    else the tokenizer's. Read without building the processor, whose video processor
    needs torchvision."""
    processor_dict, _ = ProcessorMixin.get_processor_dict(model_path)
    template = processor_dict.get("chat_template") or tokenizer.chat_template
    if isinstance(template, dict):
        template = template.get("default")
    if not template:
        raise ValueError(f"{model_path} has no chat template")
    return template
