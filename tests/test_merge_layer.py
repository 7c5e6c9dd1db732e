"""Merging inside the LLM at decoder layer k > 0 (STTM_SPEC section 6).

The reference is the model's own forward over the whole prompt (prefix and question, as
the processor builds it, from pixel values), with the merge applied inside it at layer k by
forward pre-hooks, as the official STTM code does: at layer k the video tokens' hidden
states are merged with ``sttm.merge`` (at the stored token set's thresholds), the sequence
shrinks, and layers k.. run causally over it at the positions of STTM_SPEC section 5. Our
path stores the prefix's states and keys and values at preprocessing time and answers
from them; answers and first-token logits must equal the reference's (float32, tiny random
models of the real architectures, CPU).
"""
from __future__ import annotations

import dataclasses
import json
import re
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import torch
from click.testing import CliRunner

import schemas
import sttm
from pipeline import store as store_module
from pipeline.cli import main
from pipeline.config import ConfigError, PreprocessConfig
from pipeline.fingerprint import config_fingerprint
from pipeline.merge_layer import LayerPrefix, llm_fingerprint, text_model_of
from pipeline.models import UnsupportedModelError, load_adapter, resolve_model
from pipeline.query import Decoding, IncompatibleTokenSetError, QueryEngine
from pipeline.store import CorruptObjectError, StoredTokenSet, TokenStore
from query_setup import decode_sample
from test_query import reference_inputs

FAMILIES = ["llava-onevision", "qwen2-vl", "qwen2.5-vl"]  # Qwen3-VL refuses k > 0 (DeepStack)
QUESTIONS = ["What is happening in this video?", "Describe the video in detail, frame by frame."]
MAX_NEW_TOKENS = 6


@pytest.fixture(scope="module")
def model_cache(tmp_path_factory):
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("STTM_CACHE", str(tmp_path_factory.mktemp("sttm-cache")))
        for family in [*FAMILIES, "qwen3-vl"]:
            resolve_model(f"tiny-random:{family}")
        yield


@pytest.fixture(scope="module")
def engines(model_cache):
    return {family: QueryEngine(f"tiny-random:{family}", dtype=torch.float32) for family in FAMILIES}


@pytest.fixture(scope="module")
def adapters(model_cache):
    return {family: load_adapter(f"tiny-random:{family}", dtype=torch.float32) for family in FAMILIES}


@pytest.fixture(scope="module")
def videos():
    return {family: decode_sample(family, "bigbuckbunny.mp4") for family in FAMILIES}


def layer_token_set(adapter, layer_prefix: LayerPrefix, video, video_id: str, retention: float) -> StoredTokenSet:
    """``video`` merged at ``layer_prefix.merge_layer`` to a budget, as the encode stage stores it."""
    encoded = adapter.encode(video)
    states = layer_prefix(encoded, lambda x: sttm.merge_to_budget(x, retention))
    sampling = {"frames": len(video.frame_indices)}
    return StoredTokenSet(
        video_id=video_id, source_uri=video.uri, content_hash=video.content_hash, model_id=adapter.model_id,
        model_revision=None, encoder_fingerprint=adapter.fingerprint,
        config_fingerprint=config_fingerprint(model_id=adapter.model_id, model_revision=None,
                                              encoder_fingerprint=adapter.fingerprint, sampling=sampling,
                                              sttm={"budget": retention}, merge_layer=layer_prefix.merge_layer,
                                              llm_fingerprint=layer_prefix.fingerprint),
        sampling=sampling, frame_indices=video.frame_indices, timestamps=video.timestamps,
        model_extra=encoded.model_extra, tokens=states.tokens.to("cpu"), pipeline_version="test", run_id="test-run",
        merge_layer=layer_prefix.merge_layer, llm_fingerprint=layer_prefix.fingerprint,
        prefix_text_ids=states.text_before_video, prefix_states=states.prefix_states.cpu(),
        layer_kv=states.layer_kv.cpu(),
    )  # fmt: skip


@pytest.fixture(scope="module")
def store(tmp_path_factory, adapters, videos):
    """Per family and k in (1, 2): ``<family>/k<k>``, merged to a 50% budget at layer k."""
    store = TokenStore(str(tmp_path_factory.mktemp("store")))
    for family, adapter in adapters.items():
        for k in (1, 2):
            prefix = LayerPrefix(f"tiny-random:{family}", resolve_model(f"tiny-random:{family}"), k, dtype=torch.float32)
            store.write(layer_token_set(adapter, prefix, videos[family], f"{family}/k{k}", 0.5))
    return store


