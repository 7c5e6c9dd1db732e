"""`sttm inspect`, `sttm visualize` and `sttm budget-curve` on real token stores of the
bundled videos, made by the tiny random models.

The drawn images are checked against the store: every token that starts in a shown frame
has its outline, in its kind's colour, on the border of the pixel rectangle its box
scales to; patches merged into an earlier frame's token are tinted; a static video at a
low budget shows few, large boxes. Expected pixel positions are computed here from the
rule the README states (the token grid scaled over the frame), not by the drawing code.
"""
from __future__ import annotations

import io
import json
import shutil
import struct
from collections import Counter
from pathlib import Path

import decord
import numpy as np
import pytest
import torch
from click.testing import CliRunner
from PIL import Image

from conftest import connected_to
import pipeline.store as store_module
import schemas
import sttm
from pipeline.cli import main
from pipeline.config import PreprocessConfig
from pipeline.decode import UniformSampling, decode_video
from pipeline.fingerprint import config_fingerprint
from pipeline.inspect_store import summarize_store
from pipeline.models import VideoAdapter, load_adapter
from pipeline.run import run_preprocess
from pipeline.samples import SAMPLE_DIR
from pipeline.store import SchemaVersionError, StoredTokenSet, TokenStore
from pipeline.visualize import (
    BUDGET_COLOURS,
    COARSE_COLOUR,
    CONTINUATION_TINT,
    CURVE_COLOUR,
    FINEST_COLOUR,
    SPANS_FRAMES_COLOUR,
    Visualization,
    budget_curve,
    decode_token_frames,
    draw_budget_curve,
    visualize_stored_video,
)
from test_store import RawStore, at_version, make_record, write_legacy

MODEL = "tiny-random:llava-onevision"
FRAMES = 4
BIKES = SAMPLE_DIR / "bikes.mp4"
BUNNY = SAMPLE_DIR / "bigbuckbunny.mp4"


# --------------------------------------------------------------------------- stores


@pytest.fixture(scope="module")
def pipeline_store(tmp_path_factory, ray_cluster) -> Path:
    """A store written by the real preprocessing job: both sample videos stored (4 frames,
    budget 0.5) and one empty file that failed to decode."""
    root = tmp_path_factory.mktemp("pipeline")
    videos = root / "videos"
    videos.mkdir()
    for video in (BIKES, BUNNY):
        shutil.copy(video, videos / video.name)
    (videos / "empty.mp4").write_bytes(b"")
    with connected_to(ray_cluster):
        summary = run_preprocess(PreprocessConfig(input=str(videos), output=str(root / "store"), model=MODEL,
                                                  frames=FRAMES, progress=False))
    assert (summary.stored, summary.failed) == (2, 1)
    return root / "store"


@pytest.fixture(scope="module")
def llava() -> VideoAdapter:
    return load_adapter(MODEL)


def write_token_set(store: TokenStore, adapter: VideoAdapter, video_path: Path, video_id: str,
                    budget: float) -> StoredTokenSet:
    """Decode ``FRAMES`` frames of ``video_path``, encode, merge to ``budget`` and store
    them under ``video_id``, as the pipeline's tokenize stage does (without Ray)."""
    video = decode_video(str(video_path), UniformSampling(FRAMES))
    encoded = adapter.encode(video)
    sampling = {"policy": "UniformSampling", "num_frames": FRAMES}
    record = StoredTokenSet(
        video_id=video_id, source_uri=str(video_path), content_hash=video.content_hash, model_id=adapter.model_id,
        model_revision=None, encoder_fingerprint=adapter.fingerprint,
        config_fingerprint=config_fingerprint(model_id=adapter.model_id, model_revision=None,
                                              encoder_fingerprint=adapter.fingerprint, sampling=sampling,
                                              sttm={"budget": budget}),
        sampling=sampling, frame_indices=video.frame_indices, timestamps=video.timestamps,
        model_extra=encoded.model_extra, tokens=sttm.merge_to_budget(encoded.tokens, budget),
        pipeline_version="test", run_id="test-run")
    store.write(record)
    return record


