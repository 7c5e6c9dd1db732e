"""Query stage: answer many questions about a video from one cached prefix.

STTM never looks at the question, so everything before the question -- the chat
template's system prompt, the text before the video and the merged video tokens -- is the
same for every question about a video. ``QueryEngine.prefill`` runs the LLM over that
prefix once and keeps its KV cache. ``QueryEngine.answer_all`` answers all of a video's
questions together on top of it: their prompts in one forward, then one forward per new
token for all questions still going (a question that ends drops out); the cache after the
prefix holds the questions' tokens interleaved, and a block mask lets each token see the
prefix and its own question's tokens only, so each answer is the one the question gets
alone (STTM_SPEC section 7). Afterwards the cache is cropped back to the prefix.
``QueryEngine.prefill_and_answer_all`` does both for a video not yet prefilled, with the
first question's prompt in the prefill's forward: attention is causal, so the prefix's
keys and values do not depend on it. Models whose cache holds a recurrent state
(``PromptLayout.recurrent_state``, e.g. Qwen3.5's linear-attention layers) can neither be
cropped nor packed: their prefix is prefilled alone and never changed, and each question
runs on its own copy of its cache, as one row of a batch (``_QuestionRows``). (Query-aware token reduction cannot share a prefix:
its video tokens depend on the question.)

On CUDA the forwards after the prefill run on a fixed-capacity copy of the cache and are
replayed from CUDA graphs, one per (capacity, rows) bucket (``_StaticDecoder``): eager
transformers spends tens of milliseconds of CPU per forward of a 7B model, which would
otherwise dominate the answers. Masked attention packs the query heads that share a
key/value head (``_grouped_query_attention``) instead of copying the keys per head, and
on CUDA splits the long cache's keys over the whole GPU (``pipeline.split_kv_attention``).

How a prompt is built, for a stored token set of ``N`` merged tokens:

1. The model's own chat template renders one user turn ``[video, question]`` with a single
   video placeholder token; the text before the placeholder is the prefix's text, the
   text after it (question, end of turn, assistant header) is the question's.
2. The placeholder becomes the ``N`` merged features in stored order (LLaVA-OneVision:
   followed by the one ``image_newline`` embedding the model appends to every video).
3. The LLM runs on ``inputs_embeds`` with explicit ``position_ids`` (STTM_SPEC section 5):

   - 1-D rotary models (LLaVA-OneVision): consecutive positions, as for any sequence;
   - multimodal rotary models (Qwen2-VL, Qwen2.5-VL, ``[3, 1, L]``): each merged token
     takes the position the model gives the top-left patch of its root in the full,
     unmerged video, and the text after the video keeps its full-video positions.

   What replaces the placeholder and at which positions is the model family's
   ``PromptLayout`` (``pipeline.models``); this module never looks at the model type.

A token set merged inside the LLM at decoder layer k > 0 (STTM_SPEC section 6) prefills
from its stored keys and values (layers < k) and states (layers >= k), and its questions
run under the layer hooks of ``pipeline.merge_layer.LayerGroups`` (``VideoPrefix.layer_groups``).

Decoding is a plain loop over the model's forward (greedy, or sampling with a
temperature, per question: ``Decoding``) rather than ``generate``: ``generate`` derives
positions itself, which is right for 1-D positions but not for merged 3-D ones.

A ``VideoPrefix`` is used by one call at a time (answering extends its cache and crops it
back); prefill again for another thread.
"""
from __future__ import annotations

import contextlib
import copy
import dataclasses
import functools
import inspect
import json
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from transformers import AttentionInterface, AutoModelForImageTextToText, AutoTokenizer, DynamicCache, ProcessorMixin
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

from pipeline import split_kv_attention
from pipeline.merge_layer import LayerGroups, check_layer_token_set, prefill_from_layer, text_model_of
from pipeline.models import IncompatibleTokenSetError, load_adapter, prompt_layout, resolve_model
from pipeline.store import StoredTokenSet, StoreError, TokenStore

# The language model's attention: SDPA, with grouped-query heads packed under a mask,
# split over the keys on CUDA; and the same without the split (to compare with).
GROUPED_QUERY_ATTENTION = "sttm_grouped_query"
GROUPED_QUERY_SDPA = "sttm_grouped_query_sdpa"
DECODING_STEPS = ("auto", "dynamic", "static", "graphs")
# Masked attention with at most this many scores (query rows x keys x key/value heads)
# runs as two matrix products instead of SDPA (where the split-KV kernel does not run).
MATH_ATTENTION_MAX_SCORES = 2**26