# ------------------------------------------------------------------------- the reference


class MergeAtLayer:
    """Forward pre-hooks that merge the video tokens' hidden states entering decoder layer
    ``k`` of ``model`` with ``sttm.merge`` at ``stored``'s thresholds and run layers k..
    over the shortened sequence, causally, at STTM_SPEC section 5's positions (the
    official code's way). ``merged`` holds the last merge's TokenSet."""

    def __init__(self, model, stored: StoredTokenSet, input_ids: torch.Tensor):
        self.model, self.stored, self.k = model, stored, stored.merge_layer
        t, h, w = stored.tokens.grid
        video_rows = (input_ids[0] == model.config.video_token_id).nonzero()[:, 0]
        self.video = video_rows[: t * h * w]  # LLaVA-OneVision: its newline is the last video token
        self.one_d = model.config.model_type == "llava_onevision"
        self.merged = None

    def __enter__(self):
        layers = text_model_of(self.model).layers
        self.handles = [layers[i].register_forward_pre_hook(self.hook(i), with_kwargs=True) for i in range(self.k, len(layers))]
        return self

    def __exit__(self, *exc):
        for handle in self.handles:
            handle.remove()

    def hook(self, index: int):
        def run(module, args, kwargs):
            if index == self.k:
                hidden = args[0]
                t, h, w = self.stored.tokens.grid
                tokens = self.stored.tokens
                self.merged = sttm.merge(hidden[0, self.video].view(t, h, w, -1), tau_s=tokens.tau_s, tau_t=tokens.tau_t,
                                         root_level=tokens.root_level, weighted=tokens.weighted, head_dim=tokens.head_dim)
                first, last = int(self.video[0]), int(self.video[-1]) + 1
                root = (self.merged.frame.long() * h + self.merged.box[:, 0].long()) * w + self.merged.box[:, 1].long()
                self.keep = torch.cat([torch.arange(first), first + root, torch.arange(last, hidden.shape[1])])
                self.hidden = torch.cat([hidden[:, :first], self.merged.features[None], hidden[:, last:]], dim=1)
                length = self.hidden.shape[1]
                if self.one_d:  # consecutive positions in the shortened sequence
                    self.positions = torch.arange(length)[None]
                    self.embeddings = text_model_of(self.model).rotary_emb(self.hidden, self.positions)
                else:  # every row keeps the position it had (merged: its root's top-left patch)
                    self.positions = None
                    self.embeddings = tuple(part[:, self.keep] for part in kwargs["position_embeddings"])
                args = (self.hidden, *args[1:])
            kwargs["position_embeddings"] = self.embeddings
            kwargs["attention_mask"] = None  # causal over the shortened sequence
            if kwargs.get("position_ids") is not None:
                kwargs["position_ids"] = self.positions if self.one_d else kwargs["position_ids"][..., self.keep]
            return args, kwargs

        return run


@torch.no_grad()
def reference(engine: QueryEngine, adapter, video, stored: StoredTokenSet, question: str):
    """The model's own forward with the merge at layer k: the first answer token's float
    logits, the greedy answer's token ids, and the reference's own merge of the prefix.

    The first forward runs on the processor's inputs (pixel values included); the later
    ones, with the answer so far appended, on the embeddings and positions the model gave
    its LLM in the first (a generated token may be the video placeholder's id, which the
    processor's inputs cannot hold), the new tokens' positions following the last one."""
    model, text_model = engine.model, text_model_of(engine.model)
    inputs = reference_inputs(engine, adapter, video, question)
    first = {}

    def capture(module, args, kwargs):
        first.update(embeds=kwargs["inputs_embeds"], positions=kwargs.get("position_ids"))

    handle = text_model.register_forward_pre_hook(capture, with_kwargs=True)
    with handle, MergeAtLayer(model, stored, inputs["input_ids"]) as merge:
        first_logits = model(**inputs, use_cache=False).logits[0, -1].float()
    generated, logits = [], first_logits
    while len(generated) < MAX_NEW_TOKENS and int(logits.argmax()) not in engine.eos_token_ids:
        generated.append(int(logits.argmax()))
        embeds = torch.cat([first["embeds"], engine.model.get_input_embeddings()(torch.tensor([generated]))], dim=1)
        positions = first["positions"]
        if positions is not None:
            positions = torch.cat([positions, positions[..., -1:] + torch.arange(1, len(generated) + 1)], dim=-1)
        with MergeAtLayer(model, stored, inputs["input_ids"]):
            logits = model(inputs_embeds=embeds, position_ids=positions, use_cache=False).logits[0, -1].float()
    return first_logits, generated, merge.merged


