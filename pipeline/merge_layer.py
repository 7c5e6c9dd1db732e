"""Merging inside the LLM, at decoder layer k > 0 (STTM_SPEC section 6).

At ``merge_layer`` k the prefix (text before the video, every unmerged video token, and
for LLaVA-OneVision the ``image_newline`` after them) runs through decoder layers 0..k-1
unmerged; STTM merges the video tokens' hidden states entering layer k, and layers k..
run over the merged prefix. Nothing of it depends on the question (it comes after the
video, attention is causal), so the encode stage computes it once per video and stores it:

- encode side, ``LayerPrefix``: loads the LLM's input embedding and its first k decoder
  layers only (``from_pretrained`` of a model class that has just those modules, so only
  their tensors are read from the checkpoint's safetensors), runs the unmerged prefix
  through them, merges, and returns what the token set holds: the merged video states,
  the states of the other prefix rows, and the keys and values of layers 0..k-1 over the
  unmerged prefix (``LayerStates``);
- query side, ``prefill_from_layer``: fills layers 0..k-1 of the cache with the stored
  keys and values and runs layers k.. over the stored states. Every layer's cache then
  holds ``L`` prefix slots (the unmerged prefix length): in layers >= k the first ``L_m``
  are the merged prefix and the rest are never attended to (``LayerGroups`` masks them),
  so the cache has one length in all layers and the query stage's cropping, block masks
  and positions of question tokens work unchanged.

Positions: layers < k see every token at its unmerged position; layers >= k see the
merged prefix at the positions of section 5, and question tokens at their unmerged
position minus ``text_offset`` (1-D rotary: the number of tokens merging removed; 0 for
multimodal rotary, whose text keeps its unmerged positions). ``LayerGroups.installed``
puts both differences into the model's own forward with pre-hooks on layers k.., so
questions run through ``model(...)`` as at k = 0.
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import inspect
import json
from dataclasses import dataclass
from types import SimpleNamespace

import torch
from safetensors import safe_open
from torch import nn
from transformers import MODEL_MAPPING, AutoConfig, AutoModel, AutoTokenizer, DynamicCache, ProcessorMixin
from transformers.utils import cached_file

from pipeline.fingerprint import canonical_json
from pipeline.models.base import EncodedVideo, IncompatibleTokenSetError, PrefixLayout, UnsupportedModelError
from sttm.token_set import TokenSet


@dataclass(frozen=True, eq=False)
class LayerStates:
    """What a token set merged at layer k > 0 holds besides the k = 0 fields (shapes for a
    prefix of ``P`` text rows, ``T*H*W`` video rows and ``A`` rows after them).

    Attributes:
        tokens: the merged video hidden states entering layer k, ``features [N, C]``.
        prefix_states: ``[P + A, C]`` hidden states entering layer k of the other rows.
        layer_kv: ``[k, 2, H_kv, P + T*H*W + A, D]`` keys (rotated) and values of layers
            0..k-1 over the unmerged prefix.
        text_before_video: the ``P`` token ids of the text before the video.
    """

    tokens: TokenSet
    prefix_states: torch.Tensor
    layer_kv: torch.Tensor
    text_before_video: list[int]


def check_merge_layer(merge_layer: int, num_layers: int, layout_class, model_spec: str) -> None:
    """Raise UnsupportedModelError unless ``model_spec``'s family merges at ``merge_layer``
    (``PromptLayout.supports_merge_layer``) and ``1 <= merge_layer < num_layers`` (at
    ``num_layers`` no layer would see the merged tokens)."""
    if not layout_class.supports_merge_layer:
        raise UnsupportedModelError(f"{model_spec}: merge_layer {merge_layer} > 0 is not supported for this model "
                                    f"family ({layout_class.merge_layer_refusal})")
    if not 1 <= merge_layer < num_layers:
        raise UnsupportedModelError(f"{model_spec}: merge_layer must be in [1, {num_layers - 1}] for an LLM of "
                                    f"{num_layers} decoder layers, got {merge_layer}")


def llm_fingerprint(text_model: nn.Module, merge_layer: int, dtype: torch.dtype) -> str:
    """``"sha256:<hex>"`` over ``merge_layer`` and every tensor of the LLM's input embedding
    and decoder layers ``0..merge_layer-1`` in ``dtype`` (as ``weights_fingerprint``: sorted
    (dtype, shape, SHA-256), without names), which a layer-k token set depends on."""
    modules = [text_model.embed_tokens, *text_model.layers[:merge_layer]]
    tensors = []
    for module in modules:
        for tensor in module.state_dict().values():
            tensor = tensor.detach().to("cpu", dtype if tensor.is_floating_point() else tensor.dtype).contiguous()
            data = hashlib.sha256(tensor.reshape(-1).view(torch.uint8).numpy()).hexdigest()
            tensors.append([str(tensor.dtype), list(tensor.shape), data])
    fingerprinted = {"merge_layer": merge_layer, "tensors": sorted(tensors)}
    return f"sha256:{hashlib.sha256(canonical_json(fingerprinted).encode()).hexdigest()}"


def text_before_video(model_path: str, tokenizer, video_token_id: int) -> list[int]:
    """Token ids of the chat template's user turn before its video placeholder (what the
    query stage puts before every video)."""
    processor_dict, _ = ProcessorMixin.get_processor_dict(model_path)
    template = processor_dict.get("chat_template") or tokenizer.chat_template
    if isinstance(template, dict):
        template = template.get("default")
    conversation = [{"role": "user", "content": [{"type": "video"}, {"type": "text", "text": ""}]}]
    text = tokenizer.apply_chat_template(conversation, chat_template=template, add_generation_prompt=True, tokenize=False)
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    if ids.count(video_token_id) != 1:
        raise ValueError(f"{model_path}: the chat template should hold one video placeholder, got {ids.count(video_token_id)}")
    return ids[: ids.index(video_token_id)]


def unmerged_token_set(tokens: torch.Tensor) -> TokenSet:
    """Every patch of ``tokens [T, H, W, C]`` its own token, in raster order: the prompt
    layouts place it exactly where the model puts the unmerged video."""
    t, h, w, c = tokens.shape
    grid = torch.stack(torch.meshgrid(torch.arange(t), torch.arange(h), torch.arange(w), indexing="ij"), -1).view(-1, 3)
    box = torch.stack([grid[:, 1], grid[:, 2], grid[:, 1] + 1, grid[:, 2] + 1], dim=1)
    count = t * h * w
    return TokenSet(
        features=tokens.reshape(count, c), frame=grid[:, 0].int(), box=box.int(),
        num_patches=torch.ones(count, dtype=torch.int32), assignment=torch.arange(count, dtype=torch.int32).view(t, h, w),
        grid=(t, h, w), tau_s=2.0, tau_t=None, root_level=0, weighted=False, head_dim=None,
    )  # fmt: skip


def cache_argument(module: nn.Module) -> str:
    """The name of the cache argument of ``module.forward`` (transformers renamed
    ``past_key_values`` to ``cache`` within 5.x)."""
    return "cache" if "cache" in inspect.signature(module.forward).parameters else "past_key_values"


def run_layers(layers, rotary: nn.Module, states: torch.Tensor, position_ids: torch.Tensor, cache: DynamicCache) -> torch.Tensor:
    """Run ``states [1, L, C]`` at ``position_ids`` causally through decoder ``layers``, on
    top of nothing in those layers of ``cache`` (which keeps their keys and values);
    returns the hidden states after the last one."""
    position_embeddings = rotary(states, position_ids)
    for layer in layers:
        states = layer(states, attention_mask=None, position_embeddings=position_embeddings, use_cache=True,
                       **{cache_argument(layer): cache})  # fmt: skip
        if isinstance(states, tuple):  # transformers releases whose layers return a tuple
            states = states[0]
    return states


# --- encode side ---------------------------------------------------------------------------


# How checkpoints name the LLM's tensors: hub layouts of older transformers
# (``language_model.model.layers...`` for LLaVA, ``model.layers...`` for Qwen VL) and the
# current one (``model.language_model.layers...``); the vision side's tensors never start
# like this.
_LLM_KEY_PREFIXES = ("model.language_model.", "language_model.model.", "model.", "language_model.", "")


class LanguagePrefixStage(nn.Module):
    """The LLM's input embedding and first k decoder layers, shaped like the full model
    where a ``PromptLayout`` reads it: ``model.language_model`` (the decoder stack cut to k
    layers, without its final norm), the family's ``prefix_parameters`` (``model.<name>``,
    e.g. LLaVA-OneVision's ``image_newline``), ``model.get_rope_index`` for the Qwen
    families, ``config``, ``device``, ``dtype`` and ``get_input_embeddings``."""

    def __init__(self, config, merge_layer: int, layout_class):
        super().__init__()
        inner_class = MODEL_MAPPING[type(config)]
        self.config = config
        self.model = nn.Module()
        self.model.config = config
        self.model.language_model = AutoModel.from_config(config.text_config)
        self.model.language_model.norm = nn.Identity()  # the final norm comes after the last layer, not after k
        for name in layout_class.prefix_parameters:
            setattr(self.model, name, nn.Parameter(torch.empty(config.text_config.hidden_size)))
        for name in ("get_rope_index", "get_vision_position_ids"):  # a method of the Qwen models over their config
            if hasattr(inner_class, name):
                setattr(self.model, name, getattr(inner_class, name).__get__(self.model))

    @property
    def device(self) -> torch.device:
        return self.model.language_model.embed_tokens.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.model.language_model.embed_tokens.weight.dtype

    def get_input_embeddings(self) -> nn.Module:
        return self.model.language_model.embed_tokens


def _load_prefix_stage(model_path: str, config, merge_layer: int, layout_class, device, dtype) -> LanguagePrefixStage:
    """``LanguagePrefixStage`` built on the meta device and filled with just its tensors,
    read one by one from the checkpoint's safetensors files (found by name, see
    ``_LLM_KEY_PREFIXES``), in ``dtype`` (``None``: the checkpoint's)."""
    with torch.device("meta"):
        stage = LanguagePrefixStage(config, merge_layer, layout_class)
    weight_map = _safetensors_weight_map(model_path)
    state = {}
    for name in stage.state_dict():
        inner = name.removeprefix("model.")
        suffix = inner.removeprefix("language_model.")
        candidates = [prefix + suffix for prefix in _LLM_KEY_PREFIXES] if inner != suffix else [inner, f"model.{inner}"]
        key = next((candidate for candidate in candidates if candidate in weight_map), None)
        if key is None:
            raise UnsupportedModelError(f"{model_path}: the checkpoint holds no tensor for {name} (looked for {candidates})")
        with safe_open(weight_map[key], framework="pt") as file:
            tensor = file.get_tensor(key)
        state[name] = tensor.to(device, dtype or tensor.dtype)
    stage.load_state_dict(state, assign=True, strict=True)
    text_model = stage.model.language_model
    text_model.rotary_emb = type(text_model.rotary_emb)(config=config.get_text_config()).to(device)  # buffers, not weights
    return stage.eval()


def _safetensors_weight_map(model_path: str) -> dict[str, str]:
    """Tensor name -> local safetensors file of a checkpoint (sharded or not)."""
    index = cached_file(model_path, "model.safetensors.index.json", _raise_exceptions_for_missing_entries=False)
    if index is None:
        single = cached_file(model_path, "model.safetensors")
        with safe_open(single, framework="pt") as file:
            return {key: single for key in file.keys()}
    with open(index) as file:
        shards = json.load(file)["weight_map"]
    return {key: cached_file(model_path, shard) for key, shard in shards.items()}


class LayerPrefix:
    """The encode side of merge layer k > 0, loaded once per worker: the LLM's input
    embedding and first k decoder layers (``stage``), the family's prompt layout over them,
    and the chat template's text before the video.

    Attributes:
        merge_layer: k.
        fingerprint: ``llm_fingerprint`` of the loaded layers (stored with every token set).
        text_before_video: token ids of the text before the video.
    """

    def __init__(self, model_spec: str, model_path: str, merge_layer: int, device: str | torch.device = "cpu",
                 dtype: torch.dtype | None = None):
        from pipeline.models.registry import family_of

        config = AutoConfig.from_pretrained(model_path)
        family = family_of(config.model_type, model_spec)
        text_config = config.get_text_config()
        check_merge_layer(merge_layer, text_config.num_hidden_layers, family.LAYOUT, model_spec)
        config = copy.deepcopy(config)
        config.text_config.num_hidden_layers = merge_layer
        if getattr(config.text_config, "layer_types", None) is not None:
            config.text_config.layer_types = config.text_config.layer_types[:merge_layer]
        self.stage = _load_prefix_stage(model_path, config, merge_layer, family.LAYOUT, device, dtype)
        tokenizer = AutoTokenizer.from_pretrained(model_path)
        self.layout = family.LAYOUT(self.stage, tokenizer)
        self.merge_layer = merge_layer
        self.text_before_video = text_before_video(model_path, tokenizer, config.video_token_id)
        self.fingerprint = llm_fingerprint(self.stage.model.language_model, merge_layer, self.stage.dtype)

    @torch.no_grad()
    def __call__(self, encoded: EncodedVideo, merge) -> LayerStates:
        """Run the unmerged prefix of ``encoded`` through layers 0..k-1 and merge the video
        tokens' hidden states entering layer k with ``merge`` (``[T, H, W, C] -> TokenSet``)."""
        tokens = encoded.tokens.to(self.stage.device, self.stage.dtype)
        t, h, w, _ = tokens.shape
        unmerged = SimpleNamespace(tokens=unmerged_token_set(tokens), model_extra=encoded.model_extra, video_id="")
        layout = self.layout.prefix(unmerged, self.text_before_video)
        text_model = self.stage.model.language_model
        cache = DynamicCache(config=self.stage.config.text_config)
        states = run_layers(text_model.layers, text_model.rotary_emb, layout.embeds[None], layout.position_ids, cache)[0]
        before, video = len(self.text_before_video), t * h * w
        merged = merge(states[before : before + video].reshape(t, h, w, -1))
        layer_kv = torch.stack([torch.stack([layer.keys[0], layer.values[0]]) for layer in cache.layers[: self.merge_layer]])
        return LayerStates(
            tokens=merged,
            prefix_states=torch.cat([states[:before], states[before + video :]]),
            layer_kv=layer_kv,
            text_before_video=list(self.text_before_video),
        )


def layers_fingerprint(model_spec: str, merge_layer: int, dtype: str | None = None) -> str:
    """``LayerPrefix.fingerprint`` of ``model_spec`` at ``merge_layer`` in ``dtype`` (a torch
    dtype name; None: the checkpoint's), loaded once on the CPU: part of the config
    fingerprint, computed before a job starts (its workers check they loaded the same)."""
    from pipeline.models.registry import resolve_model

    return LayerPrefix(model_spec, resolve_model(model_spec), merge_layer, dtype=getattr(torch, dtype) if dtype else None).fingerprint


# --- query side ---------------------------------------------------------------------------


@dataclass(frozen=True)
class LayerGroups:
    """The two groups of decoder layers of a prefix merged at layer k > 0.

    Attributes:
        merge_layer: k.
        merged_length: ``L_m``, prefix slots layers >= k attend to (the first ones).
        unmerged_length: ``L``, prefix slots of every layer's cache (layers < k: all of the
            unmerged prefix; layers >= k: the merged prefix, then unused slots).
        text_offset: a question token's position in layers < k minus its position in
            layers >= k.
        one_d_positions: the model has 1-D rotary positions, which layers >= k shift by
            ``text_offset`` (multimodal rotary text keeps its unmerged positions).
    """

    merge_layer: int
    merged_length: int
    unmerged_length: int
    text_offset: int
    one_d_positions: bool

    def unused_slots(self, length: int, device: torch.device) -> torch.Tensor:
        """``[length]`` bool: the cache slots layers >= k never attend to."""
        slot = torch.arange(length, device=device)
        return (slot >= self.merged_length) & (slot < self.unmerged_length)

    @contextlib.contextmanager
    def installed(self, text_model: nn.Module, unused: torch.Tensor | None = None, text_offset: torch.Tensor | None = None):
        """Within this context, the model's own forward runs layers >= k over the merged
        prefix: pre-hooks on those layers hide the unused prefix slots from the attention
        mask and (1-D rotary) shift the rotary positions by ``text_offset``.

        With ``unused`` (``[S]`` bool, S the mask's key length) and ``text_offset`` (a 0-d
        tensor) the hooks read those tensors instead of this prefix's numbers: a CUDA graph
        captured under the hooks replays their kernels on them, set for each video."""
        handles = [
            layer.register_forward_pre_hook(self._hook(index, text_model.rotary_emb, unused, text_offset), with_kwargs=True)
            for index, layer in enumerate(text_model.layers) if index >= self.merge_layer
        ]  # fmt: skip
        try:
            yield
        finally:
            for handle in handles:
                handle.remove()

    def _hook(self, index: int, rotary: nn.Module, unused: torch.Tensor | None, text_offset: torch.Tensor | None):
        def hook(module, args, kwargs):
            hidden = args[0] if args else kwargs["hidden_states"]
            count = hidden.shape[1]
            mask = kwargs.get("attention_mask")
            if mask is None:  # one new token (or no cache): it sees every slot, and itself
                cache = kwargs.get("cache", kwargs.get("past_key_values"))
                length = cache.layers[index].get_seq_length() + count
                slot = torch.arange(length, device=hidden.device)
                mask = (slot[None, :] <= slot[length - count :, None])[None, None]
            hidden_slots = self.unused_slots(mask.shape[-1], hidden.device) if unused is None else unused
            if mask.dtype == torch.bool:
                kwargs["attention_mask"] = mask & ~hidden_slots
            else:  # an additive float mask
                kwargs["attention_mask"] = mask.masked_fill(hidden_slots, torch.finfo(mask.dtype).min)
            if self.one_d_positions:
                offset = self.text_offset if text_offset is None else text_offset
                kwargs["position_embeddings"] = rotary(hidden, kwargs["position_ids"] - offset)
            return args, kwargs

        return hook


def text_model_of(model: nn.Module) -> nn.Module:
    """The decoder stack (embedding, layers, rotary embedding) of a full Video LLM."""
    return model.model.language_model


def check_layer_token_set(stored, layout, text_model: nn.Module, text_before: tuple[int, ...], fingerprints: dict,
                          model_spec: str) -> None:
    """Raise IncompatibleTokenSetError unless a token set merged at layer k > 0 fits the
    loaded model: the family supports it, the LLM has more than k layers, its embedding
    and layers 0..k-1 are those the set was made with (``llm_fingerprint``, cached in
    ``fingerprints`` per (k, dtype)), and the text before the video is the same."""
    k, name = stored.merge_layer, f"video {stored.video_id!r}"
    try:
        check_merge_layer(k, len(text_model.layers), type(layout), model_spec)
    except UnsupportedModelError as error:
        raise IncompatibleTokenSetError(f"{name}: merged at decoder layer {k}: {error}") from None
    dtype = stored.tokens.features.dtype
    if (k, dtype) not in fingerprints:
        fingerprints[k, dtype] = llm_fingerprint(text_model, k, dtype)
    if stored.llm_fingerprint != fingerprints[k, dtype]:
        raise IncompatibleTokenSetError(
            f"{name}: merged at decoder layer {k} by an LLM whose embedding or layers 0..{k - 1} differ from "
            f"{model_spec}'s ({stored.llm_fingerprint} != {fingerprints[k, dtype]}; the store was made for {stored.model_id})"
        )
    if tuple(stored.prefix_text_ids) != tuple(text_before):
        raise IncompatibleTokenSetError(f"{name}: merged at decoder layer {k} after other text before the video than "
                                        f"{model_spec}'s chat template writes")


def prefill_from_layer(model: nn.Module, layout, stored, text_before: list[int]) -> tuple[DynamicCache, PrefixLayout, LayerGroups, int]:
    """The cache of the prefix of ``stored`` (merged at layer k > 0): layers 0..k-1 from
    the stored keys and values, layers k.. run over the stored states at the merged
    positions, then padded with unused slots to the unmerged length. Returns the cache,
    the merged prefix's layout (its positions), the layer groups and the unmerged text
    position (where question tokens go in layers < k)."""
    k, device, dtype = stored.merge_layer, model.device, model.dtype
    merged = layout.prefix(stored, text_before)  # the merged prefix's positions (section 5)
    before = len(text_before)
    states = stored.prefix_states.to(device, dtype)
    states = torch.cat([states[:before], stored.tokens.features.to(device, dtype), states[before:]])  # [L_m, C]
    layer_kv = stored.layer_kv.to(device, dtype)
    unmerged_length = layer_kv.shape[3]
    text_model = text_model_of(model)
    cache = DynamicCache(config=model.config)
    for index in range(k):
        cache.update(layer_kv[index, 0][None], layer_kv[index, 1][None], index)
    run_layers(text_model.layers[k:], text_model.rotary_emb, states[None], merged.position_ids, cache)
    for layer in cache.layers[k:]:
        unused = unmerged_length - layer.keys.shape[2]
        layer.keys = torch.cat([layer.keys, layer.keys.new_zeros(*layer.keys.shape[:2], unused, layer.keys.shape[3])], 2)
        layer.values = torch.cat([layer.values, layer.values.new_zeros(*layer.values.shape[:2], unused, layer.values.shape[3])], 2)
    unmerged_text_position = layout.unmerged_text_position(stored, text_before, merged)
    one_d = layout.text_positions(0, 1).dim() == 2
    groups = LayerGroups(k, states.shape[0], unmerged_length, unmerged_text_position - merged.text_position, one_d)
    return cache, merged, groups, unmerged_text_position