def write_mjpeg_avi(path: Path, frames: list[Image.Image], fps: int = 25) -> None:
    """A Motion-JPEG AVI of ``frames`` (no video encoder is installed; decord reads these).

    RIFF 'AVI ' with the header list (main header, one video stream: 'strh' + a
    BITMAPINFOHEADER), the 'movi' list of JPEG frames and an 'idx1' index of key frames.
    """
    def chunk(fourcc: bytes, data: bytes) -> bytes:
        return fourcc + struct.pack("<I", len(data)) + data + b"\0" * (len(data) % 2)

    jpegs = []
    for frame in frames:
        buffer = io.BytesIO()
        frame.save(buffer, "JPEG", quality=95)
        jpegs.append(buffer.getvalue())
    width, height = frames[0].size
    count, largest = len(jpegs), max(map(len, jpegs))
    main_header = struct.pack("<14I", 1_000_000 // fps, 0, 0, 0x10, count, 0, 1, largest, width, height, 0, 0, 0, 0)
    stream_header = b"vidsMJPG" + struct.pack("<IHHIIIIIIIIhhhh", 0, 0, 0, 0, 1, fps, 0, count, largest,
                                              0xFFFFFFFF, 0, 0, 0, width, height)
    stream_format = struct.pack("<IiiHH4sIiiII", 40, width, height, 1, 24, b"MJPG", width * height * 3, 0, 0, 0, 0)
    header_list = chunk(b"LIST", b"hdrl" + chunk(b"avih", main_header)
                        + chunk(b"LIST", b"strl" + chunk(b"strh", stream_header) + chunk(b"strf", stream_format)))
    movi, index, offset = b"", b"", 4
    for jpeg in jpegs:
        index += b"00dc" + struct.pack("<III", 0x10, offset, len(jpeg))
        movi += chunk(b"00dc", jpeg)
        offset += len(chunk(b"00dc", jpeg))
    body = b"AVI " + header_list + chunk(b"LIST", b"movi" + movi) + chunk(b"idx1", index)
    path.write_bytes(b"RIFF" + struct.pack("<I", len(body)) + body)


# --------------------------------------------------------------------------- what the image should show


def kind_colours(record: StoredTokenSet) -> list[tuple[int, int, int]]:
    """The outline colour each token should have: spanning several frames (its id appears
    in a frame after its root's, by the assignment) first, else by its root cell's area."""
    tokens = record.tokens
    colours = []
    for i in range(tokens.num_tokens):
        frames = torch.nonzero((tokens.assignment == i).flatten(1).any(1)).flatten().tolist()
        y0, x0, y1, x1 = tokens.box[i].tolist()
        area = (y1 - y0) * (x1 - x0)
        spans = max(frames) > tokens.frame[i]
        assert spans == (tokens.num_patches[i] > area), "a tree spans frames exactly when it has more patches than its box"
        colours.append(SPANS_FRAMES_COLOUR if spans else COARSE_COLOUR if area > 1 else FINEST_COLOUR)
    return colours


def pixel_rect(box: list[int], grid: tuple[int, int, int], panel) -> tuple[int, int, int, int]:
    """``(left, top, right, bottom)`` image pixels (inclusive) of a ``(y0, x0, y1, x1)``
    token box: the ``H x W`` token grid scaled over the panel's frame."""
    _, grid_height, grid_width = grid
    y0, x0, y1, x1 = box

    def column(x):
        return panel.left + round(x * panel.width / grid_width)

    def row(y):
        return panel.top + round(y * panel.height / grid_height)

    return column(x0), row(y0), column(x1) - 1, row(y1) - 1


def assert_boxes_drawn(image: Image.Image, drawn: Visualization) -> int:
    """Every token starting in a shown frame has its kind's colour in the middle of each
    side of its box's pixel rectangle; returns how many tokens were checked."""
    record = drawn.record
    colours = kind_colours(record)
    checked = 0
    for panel in drawn.panels:
        for i in torch.nonzero(record.tokens.frame == panel.token_frame).flatten().tolist():
            left, top, right, bottom = pixel_rect(record.tokens.box[i].tolist(), record.tokens.grid, panel)
            middle_x, middle_y = (left + right) // 2, (top + bottom) // 2
            for xy in ((middle_x, top), (middle_x, bottom), (left, middle_y), (right, middle_y)):
                assert image.getpixel(xy) == colours[i], f"token {i} in frame {panel.token_frame} at {xy}"
            checked += 1
    return checked


def assert_tinted(pixel, frame_pixel) -> None:
    """``pixel`` is ``frame_pixel`` blended toward magenta by the tint weight, a weight
    large enough to see (0.3 or more)."""
    assert CONTINUATION_TINT >= 0.3
    expected = np.round((1 - CONTINUATION_TINT) * np.asarray(frame_pixel, np.float32)
                        + CONTINUATION_TINT * np.float32(SPANS_FRAMES_COLOUR))
    assert np.abs(np.asarray(pixel) - expected).max() <= 1, f"{pixel} is not {frame_pixel} tinted"


# --------------------------------------------------------------------------- inspect


def test_inspect_summarizes_runs_videos_failures_and_thresholds(pipeline_store):
    result = CliRunner().invoke(main, ["inspect", str(pipeline_store), "--json"])
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)

    store = TokenStore(str(pipeline_store))
    records = {video_id: store.read(video_id) for video_id in ("bigbuckbunny", "bikes")}
    sizes = {entry.video_id: entry.bytes for entry in store.list()}
    assert summary["video_ids"] == ["bigbuckbunny", "bikes"]
    assert (summary["num_runs"], summary["num_videos"], summary["num_failures"]) == (1, 2, 1)
    run = summary["runs"][0]
    assert (run["inputs"], run["stored"], run["skipped"], run["failed"]) == (3, 2, 0, 1)
    assert run["settings"] == {"model": MODEL, "budget": 0.5, "root_level": 1, "frames": FRAMES}
    [failure] = summary["failures"]
    assert (failure["video_id"], failure["stage"], failure["error_type"]) == ("empty", "decode", "CorruptVideoError")
    assert failure["stored_since"] is False

    for row in summary["videos"]:
        tokens = records[row["video_id"]].tokens
        assert (row["tau_s"], row["tau_t"], row["budget"]) == (tokens.tau_s, tokens.tau_t, 0.5)
        assert (row["num_tokens"], row["grid"], row["bytes"]) == (tokens.num_tokens, list(tokens.grid),
                                                                  sizes[row["video_id"]])
        assert row["retention"] == tokens.retention
    retentions = sorted(r.tokens.retention for r in records.values())
    assert (summary["retention"]["min"], summary["retention"]["max"]) == (retentions[0], retentions[-1])
    assert sum(bin_["count"] for bin_ in summary["retention_histogram"]) == 2
    assert summary["total_bytes"] == sum(sizes.values())
    assert summary["total_tokens"] == sum(r.num_tokens for r in records.values())
    [config] = summary["configs"]
    assert config["budgets"] == [0.5] and config["tau_s"]["min"] == min(r.tokens.tau_s for r in records.values())

    text = CliRunner().invoke(main, ["inspect", str(pipeline_store)])
    assert text.exit_code == 0, text.output
    for expected in ("runs: 1", "videos: 2", "failures: 1 (1 not stored since)", "empty  decode: CorruptVideoError",
                     "budget 0.5", f"{records['bikes'].tokens.tau_s:.4f}", "bigbuckbunny", "bikes"):
        assert expected in text.stdout