# ------------------------------------------------------------------------------ parity


@pytest.mark.parametrize("k", [1, 2])
@pytest.mark.parametrize("family", FAMILIES)
def test_answers_and_logits_equal_the_models_own_forward_merged_at_layer_k(engines, adapters, videos, store, family, k):
    engine = engines[family]
    stored = store.read(f"{family}/k{k}")
    assert stored.merge_layer == k and stored.tokens.retention <= 0.5
    expected = [reference(engine, adapters[family], videos[family], stored, question) for question in QUESTIONS]
    for _, _, merged in expected:  # the decisions come from the hidden states entering layer k
        assert torch.equal(merged.assignment, stored.tokens.assignment)
        torch.testing.assert_close(merged.features, stored.tokens.features, rtol=1e-4, atol=1e-5)

    prefix, answers = engine.prefill_and_answer_all(stored, QUESTIONS, Decoding(max_new_tokens=MAX_NEW_TOKENS))
    assert prefix.num_visual_tokens == stored.num_tokens < stored.original_tokens
    for question, answer, (logits, tokens, _) in zip(QUESTIONS, answers, expected):
        assert answer.token_ids == tokens
        torch.testing.assert_close(engine.next_token_logits(prefix, question), logits, rtol=1e-4, atol=1e-5)
        alone = engine.answer(prefix, question, max_new_tokens=MAX_NEW_TOKENS)  # the prefix serves further questions
        assert alone.token_ids == tokens
    torch.testing.assert_close(engine.next_token_logits_all(prefix, QUESTIONS), torch.stack([e[0] for e in expected]),
                               rtol=1e-4, atol=1e-5)  # fmt: skip


@pytest.mark.parametrize("family", FAMILIES)
def test_layers_below_k_attend_to_the_unmerged_prefix_and_the_rest_to_the_merged_one(engines, store, family):
    engine = engines[family]
    stored = store.read(f"{family}/k1")
    prefix = engine.prefill(stored)
    groups = prefix.layer_groups
    unmerged = len(stored.prefix_text_ids) + stored.original_tokens + (stored.prefix_states.shape[0] - len(stored.prefix_text_ids))
    assert (groups.merge_layer, groups.unmerged_length, prefix.length) == (1, unmerged, unmerged)
    assert groups.merged_length == stored.prefix_states.shape[0] + stored.num_tokens
    # Layer 0 holds the stored keys and values bit for bit; every layer holds L slots.
    assert torch.equal(prefix.cache.layers[0].keys[0], stored.layer_kv[0, 0])
    assert torch.equal(prefix.cache.layers[0].values[0], stored.layer_kv[0, 1])
    assert {layer.get_seq_length() for layer in prefix.cache.layers} == {unmerged}
    # 1-D rotary: question text sits after the merged prefix in layers >= k.
    expected_offset = stored.original_tokens - stored.num_tokens if family == "llava-onevision" else 0
    assert groups.text_offset == expected_offset


@pytest.mark.parametrize("family", ["llava-onevision", "qwen2-vl"])
def test_static_decoding_steps_answer_as_the_growing_cache(model_cache, engines, store, family):
    """The fixed-capacity cache of static decoding (CUDA graphs replay it on a GPU) under
    the layer groups' hooks: the answers of the growing cache, for videos merged at either
    k, one after the other on the same engine (the hooks read per-video tensors)."""
    static = QueryEngine(f"tiny-random:{family}", dtype=torch.float32, decoding_steps="static")
    decoding = Decoding(max_new_tokens=MAX_NEW_TOKENS)
    for k in (1, 2, 1):
        stored = store.read(f"{family}/k{k}")
        _, expected = engines[family].prefill_and_answer_all(stored, QUESTIONS, decoding)
        _, answers = static.prefill_and_answer_all(stored, QUESTIONS, decoding)
        assert [a.token_ids for a in answers] == [e.token_ids for e in expected]
        torch.testing.assert_close(torch.tensor([p for a in answers for p in a.token_logprobs]),
                                   torch.tensor([p for e in expected for p in e.token_logprobs]), rtol=0, atol=1e-5)
    assert {key[2] for key in static._static_decoder.steps} == {1, 2}