def _grouped_query_attention(module, query, key, value, attention_mask, *, split_kv: bool = True, **kwargs):
    """transformers' SDPA attention, but under a mask (questions answered together) the
    query heads that share a key/value head are stacked along the query axis
    (``[B, H_kv, G * n, D]``), so attention reads each key/value head once instead of
    transformers' ``repeat_kv`` copies of the whole cache (masked SDPA with
    ``enable_gqa`` falls back to its math kernel on CUDA). The mask must be the same for
    all heads (``[B, 1, n, S]``). On CUDA (``split_kv``), a boolean mask and batch 1 run
    the split-KV kernel (``pipeline.split_kv_attention``): few query rows over a long
    cache keep the whole GPU busy."""
    groups = getattr(module, "num_key_value_groups", 1)
    if attention_mask is None or groups == 1 or attention_mask.shape[1] != 1:
        return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)
    batch, heads, length, dim = query.shape
    packed_query = query.reshape(batch, heads // groups, groups * length, dim)
    scale = kwargs.get("scaling") or dim**-0.5
    if split_kv and batch == 1 and attention_mask.dtype == torch.bool and split_kv_attention.available(query):
        output = split_kv_attention.split_kv_attention(packed_query[0], key[0], value[0], attention_mask[0, 0], scale=scale)[None]
        return output.reshape(batch, heads, length, dim).transpose(1, 2).contiguous(), None
    packed_mask = attention_mask[:, :, None].expand(-1, -1, groups, -1, -1).reshape(attention_mask.shape[0], 1, groups * length, -1)
    if packed_query.shape[1] * packed_query.shape[2] * key.shape[2] <= MATH_ATTENTION_MAX_SCORES:
        # Few query rows on a long cache: SDPA's kernels run one block of queries per
        # head over all keys (few busy SMs), where matrix products use the whole GPU.
        scores = torch.matmul(packed_query.float(), key.float().transpose(-1, -2)) * scale
        scores = scores.masked_fill(~packed_mask, float("-inf")) if packed_mask.dtype == torch.bool else scores + packed_mask
        output = torch.matmul(torch.softmax(scores, dim=-1).to(value.dtype), value)
    else:
        output = torch.nn.functional.scaled_dot_product_attention(packed_query, key, value, attn_mask=packed_mask, scale=scale)
    return output.reshape(batch, heads, length, dim).transpose(1, 2).contiguous(), None


AttentionInterface.register(GROUPED_QUERY_ATTENTION, _grouped_query_attention)
AttentionInterface.register(GROUPED_QUERY_SDPA, functools.partial(_grouped_query_attention, split_kv=False))
AttentionMaskInterface.register(GROUPED_QUERY_ATTENTION, sdpa_mask)
AttentionMaskInterface.register(GROUPED_QUERY_SDPA, sdpa_mask)


@dataclass(frozen=True)
class Decoding:
    """How an answer is decoded: greedy (the default), or with ``do_sample`` each token
    drawn from ``softmax(logits / temperature)`` (float32 logits) with a generator of its
    own seeded by ``seed``, so that the answer repeats (``None``: torch's global RNG);
    until the model's end-of-turn token or ``max_new_tokens`` tokens."""

    max_new_tokens: int = 64
    do_sample: bool = False
    temperature: float = 1.0
    seed: int | None = None

    def __post_init__(self):
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if self.do_sample and not self.temperature > 0:
            raise ValueError(f"temperature must be > 0 for sampling, got {self.temperature}")


def _per_question(decoding: Decoding | Sequence[Decoding], questions: Sequence[str]) -> list[Decoding]:
    """One ``Decoding`` per question (``decoding``: one for all or one each)."""
    if isinstance(questions, str):
        raise TypeError("questions should be a sequence of strings, not one string")
    if not questions:
        raise ValueError("no questions to answer")
    if isinstance(decoding, Decoding):
        return [decoding] * len(questions)
    if len(decoding) != len(questions):
        raise ValueError(f"{len(decoding)} decoding options for {len(questions)} questions")
    return list(decoding)



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
        layer_groups: for a token set merged at decoder layer k > 0, how layers >= k see
            the cache (``pipeline.merge_layer``); ``None`` at k = 0. ``length`` and
            ``text_position`` are then those of the unmerged prefix (layers < k).
    """

    video_id: str
    cache: DynamicCache
    length: int
    position_ids: torch.Tensor
    text_position: int
    text_before_video: tuple[int, ...]
    num_visual_tokens: int
    prefill_s: float
    layer_groups: LayerGroups | None = None


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
        decoding_steps: how the decoding steps run (one forward per new token for all
            questions still going): ``"dynamic"`` on the growing cache, eager;
            ``"static"`` on a fixed-capacity cache, eager; ``"graphs"`` that, captured
            once per shape bucket in CUDA graphs and replayed (CUDA only); ``"auto"``:
            graphs on CUDA, else dynamic.
    """

    def __init__(
        self,
        model_spec: str,
        device: str | torch.device = "cpu",
        dtype: torch.dtype | None = None,
        *,
        decoding_steps: str = "auto",
    ):
        if decoding_steps not in DECODING_STEPS:
            raise ValueError(f"decoding_steps must be one of {DECODING_STEPS}, got {decoding_steps!r}")
        model_path = resolve_model(model_spec)
        self.model_spec = model_spec
        self.model = AutoModelForImageTextToText.from_pretrained(model_path, dtype=dtype or "auto").to(device).eval()
        self.device = self.model.device
        self.dtype = self.model.dtype
        self.tokenizer = AutoTokenizer.from_pretrained(model_path)
        # The model family's prompt layout (UnsupportedModelError for unknown families).
        self.family = prompt_layout(self.model, self.tokenizer, model_spec)
        self.chat_template = _chat_template(model_path, self.tokenizer)
        self.video_token_id = self.model.config.video_token_id
        self.hidden_size = self.model.config.get_text_config().hidden_size
        eos = self.model.generation_config.eos_token_id
        self.eos_token_ids = set(eos if isinstance(eos, list) else [eos]) - {None}
        # transformers renamed the forward's `past_key_values` to `cache` within 5.x.
        forward_parameters = inspect.signature(self.model.forward).parameters
        self._cache_argument = "cache" if "cache" in forward_parameters else "past_key_values"
        self._encoder_fingerprints: dict[torch.dtype, str] = {}
        self._llm_fingerprints: dict[tuple[int, torch.dtype], str] = {}
        # Every prompt's text before the video: the question comes after the video.
        self._text_before_video = tuple(self._prompt_ids("")[0])
        self._multimodal_text_positions = self._text_positions(0, 1).dim() == 3
        # Questions answered together run under block masks (see `_grouped_query_attention`).
        self.model.config.get_text_config()._attn_implementation = GROUPED_QUERY_ATTENTION
        if decoding_steps == "auto":
            decoding_steps = "graphs" if self.device.type == "cuda" and self.family.graph_capturable else "dynamic"
        if decoding_steps != "dynamic" and self.family.recurrent_state:
            raise ValueError(
                f"{model_spec}: its LLM keeps a recurrent state, which the fixed-capacity caches do not hold; "
                f"decoding_steps {decoding_steps!r} is not available for it (use 'auto' or 'dynamic')"
            )
        if decoding_steps == "graphs" and not self.family.graph_capturable:
            raise ValueError(f"{model_spec}: its decoding step cannot be captured as a CUDA graph; use decoding_steps "
                             "'auto', 'dynamic' or 'static'")
        if decoding_steps == "graphs" and self.device.type != "cuda":
            raise ValueError(f"decoding_steps 'graphs' needs a CUDA device, got {self.device}")
        self._static_decoder = None if decoding_steps == "dynamic" else _StaticDecoder(self, use_graphs=decoding_steps == "graphs")

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
        """``prefill_and_answer_all`` for one question."""
        decoding = Decoding(max_new_tokens, do_sample, temperature, seed)
        prefix, (answer,) = self.prefill_and_answer_all(stored, [question], decoding)
        return prefix, answer

    @torch.inference_mode()
    def prefill_and_answer_all(
        self, stored: StoredTokenSet, questions: Sequence[str], decoding: Decoding | Sequence[Decoding] = Decoding()
    ) -> tuple[VideoPrefix, list[Answer]]:
        """``prefill(stored)`` and ``answer_all(prefix, questions, decoding)`` with the
        first question's prompt in the prefill's forward: that one forward gives the first
        question's first answer token, the other questions' prompts run together in a
        second one (none for a single question), decoding goes on as in ``answer_all``,
        and the cache is cropped back to the prefix, so the returned prefix serves further
        questions exactly as ``prefill``'s would.

        Timings: the prefix's ``prefill_s`` is the time of the prefill's forward (prefix
        and first question prompt); every answer's ``ttft_s`` and ``total_s`` count from
        the start of the prefill, which they include.

        Raises what ``prefill`` and ``answer_all`` raise, before running the model.
        """
        decodings = _per_question(decoding, questions)
        question_ids = [self._question_ids(question) for question in questions]
        self.check(stored)
        start = self._now()
        # A recurrent state cannot be taken back to the end of the prefix: its prefill runs
        # the prefix alone, and the questions run on copies of its cache.
        fused = not self.family.recurrent_state
        prefix, logits = self._prefill(stored, question_ids[0] if fused else [], start)
        # No try/finally: when decoding fails, the prefix and its cache are never handed out.
        answers = self._answer_together(prefix, question_ids, decodings, start, first_logits=logits if fused else None)
        self._crop_to_prefix(prefix)
        return prefix, answers

    def _prefill(
        self, stored: StoredTokenSet, question_ids: list[int], start: float
    ) -> tuple[VideoPrefix, torch.Tensor]:
        """Run the LLM on a new cache over the prompt prefix of ``stored`` followed by
        ``question_ids`` (none: the prefix alone), these at the positions ``answer`` gives
        them. Returns the prefix, whose cache still holds the question, with ``prefill_s``
        counted from ``start``, and the last position's logits ``[vocab]``."""
        if stored.merge_layer > 0:
            return self._prefill_from_layer(stored, question_ids, start)
        layout = self.family.prefix(stored, list(self._text_before_video))
        embeds = torch.cat([layout.embeds, self._embed(question_ids)])[None]  # [1, L + Q, C]
        positions = torch.cat([layout.position_ids, self._text_positions(layout.text_position, len(question_ids))], dim=-1)
        cache = DynamicCache(config=self.model.config)
        with self.family.running(layout):
            logits = self._forward(embeds, positions, cache)
        prefix = VideoPrefix(
            video_id=stored.video_id,
            cache=cache,
            length=layout.length,
            position_ids=layout.position_ids,
            text_position=layout.text_position,
            text_before_video=self._text_before_video,
            num_visual_tokens=stored.num_tokens,
            prefill_s=self._now() - start,
        )
        return prefix, logits

    def _prefill_from_layer(
        self, stored: StoredTokenSet, question_ids: list[int], start: float
    ) -> tuple[VideoPrefix, torch.Tensor | None]:
        """``_prefill`` of a token set merged at decoder layer k > 0: layers < k from its
        keys and values, layers k.. over its states (``pipeline.merge_layer``), then the
        question, if any, in a forward of its own (its first-token logits, else None)."""
        cache, merged, groups, text_position = prefill_from_layer(self.model, self.family, stored, list(self._text_before_video))
        prefix = VideoPrefix(
            video_id=stored.video_id,
            cache=cache,
            length=groups.unmerged_length,
            position_ids=merged.position_ids,
            text_position=text_position,
            text_before_video=self._text_before_video,
            num_visual_tokens=stored.num_tokens,
            prefill_s=0.0,
            layer_groups=groups,
        )
        logits = None
        if question_ids:
            with groups.installed(text_model_of(self.model)):
                logits = self._forward(self._embed(question_ids)[None], self._text_positions(text_position, len(question_ids)), cache)
        return dataclasses.replace(prefix, prefill_s=self._now() - start), logits

    def check(self, stored: StoredTokenSet) -> None:
        """Raise IncompatibleTokenSetError unless ``stored`` holds this model's visual
        tokens: same hidden size, same vision encoder (weights, config and preprocessing,
        by the encode stage's fingerprint), ``model_extra`` as the model family needs it
        (e.g. a video grid that matches the token grid), and when merged at decoder layer
        k > 0, the same embedding and layers 0..k-1 and the same text before the video."""
        channels = stored.tokens.features.shape[1]
        if channels != self.hidden_size:
            raise IncompatibleTokenSetError(
                f"video {stored.video_id!r}: stored tokens have {channels} channels, {self.model_spec} "
                f"takes {self.hidden_size} (the store was made for {stored.model_id})"
            )
        if stored.merge_layer != 0:
            check_layer_token_set(stored, self.family, text_model_of(self.model), self._text_before_video,
                                  self._llm_fingerprints, self.model_spec)  # fmt: skip
        fingerprint = self._encoder_fingerprint(stored.tokens.features.dtype)
        if stored.encoder_fingerprint != fingerprint:
            raise IncompatibleTokenSetError(
                f"video {stored.video_id!r}: stored tokens come from another vision encoder "
                f"({stored.model_id}, {stored.encoder_fingerprint}) than {self.model_spec} ({fingerprint})"
            )
        # model_extra comes from the encoder: it means something once the encoder is ours.
        self.family.check(stored)

    def _encoder_fingerprint(self, dtype: torch.dtype) -> str:
        """The encode stage's fingerprint of this model's vision side in ``dtype`` (the
        adapter hashes the weights in the dtype it ran in, which is the stored tokens')."""
        if dtype not in self._encoder_fingerprints:
            adapter = load_adapter(self.model_spec, device="cpu", dtype=dtype)
            self._encoder_fingerprints[dtype] = adapter.fingerprint
        return self._encoder_fingerprints[dtype]

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
        """Answer ``question`` about the video of ``prefix`` from its cached prefix
        (``answer_all`` for one question; see ``Decoding`` for the options)."""
        return self.answer_all(prefix, [question], Decoding(max_new_tokens, do_sample, temperature, seed))[0]

    @torch.inference_mode()
    def answer_all(
        self, prefix: VideoPrefix, questions: Sequence[str], decoding: Decoding | Sequence[Decoding] = Decoding()
    ) -> list[Answer]:
        """Answer all ``questions`` about the video of ``prefix`` together: their prompts
        in one forward on top of the cached prefix, then one forward per new token for all
        the questions still going. ``decoding``: one for all questions or one per question.
        Each question sees the prefix and its own tokens only, so its answer is the one it
        gets alone (STTM_SPEC section 7). Leaves the prefix as it was. Answer times count
        from the start of this call.
        """
        decodings = _per_question(decoding, questions)
        question_ids = [self._question_ids(question) for question in questions]
        start = self._now()
        try:
            return self._answer_together(prefix, question_ids, decodings, start)
        finally:
            self._crop_to_prefix(prefix)

    @torch.inference_mode()
    def next_token_logits(self, prefix: VideoPrefix, question: str) -> torch.Tensor:
        """float32 ``[vocab]`` logits of the first answer token (leaves the prefix as it was)."""
        return self.next_token_logits_all(prefix, [question])[0]

    @torch.inference_mode()
    def next_token_logits_all(self, prefix: VideoPrefix, questions: Sequence[str]) -> torch.Tensor:
        """float32 ``[count, vocab]`` logits of each question's first answer token, the
        questions run together as in ``answer_all`` (leaves the prefix as it was)."""
        _per_question(Decoding(), questions)
        question_ids = [self._question_ids(question) for question in questions]
        if self.family.recurrent_state:
            return _QuestionRows(self, prefix, question_ids).first_logits.float()
        try:
            return self._prompt_logits(prefix, question_ids)[0].float()
        finally:
            self._crop_to_prefix(prefix)

    def _answer_together(
        self,
        prefix: VideoPrefix,
        question_ids: list[list[int]],
        decodings: list[Decoding],
        start: float,
        first_logits: torch.Tensor | None = None,
    ) -> list[Answer]:
        """Decode the answers to the questions of ``question_ids`` (prompt token ids after
        the video) on top of ``prefix.cache``, which grows (the caller crops it back).

        ``first_logits``: the first question's first-token logits ``[vocab]`` when its
        prompt is already in the cache (the prefill's forward ran it); the other prompts
        run here in one forward. Then every step runs one token of each question still
        going, in one forward, and reads the chosen tokens back once (the only host sync
        of a step). The cache after the prefix holds the questions' tokens interleaved;
        ``owner`` says whose each is, and a block mask lets each token see the prefix and
        its own question's earlier tokens only. Alone, a question needs no mask: its
        tokens follow the prefix in order. With static decoding (``QueryEngine``'s
        ``decoding_steps``) the steps run on a fixed-capacity copy of the cache instead
        (``_StaticDecoder``), on CUDA as graph replays; ``prefix.cache`` then keeps the
        prompts only. Models whose cache holds a recurrent state answer the questions as
        rows of a batch instead, each from its own copy of the prefix's cache
        (``_QuestionRows``), which ``prefix.cache`` never sees. ``ttft_s`` and ``total_s``
        count from ``start``.
        """
        count = len(question_ids)
        together = count > 1
        most_steps = max(decoding.max_new_tokens for decoding in decodings) - 1
        if self.family.recurrent_state:
            step = _QuestionRows(self, prefix, question_ids)
            logits = step.first_logits
        elif self._static_decoder is None:
            logits, owner = self._prompt_logits(prefix, question_ids, first_logits)

            def step(tokens: torch.Tensor, positions: list[int], questions: list[int]) -> torch.Tensor:
                nonlocal owner
                embeds = self.model.get_input_embeddings()(tokens)
                at = torch.arange(len(questions), device=self.device)
                logits, owner = self._forward_together(prefix, owner, embeds, positions, questions, together, logits_at=at)
                return logits

        else:
            first = [] if first_logits is None else [first_logits[None]]
            prompts = range(len(first), count)
            prompt_tokens = [token for q in prompts for token in question_ids[q]]
            step = self._static_decoder.start(prefix, len(prompt_tokens), count, most_steps)
            step.begin(prefix.length, [0] * (len(question_ids[0]) if first else 0))
            if prompts:
                last_tokens = torch.tensor([len(question_ids[q]) for q in prompts], device=self.device).cumsum(0) - 1
                prompt_logits = step(
                    torch.tensor(prompt_tokens, device=self.device),
                    [prefix.text_position + i for q in prompts for i in range(len(question_ids[q]))],
                    [q for q in prompts for _ in question_ids[q]],
                )
                first.append(prompt_logits[last_tokens])
            logits = torch.cat(first)

        generators = [
            torch.Generator(self.device).manual_seed(d.seed) if d.do_sample and d.seed is not None else None for d in decodings
        ]
        generated: list[list[int]] = [[] for _ in range(count)]
        logprobs: list[list[float]] = [[] for _ in range(count)]
        ttft_s: list[float | None] = [None] * count
        total_s: list[float | None] = [None] * count
        going = list(range(count))  # the questions whose rows `logits` holds
        while True:
            logits = logits.float()
            tokens = logits.argmax(dim=-1)
            for row, q in enumerate(going):
                if decodings[q].do_sample:
                    probabilities = torch.softmax(logits[row] / decodings[q].temperature, dim=-1)
                    tokens[row] = torch.multinomial(probabilities, 1, generator=generators[q])[0]
            token_logprobs = torch.log_softmax(logits, dim=-1).gather(1, tokens[:, None])[:, 0]
            # token ids are exact in float64: one read-back for both
            chosen, chosen_logprobs = torch.stack([tokens.double(), token_logprobs.double()]).tolist()
            now = self._now() - start
            still_going = []
            for row, q in enumerate(going):
                token = int(chosen[row])
                if ttft_s[q] is None:
                    ttft_s[q] = now
                if token in self.eos_token_ids:
                    total_s[q] = now
                    continue
                generated[q].append(token)
                logprobs[q].append(chosen_logprobs[row])
                if len(generated[q]) == decodings[q].max_new_tokens:
                    total_s[q] = now
                    continue
                still_going.append(row)
            going = [going[row] for row in still_going]
            if not going:
                break
            rows = torch.tensor(still_going, device=self.device)
            positions = [prefix.text_position + len(question_ids[q]) + len(generated[q]) - 1 for q in going]
            logits = step(tokens[rows], positions, going)
        return [
            Answer(
                self.tokenizer.decode(generated[q], skip_special_tokens=True).strip(),
                generated[q],
                logprobs[q],
                len(question_ids[q]),
                ttft_s[q],
                total_s[q],
            )
            for q in range(count)
        ]

    def _prompt_logits(
        self, prefix: VideoPrefix, question_ids: list[list[int]], first_logits: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Run the prompts of ``question_ids`` on top of ``prefix.cache`` in one forward
        (the first one's is already there when ``first_logits`` is given); returns the
        first answer token's logits ``[count, vocab]`` and ``owner``, the question of each
        cache slot after the prefix."""
        together = len(question_ids) > 1
        logits = [] if first_logits is None else [first_logits[None]]
        owner = torch.zeros(len(question_ids[0]) if logits else 0, dtype=torch.long, device=self.device)
        prompts = range(len(logits), len(question_ids))
        if prompts:
            tokens = [token for q in prompts for token in question_ids[q]]
            last_tokens = torch.tensor([len(question_ids[q]) for q in prompts], device=self.device).cumsum(0) - 1
            prompt_logits, owner = self._forward_together(
                prefix,
                owner,
                self._embed(tokens),
                [prefix.text_position + i for q in prompts for i in range(len(question_ids[q]))],
                [q for q in prompts for _ in question_ids[q]],
                together,
                logits_at=last_tokens,
            )
            logits.append(prompt_logits)
        return torch.cat(logits), owner

    def _forward_together(
        self,
        prefix: VideoPrefix,
        owner: torch.Tensor,
        embeds: torch.Tensor,
        positions: list[int],
        rows: list[int],
        together: bool,
        logits_at: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Run ``embeds [n, C]``, tokens of the questions ``rows`` at ``positions``, on
        top of ``prefix.cache`` (after the prefix: slots of the questions ``owner``),
        under the block mask when questions are answered ``together``. Returns the logits
        at ``logits_at`` (``[k, vocab]``) and the owners with the new slots."""
        row_owner = torch.tensor(rows, device=self.device)
        owner = torch.cat([owner, row_owner])
        mask = self._block_mask(prefix.length, owner, row_owner) if together else None
        positions = self._positions(positions)
        groups = contextlib.nullcontext() if prefix.layer_groups is None else prefix.layer_groups.installed(text_model_of(self.model))
        with groups:
            return self._forward(embeds[None], positions, prefix.cache, attention_mask=mask, logits_at=logits_at), owner

    @staticmethod
    def _block_mask(prefix_length: int, owner: torch.Tensor, row_owner: torch.Tensor) -> torch.Tensor:
        """``[1, 1, n, prefix_length + S]`` boolean attention mask (true: attend) of the
        ``n`` newest cache slots, whose questions are ``row_owner [n]``: each sees the
        prefix and the slots of its own question (``owner [S]``, the question of each slot
        after the prefix, the ``n`` new ones last) up to itself."""
        n, slots = row_owner.numel(), owner.numel()
        slot = torch.arange(slots, device=owner.device)
        own = (owner[None, :] == row_owner[:, None]) & (slot[None, :] <= slot[slots - n :, None])
        prefix = torch.ones(n, prefix_length, dtype=torch.bool, device=owner.device)
        return torch.cat([prefix, own], dim=1)[None, None]

    def _positions(self, positions: list[int]) -> torch.Tensor:
        """Positions of text tokens, any order: ``[1, n]`` or, for multimodal rotary, the
        same on all three axes ``[3, 1, n]`` (as ``_text_positions``)."""
        tensor = torch.tensor(positions, device=self.device)[None]
        return tensor[None].expand(3, 1, -1) if self._multimodal_text_positions else tensor

    def _crop_to_prefix(self, prefix: VideoPrefix) -> None:
        """Drop what a question added to the prefix's cache, so the next question starts
        from the prefix alone. Layer by layer: a forward that failed part-way extended
        only the layers it reached. (A negative crop removes that many tokens in every
        transformers release we support; a positive one means "keep that many" in some
        and is refused in others.) A cache with a recurrent state is never extended:
        questions run on copies of it."""
        if self.family.recurrent_state:
            return
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
        return self.family.text_positions(start, count)

    def _embed(self, token_ids: Sequence[int]) -> torch.Tensor:
        """``[len, C]`` input embeddings of text tokens (``[0, C]`` for none: the explicit
        dtype keeps an empty list from becoming a float tensor)."""
        return self.family.embed(token_ids)

    def _forward(
        self,
        embeds: torch.Tensor,
        position_ids: torch.Tensor,
        cache: DynamicCache,
        *,
        attention_mask: torch.Tensor | None = None,
        logits_at: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Run ``embeds [1, n, C]`` at ``position_ids`` on top of ``cache`` (which grows by
        ``n``), causally or under ``attention_mask`` (``[1, 1, n, cached + n]``, true:
        attend); returns the last position's logits ``[vocab]``, or with ``logits_at``
        (``[k]`` indices among the ``n``) those positions' ``[k, vocab]``."""
        output = self.model(
            inputs_embeds=embeds,
            position_ids=position_ids,
            attention_mask=attention_mask,
            use_cache=True,
            logits_to_keep=1 if logits_at is None else logits_at,
            **{self._cache_argument: cache},
        )
        return output.logits[0, -1] if logits_at is None else output.logits[0]

    def _now(self) -> float:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        return time.perf_counter()


class _QuestionRows:
    """The questions of one ``answer_all`` as the rows of a batch, for models whose cache
    holds a recurrent state (``PromptLayout.recurrent_state``: linear-attention or
    state-space layers keep a convolution window and a recurrent state per sequence, not
    keys and values).

    Each question's prompt runs alone on its own copy of the prefix's cache
    (``_copy_of_cache``: attention layers' keys and values shared, recurrent states
    cloned), so every question starts from the state the prefix left. Prompts of
    different lengths are not batched: padding tokens run through a recurrent layer
    change its state (transformers zeroes their inputs, but the state still decays and
    the convolution window still shifts). The copies are then stacked into one cache of
    ``rows`` sequences (``_stack_rows``: attention layers' keys right-padded to the
    longest prompt), and each decoding step runs one token per row under a 2-D padding
    mask, at each row's own positions; the rows of questions that ended are dropped.

    Called as a decoding step: ``(tokens [k], positions, questions) -> [k, vocab]``.
    """

    def __init__(self, engine: "QueryEngine", prefix: VideoPrefix, question_ids: list[list[int]]):
        self.engine = engine
        caches, logits = [], []
        for ids in question_ids:
            cache = _copy_of_cache(prefix.cache)
            positions = engine._text_positions(prefix.text_position, len(ids))
            logits.append(engine._forward(engine._embed(ids)[None], positions, cache))
            caches.append(cache)
        self.first_logits = torch.stack(logits)  # [rows, vocab]
        lengths = torch.tensor([prefix.length + len(ids) for ids in question_ids], device=engine.device)
        self.cache = _stack_rows(caches, int(lengths.max()))
        # [rows, S]: the cache slots each row attends to (not the padding after its prompt)
        self.attended = torch.arange(int(lengths.max()), device=engine.device)[None] < lengths[:, None]
        self.questions = list(range(len(question_ids)))  # the question of each row

    def __call__(self, tokens: torch.Tensor, positions: list[int], questions: list[int]) -> torch.Tensor:
        engine = self.engine
        if questions != self.questions:  # drop the rows of questions that ended
            rows = torch.tensor([self.questions.index(q) for q in questions], device=engine.device)
            for layer in self.cache.layers:
                layer.reorder_cache(rows)
            self.attended, self.questions = self.attended[rows], list(questions)
        self.attended = torch.cat([self.attended, self.attended.new_ones(len(questions), 1)], dim=1)
        embeds = engine.model.get_input_embeddings()(tokens)[:, None]  # [k, 1, C]
        output = engine.model(
            inputs_embeds=embeds,
            position_ids=engine._positions(positions).transpose(-1, -2),  # [k, 1] or [3, k, 1]
            attention_mask=self.attended,
            use_cache=True,
            logits_to_keep=1,
            **{engine._cache_argument: self.cache},
        )
        return output.logits[:, -1]


def _copy_of_cache(cache: DynamicCache) -> DynamicCache:
    """A cache that a forward can extend without changing ``cache``: attention layers'
    keys and values are shared (a forward concatenates new ones, never writes into them),
    linear-attention layers' convolution and recurrent states (updated in place) are
    cloned."""
    from transformers.cache_utils import LinearAttentionCacheLayerMixin

    copied = copy.copy(cache)
    copied.layers = []
    for layer in cache.layers:
        layer_copy = copy.copy(layer)
        if isinstance(layer, LinearAttentionCacheLayerMixin):
            for name, states in vars(layer).items():
                if isinstance(states, dict):  # conv_states, recurrent_states and their flags, by state index
                    setattr(layer_copy, name, {i: s.clone() if isinstance(s, torch.Tensor) else s for i, s in states.items()})
        copied.layers.append(layer_copy)
    return copied


def _stack_rows(caches: list[DynamicCache], length: int) -> DynamicCache:
    """One cache of ``len(caches)`` rows from batch-1 caches of one model: recurrent
    states concatenated, attention layers' keys and values right-padded with zeros to
    ``length`` slots (the caller masks the padding out). Reuses ``caches[0]``."""
    from transformers.cache_utils import LinearAttentionCacheLayerMixin

    stacked = caches[0]
    for index, layer in enumerate(stacked.layers):
        rows = [cache.layers[index] for cache in caches]
        if isinstance(layer, LinearAttentionCacheLayerMixin):
            for kind in ("conv_states", "recurrent_states"):
                for i, state in getattr(layer, kind).items():
                    if state is not None:
                        getattr(layer, kind)[i] = torch.cat([getattr(row, kind)[i] for row in rows])
        if getattr(layer, "keys", None) is not None and layer.get_seq_length() > 0:
            for kind in ("keys", "values"):
                padded = [F.pad(getattr(row, kind), (0, 0, 0, length - getattr(row, kind).shape[2])) for row in rows]
                setattr(layer, kind, torch.cat(padded))
    return stacked


class _SlotCache(DynamicCache):
    """A fixed-capacity key/value cache for decoding steps: per layer ``[1, H_kv, S, D]``
    buffers; each forward writes its new keys and values at the slots ``slots`` (``[n]``,
    set before the forward) and attends over all ``S`` slots under the step's mask.
    Fixed shapes and addresses are what a CUDA graph needs. (A ``DynamicCache`` subclass
    so that the models take it as a cache; none of its own storage is used.)"""

    def __init__(self, keys: list[torch.Tensor], values: list[torch.Tensor], slots: torch.Tensor):
        super().__init__()
        self.buffer_keys, self.buffer_values, self.slots = keys, values, slots

    def update(self, key_states, value_states, layer_idx, *args, **kwargs):
        self.buffer_keys[layer_idx].index_copy_(2, self.slots, key_states)
        self.buffer_values[layer_idx].index_copy_(2, self.slots, value_states)
        return self.buffer_keys[layer_idx], self.buffer_values[layer_idx]

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.buffer_keys[layer_idx].shape[2]


class _StaticDecoder:
    """Decoding steps on fixed-capacity caches, on CUDA replayed from CUDA graphs.

    Capacities come in buckets of ``CAPACITY_STEP`` slots and row counts in powers of
    two, so videos of similar length share buffers and graphs: one graph per (capacity,
    rows) bucket, captured on its first use. A step's unused rows write to the last slot,
    which no mask shows, and see the prefix only. Keeps the buffers of the
    ``KEEP_CAPACITIES`` most recently used capacities.
    """

    CAPACITY_STEP = 4096
    KEEP_CAPACITIES = 2

    def __init__(self, engine: "QueryEngine", use_graphs: bool):
        self.engine = engine
        self.use_graphs = use_graphs
        self.buffers: dict[int, tuple[list[torch.Tensor], list[torch.Tensor]]] = {}
        self.steps: dict[tuple[int, int], Callable[[], torch.Tensor]] = {}
        self.pool = torch.cuda.graph_pool_handle() if use_graphs else None

    def start(self, prefix: VideoPrefix, prompt_tokens: int, questions: int, most_steps: int) -> "_StaticRun":
        """Copy ``prefix.cache`` (the prefix and maybe a first prompt) into a cache with
        room for ``prompt_tokens`` more, ``most_steps`` steps of ``questions`` tokens and
        a spare slot."""
        cached = prefix.cache.layers[0].get_seq_length()
        step = self.CAPACITY_STEP
        capacity = -(-(cached + prompt_tokens + _bucket(questions) * most_steps + 1) // step) * step
        keys, values = self._buffers(prefix.cache, capacity)
        for layer, key, value in zip(prefix.cache.layers, keys, values):
            key[:, :, :cached].copy_(layer.keys)
            value[:, :, :cached].copy_(layer.values)
        return _StaticRun(self, capacity, cached, prefix.layer_groups)

    def _buffers(self, cache: DynamicCache, capacity: int):
        if capacity not in self.buffers:
            while len(self.buffers) >= self.KEEP_CAPACITIES:
                dropped = next(iter(self.buffers))
                del self.buffers[dropped]
                self.steps = {key: step for key, step in self.steps.items() if key[0] != dropped}
            self.buffers[capacity] = tuple(
                [torch.zeros(*getattr(layer, kind).shape[:2], capacity, getattr(layer, kind).shape[3], dtype=getattr(layer, kind).dtype, device=self.engine.device) for layer in cache.layers]
                for kind in ("keys", "values")
            )
        self.buffers[capacity] = self.buffers.pop(capacity)  # most recently used last
        return self.buffers[capacity]

    def step(
        self, capacity: int, rows: int, groups: LayerGroups | None = None
    ) -> tuple[dict[str, torch.Tensor], Callable[[], torch.Tensor]]:
        """The static inputs (``tokens [rows]``, ``positions``, ``mask [1, 1, rows,
        capacity]``, ``slots [rows]``; for a prefix merged at layer k > 0, ``groups``, also
        ``unused [capacity]`` and ``text_offset``, read by its layer hooks) of the step of
        this bucket and the function that runs it (a graph replay on CUDA), returning
        ``[rows, vocab]`` logits."""
        merge_layer = 0 if groups is None else groups.merge_layer
        key = (capacity, rows, merge_layer)
        if key not in self.steps:
            engine = self.engine
            device = engine.device
            inputs = dict(
                tokens=torch.zeros(rows, dtype=torch.long, device=device),
                positions=engine._positions([0] * rows).clone(),
                mask=torch.zeros(1, 1, rows, capacity, dtype=torch.bool, device=device),
                slots=torch.full((rows,), capacity - 1, dtype=torch.long, device=device),
                unused=torch.zeros(capacity, dtype=torch.bool, device=device),
                text_offset=torch.zeros((), dtype=torch.long, device=device),
            )
            inputs["mask"][..., 0] = True
            cache = _SlotCache(*self.buffers[capacity], inputs["slots"])

            def run() -> torch.Tensor:
                embeds = engine.model.get_input_embeddings()(inputs["tokens"])[None]
                with contextlib.nullcontext() if groups is None else groups.installed(
                    text_model_of(engine.model), inputs["unused"], inputs["text_offset"]
                ):
                    output = engine.model(
                        inputs_embeds=embeds, position_ids=inputs["positions"], attention_mask=inputs["mask"],
                        use_cache=True, logits_to_keep=rows, **{engine._cache_argument: cache},
                    )  # fmt: skip
                return output.logits[0]

            if self.use_graphs:
                if not self.steps:  # a pool whose graphs were all dropped cannot be captured into again
                    self.pool = torch.cuda.graph_pool_handle()
                side = torch.cuda.Stream(device)
                side.wait_stream(torch.cuda.current_stream(device))
                with torch.cuda.stream(side):
                    for _ in range(2):  # warm-up: lazy initializations stay out of the graph
                        run()
                torch.cuda.current_stream(device).wait_stream(side)
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph, pool=self.pool):
                    logits = run()

                def replay(graph=graph, logits=logits) -> torch.Tensor:
                    graph.replay()
                    return logits

                self.steps[key] = (inputs, replay)
            else:
                self.steps[key] = (inputs, run)
        return self.steps[key]


def _bucket(rows: int) -> int:
    """Rows of the step that runs ``rows`` tokens: the next power of two."""
    return 1 << (rows - 1).bit_length()


class _StaticRun:
    """The forwards of one ``answer_all`` on a ``_StaticDecoder``'s buffers; slot ``j``
    holds a token of question ``owner[j]`` (-1: the prefix; -2: nothing yet)."""

    def __init__(self, decoder: _StaticDecoder, capacity: int, cached: int, groups: LayerGroups | None = None):
        self.decoder, self.capacity, self.next_slot, self.groups = decoder, capacity, cached, groups
        self.device = decoder.engine.device

    def begin(self, prefix_length: int, owner: list[int]) -> None:
        """``owner``: the question of each slot after the prefix so far."""
        self.owner = torch.full((self.capacity,), -2, dtype=torch.long, device=self.device)
        self.owner[:prefix_length] = -1
        self.owner[prefix_length : self.next_slot] = torch.tensor(owner, dtype=torch.long, device=self.device)

    def __call__(self, tokens: torch.Tensor, positions: list[int], questions: list[int]) -> torch.Tensor:
        """Run ``tokens [k]`` of ``questions`` at ``positions`` in the next ``k`` slots,
        each seeing the prefix and its question's slots up to its own; returns their
        ``[k, vocab]`` logits."""
        count = len(questions)
        rows = _bucket(count)
        inputs, run = self.decoder.step(self.capacity, rows, self.groups)
        if self.groups is not None:  # this video's layer groups, read by the step's layer hooks
            inputs["unused"].copy_(self.groups.unused_slots(self.capacity, self.device))
            inputs["text_offset"].fill_(self.groups.text_offset)
        padding = rows - count
        slots = torch.arange(self.next_slot, self.next_slot + count, device=self.device)
        self.next_slot += count
        row_owner = torch.tensor(questions + [-3] * padding, device=self.device)
        self.owner[slots] = row_owner[:count]
        row_slots = torch.cat([slots, torch.full((padding,), self.capacity - 1, device=self.device)])
        slot = torch.arange(self.capacity, device=self.device)
        own = (self.owner[None, :] == row_owner[:, None]) & (slot[None, :] <= row_slots[:, None])
        inputs["tokens"][:count] = tokens
        inputs["positions"].copy_(self.decoder.engine._positions(positions + [0] * padding))
        inputs["mask"].copy_((own | (self.owner == -1)[None, :])[None, None])
        inputs["slots"].copy_(row_slots)
        return run()[:count]

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
    and are the same for all its questions, which are answered together
    (``QueryEngine.prefill_and_answer_all``): every answer's ``ttft_s`` and ``total_s``
    count from the start of the prefill and include ``prefill_s`` (not ``load_s``).
    ``prefix_reused`` is false for the video's first question, whose prompt rode in the
    prefill's forward, and true for the others, answered on the prefix it left."""

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
    input order within a video) and each video's questions are answered together
    (``QueryEngine.prefill_and_answer_all``: the first question's prompt in the prefill's
    forward, the others' in one more, then one forward per new token for all); every
    question decodes with the same options, so with a ``seed`` each answer is the one
    ``QueryEngine.answer`` gives with that seed. A video whose token set cannot be read or
    does not fit the model gives each of its questions an ``error`` result; the others go
    on.
    """
    decoding = Decoding(max_new_tokens, do_sample, temperature, seed)
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
        prefix, answers = engine.prefill_and_answer_all(stored, [question.text for question in video_questions], decoding)
        video = dict(num_visual_tokens=prefix.num_visual_tokens, load_s=load_s, prefill_s=prefix.prefill_s)
        for index, (question, answer) in enumerate(zip(video_questions, answers)):
            yield QuestionResult(question, answer, **video, prefix_reused=index > 0)


def prefix_reuse_timings(results: Iterable[QuestionResult]) -> dict[str, float | int]:
    """What prefix reuse bought over answered ``results``: ``num_videos``, total
    ``prefill_s`` (once per video), total ``answer_s`` beyond the prefills (per video, the
    last of its answers' ``total_s``, which count from the start of its prefill, minus
    ``prefill_s``: its questions are answered together), and ``saved_s``, the prefills a
    fresh prefill per question would have added (each video's ``prefill_s`` times its
    answered questions minus one)."""
    prefill_s: dict[str, float] = {}
    answered: dict[str, int] = {}
    done_s: dict[str, float] = {}
    for result in results:
        if result.answer is None:
            continue
        video_id = result.question.video_id
        prefill_s[video_id] = result.prefill_s
        answered[video_id] = answered.get(video_id, 0) + 1
        done_s[video_id] = max(done_s.get(video_id, 0.0), result.answer.total_s)
    saved_s = sum(prefill_s[video_id] * (count - 1) for video_id, count in answered.items())
    return {
        "num_videos": len(prefill_s),
        "prefill_s": round(sum(prefill_s.values()), 6),
        "answer_s": round(sum(done_s[video_id] - prefill_s[video_id] for video_id in done_s), 6),
        "saved_s": round(saved_s, 6),
    }


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