def test_inspect_reads_thresholds_from_a_store_on_s3(s3_server, pipeline_store):
    bucket = s3_server.make_bucket()
    client = s3_server.client()
    for path in pipeline_store.rglob("*"):
        if path.is_file():
            client.upload_file(str(path), bucket, f"tokens-store/{path.relative_to(pipeline_store).as_posix()}")

    remote = summarize_store(f"s3://{bucket}/tokens-store", s3_server.storage_options).to_dict()
    local = summarize_store(str(pipeline_store)).to_dict()
    assert remote["store"] == f"s3://{bucket}/tokens-store"
    assert remote["video_ids"] == local["video_ids"]
    assert [(v["tau_s"], v["tau_t"], v["bytes"]) for v in remote["videos"]] == \
           [(v["tau_s"], v["tau_t"], v["bytes"]) for v in local["videos"]]
    assert remote["num_failures"] == 1 and remote["num_runs"] == 1


def test_inspect_names_a_token_set_its_index_points_to_but_is_gone(pipeline_store, tmp_path):
    store = tmp_path / "store"
    shutil.copytree(pipeline_store, store)
    key = TokenStore(str(store)).list()[0].key
    (store / key).unlink()
    result = CliRunner().invoke(main, ["inspect", str(store)])
    assert result.exit_code == 1
    assert f"{store}/{key}: " in result.output  # the message itself is cut to one line of text
    as_json = CliRunner().invoke(main, ["inspect", str(store), "--json"])
    assert as_json.exit_code == 1
    (problem,) = json.loads(as_json.stdout)["problems"]
    assert problem["key"] == key and problem["message"].endswith("does not exist")
    # The report goes on: the other videos are still listed.
    others = [s.video_id for s in TokenStore(str(store)).list() if s.key != key]
    assert others and all(video_id in result.output for video_id in others)