# ---------------------------------------------------------------------------- refusals


def test_a_token_set_from_other_llm_layers_or_other_text_is_refused(engines, store):
    engine = engines["llava-onevision"]
    stored = store.read("llava-onevision/k2")
    other_layers = dataclasses.replace(stored, llm_fingerprint="sha256:" + "0" * 64)
    with pytest.raises(IncompatibleTokenSetError, match=r"layers 0\.\.1 differ from tiny-random:llava-onevision"):
        engine.prefill(other_layers)
    with pytest.raises(IncompatibleTokenSetError, match="other text before the video"):
        engine.prefill(dataclasses.replace(stored, prefix_text_ids=stored.prefix_text_ids[1:]))
    with pytest.raises(IncompatibleTokenSetError, match=r"merge_layer must be in \[1, 2\]"):
        engine.check(dataclasses.replace(stored, merge_layer=3))
    # The fingerprint covers exactly the embedding and layers 0..k-1.
    text_model = text_model_of(engine.model)
    assert llm_fingerprint(text_model, 2, torch.float32) == stored.llm_fingerprint
    assert llm_fingerprint(text_model, 1, torch.float32) != stored.llm_fingerprint


def test_families_without_merge_layer_support_refuse_k_above_0(model_cache):
    with pytest.raises(UnsupportedModelError, match="DeepStack"):
        LayerPrefix("tiny-random:qwen3-vl", resolve_model("tiny-random:qwen3-vl"), 2)
    with pytest.raises(UnsupportedModelError, match=r"merge_layer must be in \[1, 2\].*got 3"):
        LayerPrefix("tiny-random:qwen2-vl", resolve_model("tiny-random:qwen2-vl"), 3)


def test_layer_prefix_reads_only_the_embedding_and_the_first_k_layers(engines):
    full = engines["qwen2-vl"].model
    prefix = LayerPrefix("tiny-random:qwen2-vl", resolve_model("tiny-random:qwen2-vl"), 2, dtype=torch.float32)
    names = set(prefix.stage.state_dict())
    assert names == {name for name in full.state_dict() if name.startswith(("model.language_model.embed_tokens.",
                     "model.language_model.layers.0.", "model.language_model.layers.1."))}  # fmt: skip
    for name, tensor in prefix.stage.state_dict().items():
        assert torch.equal(tensor, full.state_dict()[name]), name


# ------------------------------------------------------------------------------- store


def test_a_layer_token_set_round_trips_and_a_damaged_layer_payload_is_refused(store, tmp_path):
    stored = store.read("qwen2-vl/k2")
    copy = TokenStore(str(tmp_path))
    key = copy.write(stored)
    again = copy.read(stored.video_id)
    for name in ("prefix_states", "layer_kv"):
        assert torch.equal(getattr(again, name), getattr(stored, name)), name
    assert (again.llm_fingerprint, again.prefix_text_ids, again.merge_layer) == (stored.llm_fingerprint, stored.prefix_text_ids, 2)
    path = tmp_path / key
    data = bytearray(path.read_bytes())
    kv_bytes = stored.layer_kv.contiguous().view(torch.uint8).numpy().tobytes()
    at = bytes(data).index(kv_bytes[:64]) + 7
    data[at] ^= 1
    path.write_bytes(bytes(data))
    with pytest.raises(CorruptObjectError, match=re.escape(key)):  # Parquet's page CRC or the layer checksum
        copy.read(stored.video_id)