def test_inspect_reads_token_sets_of_schema_1_0_and_refuses_a_future_major(tmp_path, monkeypatch):
    store = TokenStore(str(tmp_path))
    old = make_record("old-video")

    def put(key: str, data: bytes) -> None:
        (tmp_path / key).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / key).write_bytes(data)

    write_legacy(RawStore(store, lambda key: (tmp_path / key).read_bytes(), put), old, "1.0")
    assert [row.video_id for row in summarize_store(str(tmp_path)).videos] == ["old-video"]
    assert summarize_store(str(tmp_path)).videos[0].tau_s == old.tokens.tau_s

    monkeypatch.setattr(store_module, "TOKEN_SET", at_version(schemas.TOKEN_SET, "4.0"))
    key = store.write(make_record("future-video", video_bytes=b"other bytes"))
    monkeypatch.undo()
    with pytest.raises(SchemaVersionError, match=rf"{key} was written with token_set schema version 4\.0"):
        summarize_store(str(tmp_path))


def test_inspect_of_a_missing_store_says_so(tmp_path):
    result = CliRunner().invoke(main, ["inspect", str(tmp_path / "no-store-here")])
    assert result.exit_code == 2  # a usage error, found before anything is read
    assert "does not exist" in result.output and "no-store-here" in result.output


# --------------------------------------------------------------------------- visualize