def test_token_sets_of_schema_3_0_are_still_read(store, tmp_path, monkeypatch):
    """A token set as sttm-pipeline wrote it before 3.1 (without the merge layer's
    columns) reads as merged at layer 0; one that claims a merge layer without them is
    refused."""
    spec = json.loads((Path(__file__).parent / "data" / "legacy_schemas" / "token_set_3.0.json").read_text())
    old_schema = schemas.RecordSchema(name=spec["name"], version="3.0", description=spec["description"],
                                      fields=tuple(schemas._field_spec(f) for f in spec["fields"]), reads_majors=(1, 2, 3))
    encode = store_module._encode_one_row

    def encode_as_3_0(schema, row, uncompressed=()):
        if schema.name != "token_set":  # index entries as they are
            return encode(schema, row, uncompressed)
        return encode(old_schema, {name: row[name] for name in old_schema.field_names}, uncompressed)

    monkeypatch.setattr(store_module, "_encode_one_row", encode_as_3_0)
    layered = store.read("qwen2-vl/k1")
    at_k0 = dataclasses.replace(layered, merge_layer=0, llm_fingerprint=None, prefix_text_ids=None, prefix_states=None,
                                layer_kv=None, config_fingerprint="0" * 16)  # fmt: skip
    old_store = TokenStore(str(tmp_path))
    key = old_store.write(at_k0)
    old_store.write(dataclasses.replace(layered, video_id="claims-k1", config_fingerprint="1" * 16))  # columns dropped
    monkeypatch.undo()

    assert pq.read_metadata(tmp_path / key).metadata[b"sttm.schema_version"] == b"3.0"
    assert "layer_kv" not in pq.read_schema(tmp_path / key).names
    read = old_store.read(at_k0.video_id)
    assert read.merge_layer == 0 and read.layer_kv is None and read.prefix_states is None and read.llm_fingerprint is None
    assert torch.equal(read.tokens.features, at_k0.tokens.features)
    with pytest.raises(CorruptObjectError, match="merged at layer 1 but holds no layer payload"):
        old_store.read("claims-k1")


def test_config_fingerprint_at_k_0_is_unchanged_and_covers_the_llm_layers_at_k_above_0():
    base = dict(model_id="m", model_revision=None, encoder_fingerprint="e", sampling={"frames": 8}, sttm={"budget": 0.5})
    # The fingerprint of k = 0 configs is what it was before merge layers existed.
    import hashlib

    from pipeline.fingerprint import canonical_json

    before = hashlib.sha256(canonical_json({**base, "merge_layer": 0}).encode()).hexdigest()[:16]
    assert config_fingerprint(**base) == before
    k2 = config_fingerprint(**base, merge_layer=2, llm_fingerprint="sha256:a")
    assert k2 != before and k2 != config_fingerprint(**base, merge_layer=2, llm_fingerprint="sha256:b")


# ---------------------------------------------------------------------------- end to end


def test_preprocess_at_merge_layer_2_then_query(model_cache, ray_cluster, tmp_path):
    store_url, questions_path, out_path = tmp_path / "store", tmp_path / "questions.jsonl", tmp_path / "answers.jsonl"
    result = CliRunner().invoke(main, ["preprocess", "--model", "tiny-random:llava-onevision", "--output", str(store_url),
                                       "--frames", "2", "--budget", "0.5", "--merge-layer", "2", "--address", ray_cluster.address,
                                       "--json"])  # fmt: skip (on the session's cluster: no second Ray beside it)
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    store = TokenStore(str(store_url))
    listed = store.list()
    assert summary["stored"] == len(listed) >= 1
    video_id = listed[0].video_id
    stored = store.read(video_id)
    assert stored.merge_layer == 2 and stored.layer_kv.shape[:2] == (2, 2)
    assert stored.num_tokens <= stored.original_tokens // 2

    questions_path.write_text(json.dumps({"video_id": video_id, "question": QUESTIONS[0]}) + "\n")
    result = CliRunner().invoke(main, ["query", str(store_url), "--model", "tiny-random:llava-onevision", "--dtype",
                                       "float32", "--questions", str(questions_path), "--out", str(out_path),
                                       "--max-new-tokens", "3", "--json"])  # fmt: skip
    assert result.exit_code == 0, result.output
    (line,) = [json.loads(line) for line in out_path.read_text().splitlines()]
    assert line["video_id"] == video_id and line["num_visual_tokens"] == stored.num_tokens


def test_preprocess_refuses_a_merge_layer_the_model_cannot_take_naming_the_option(model_cache, tmp_path):
    for model, expected in (("tiny-random:qwen3-vl", "DeepStack"), ("tiny-random:qwen2-vl", r"merge_layer must be in \[1, 2\]")):
        result = CliRunner().invoke(main, ["preprocess", "--model", model, "--output", str(tmp_path / "store"),
                                           "--frames", "4", "--merge-layer", "3" if "qwen2" in model else "2"])  # fmt: skip
        assert result.exit_code == 2, result.output
        assert "--merge-layer" in result.output and re.search(expected, result.output), result.output
    with pytest.raises(ConfigError, match="merge_layer must be an integer >= 0"):
        PreprocessConfig(merge_layer=-1)