def test_visualize_draws_every_box_where_the_store_says(pipeline_store, tmp_path):
    out = tmp_path / "bunny.png"
    result = CliRunner().invoke(main, ["visualize", str(pipeline_store), "bigbuckbunny", "--out", str(out), "--json"])
    assert result.exit_code == 0, result.output
    payload = json.loads(result.stdout)
    image = Image.open(out).convert("RGB")
    record = TokenStore(str(pipeline_store)).read("bigbuckbunny")
    drawn = visualize_stored_video(str(pipeline_store), "bigbuckbunny")  # the same image, with its panels

    assert image.size == (payload["width"], payload["height"]) == drawn.image.size
    assert np.array_equal(np.asarray(image), np.asarray(drawn.image))
    assert [p["token_frame"] for p in payload["panels"]] == list(range(FRAMES))
    assert [p["frame_indices"] for p in payload["panels"]] == [[i] for i in record.frame_indices]
    for panel in drawn.panels:  # 1280x720 video at 320 px wide, inside the image
        assert (panel.width, panel.height) == (320, 180)
        assert panel.left + panel.width <= image.width and panel.top + panel.height < image.height
    assert image.width >= 4 * 320 and image.height > max(p.top + p.height for p in drawn.panels) + 30
    caption = " ".join(payload["caption"])
    assert f"retention {record.tokens.retention:.3f}" in caption and f"tau_s {record.tokens.tau_s:.4f}" in caption
    # Counted from the stored tokens, classified here by the assignment: the counts come
    # out of float32 CPU kernels (the encoder's) and differ between machines.
    kinds = Counter(kind_colours(record))
    assert payload["tokens_by_kind"] == {"finest": kinds[FINEST_COLOUR], "coarse": kinds[COARSE_COLOUR],
                                         "spans_frames": kinds[SPANS_FRAMES_COLOUR]}

    # Every kind occurs in this video, so each colour is checked somewhere.
    assert set(kinds) == {FINEST_COLOUR, COARSE_COLOUR, SPANS_FRAMES_COLOUR}
    assert assert_boxes_drawn(image, drawn) == record.num_tokens

    # Patches merged into an earlier frame's token: tinted over the frame as decoded.
    frames = decode_token_frames(record, [p.token_frame for p in drawn.panels], 320).numpy()
    tokens = record.tokens
    checked = 0
    for n, panel in enumerate(drawn.panels):
        for y, x in torch.nonzero(torch.ones(tokens.grid[1:], dtype=torch.bool)).tolist():
            left, top, right, bottom = pixel_rect([y, x, y + 1, x + 1], tokens.grid, panel)
            centre = ((left + right) // 2, (top + bottom) // 2)
            frame_pixel = frames[n][centre[1] - panel.top, centre[0] - panel.left]
            if tokens.frame[tokens.assignment[panel.token_frame, y, x]] < panel.token_frame:
                assert_tinted(image.getpixel(centre), frame_pixel)
                checked += 1
            elif tokens.box[tokens.assignment[panel.token_frame, y, x]].tolist() == [y, x, y + 1, x + 1]:
                assert image.getpixel(centre) == tuple(frame_pixel)  # a lone patch: outlined, not tinted
    # Every frame is shown, so each token spanning frames has tinted patches in some later panel.
    assert checked >= kinds[SPANS_FRAMES_COLOUR] > 0

    # The frames shown are the stored ones, decoded again (not, say, the first frames).
    reader = decord.VideoReader(str(BUNNY))
    for n, index in enumerate(record.frame_indices):
        expected = np.asarray(Image.fromarray(reader[index].asnumpy()).resize((320, 180), Image.BICUBIC), np.float32)
        assert np.abs(frames[n].astype(np.float32) - expected).mean() < 3


def test_a_static_video_at_a_low_budget_shows_large_boxes(llava, tmp_path):
    first_frame = Image.fromarray(decord.VideoReader(str(BIKES))[0].asnumpy())
    video = tmp_path / "static.avi"
    write_mjpeg_avi(video, [first_frame] * 8)
    store = TokenStore(str(tmp_path / "store"))
    record = write_token_set(store, llava, video, "static", budget=0.05)

    tokens = record.tokens
    assert (tokens.frame == 0).all(), "every later frame joins the first one's tokens"
    areas = ((tokens.box[:, 2] - tokens.box[:, 0]) * (tokens.box[:, 3] - tokens.box[:, 1])).tolist()
    assert sum(areas) == 14 * 14 and max(areas) >= 16 and len(areas) <= 0.05 * FRAMES * 14 * 14

    drawn = visualize_stored_video(str(tmp_path / "store"), "static")
    image = drawn.image
    assert [p.tokens_starting for p in drawn.panels] == [tokens.num_tokens, 0, 0, 0]
    assert assert_boxes_drawn(image, drawn) == tokens.num_tokens
    # The largest box, in the first frame, outlined as a token that spans frames; in the
    # later frames the same place is tinted: merged into that token.
    largest = tokens.box[int(np.argmax(areas))].tolist()
    left, top, right, bottom = pixel_rect(largest, tokens.grid, drawn.panels[0])
    assert right - left >= 3 * 320 // 14 and image.getpixel((left, (top + bottom) // 2)) == SPANS_FRAMES_COLOUR
    centre = ((left + right) // 2, (top + bottom) // 2)
    for panel in drawn.panels[1:]:
        moved = (centre[0] - drawn.panels[0].left + panel.left, centre[1] - drawn.panels[0].top + panel.top)
        assert_tinted(image.getpixel(moved), image.getpixel(centre))


def test_qwen_token_frames_stand_for_pairs_of_sampled_frames(tmp_path):
    store = TokenStore(str(tmp_path / "store"))
    record = write_token_set(store, load_adapter("tiny-random:qwen2-vl"), BIKES, "bikes", budget=0.5)
    assert record.tokens.grid[0] == FRAMES // 2 and record.model_extra["temporal_patch_size"] == 2

    drawn = visualize_stored_video(str(tmp_path / "store"), "bikes")
    assert [p.frame_indices for p in drawn.panels] == [record.frame_indices[0:2], record.frame_indices[2:4]]
    assert [p.timestamp for p in drawn.panels] == [record.timestamps[0], record.timestamps[2]]
    assert [(p.width, p.height) for p in drawn.panels] == [(320, 136)] * 2  # 640x272 video
    assert assert_boxes_drawn(drawn.image, drawn) == record.num_tokens


def test_visualize_of_an_unknown_video_id_names_it(pipeline_store, tmp_path):
    out = tmp_path / "nothing.png"
    result = CliRunner().invoke(main, ["visualize", str(pipeline_store), "no-such-video", "--out", str(out)])
    assert result.exit_code == 1
    assert "no token set for video id 'no-such-video'" in result.output
    assert not out.exists()


def test_visualize_without_the_source_names_the_video_and_uri(llava, tmp_path):
    video = tmp_path / "videos" / "clip.mp4"
    video.parent.mkdir()
    shutil.copy(BIKES, video)
    write_token_set(TokenStore(str(tmp_path / "store")), llava, video, "clip", budget=0.5)
    args = ["visualize", str(tmp_path / "store"), "clip", "--out", str(tmp_path / "clip.png")]

    video.unlink()
    gone = CliRunner().invoke(main, args)
    assert gone.exit_code == 1
    assert f"cannot draw video 'clip': its source {video} cannot be decoded again: no such file" in gone.output

    shutil.copy(BUNNY, video)  # another video at the same uri: its frames would mislead
    replaced = CliRunner().invoke(main, args)
    assert replaced.exit_code == 1
    assert f"cannot draw video 'clip': its source {video} has changed since the token set was made" in replaced.output
    assert not (tmp_path / "clip.png").exists()


# --------------------------------------------------------------------------- budget curve


def test_budget_curve_plots_what_merge_keeps_at_each_threshold(llava, tmp_path):
    x = llava.encode(decode_video(str(BIKES), UniformSampling(FRAMES))).tokens
    curve = budget_curve(x, budgets=(0.5, 0.3, 0.001), num_points=12)

    taus = [p.tau for p in curve.points]
    assert taus == sorted(taus) and taus[-1] == 1.0 and len(taus) >= 12
    for p in curve.points[::4]:
        assert p.num_tokens == sttm.merge(x, tau_s=p.tau, tau_t=p.tau).num_tokens
        assert p.retention == p.num_tokens / (FRAMES * 14 * 14)
    for budget in (0.5, 0.3):
        searched = sttm.merge_to_budget(x, budget)
        assert curve.budgets[budget].tau == searched.tau_s and curve.budgets[budget] in curve.points
        assert curve.budgets[budget].retention <= budget
    assert curve.budgets[0.001] is None  # below one token per root cell

    plot = draw_budget_curve(curve, "bikes")
    assert plot.image.size == (800, 500)
    for n, budget in enumerate((0.5, 0.3)):
        picked = curve.budgets[budget]
        assert plot.image.getpixel(plot.to_pixel(picked.tau, picked.retention)) == BUDGET_COLOURS[n]
    markers = [plot.to_pixel(p.tau, p.retention) for p in curve.budgets.values() if p]
    for p in curve.points:
        xy = plot.to_pixel(p.tau, p.retention)
        if all(abs(xy[0] - mx) + abs(xy[1] - my) > 8 for mx, my in markers):
            assert plot.image.getpixel(xy) == CURVE_COLOUR

    out = tmp_path / "curve.png"
    result = CliRunner().invoke(main, ["budget-curve", str(BIKES), "--model", MODEL, "--frames", str(FRAMES),
                                       "--points", "12", "--out", str(out), "--json"])
    assert result.exit_code == 0, result.output
    payload = json.loads(result.stdout)
    assert Image.open(out).size == (800, 500) and payload["path"] == str(out)
    assert payload["grid"] == [FRAMES, 14, 14]
    assert [b["budget"] for b in payload["budgets"]] == [0.5, 0.3]
    assert [b["tau"] for b in payload["budgets"]] == [curve.budgets[0.5].tau, curve.budgets[0.3].tau]


def test_budget_curve_of_a_missing_video_names_it(tmp_path):
    result = CliRunner().invoke(main, ["budget-curve", str(tmp_path / "gone.mp4"), "--model", MODEL,
                                       "--out", str(tmp_path / "curve.png")])
    assert result.exit_code == 2  # a usage error, found before the model loads
    assert f"{tmp_path / 'gone.mp4'}: no such video file" in result.output
