"""Store size per video, per model family, measured by writing token sets.

For a 60 s, 30 fps, 1280 x 720 video, each family's own sampling recipe and video
processor (the tiny-random model's adapter: the hub checkpoints' vision geometry and
processor settings) give the token grid ``T x H x W``; a token set of ``retention x T x
H x W`` random bfloat16 tokens of the real checkpoint's channel count (plus its DeepStack
levels beside them) is written to a local ``TokenStore``, and the object's bytes on disk
are reported (features are incompressible random bits, as real bfloat16 features nearly
are).

    python -m jobs.measure_store_size      # prints a table, writes jobs/results/store_size_per_video.json
"""
from __future__ import annotations

import json
import tempfile
import uuid
from datetime import datetime, timezone
from pathlib import Path

import torch

from pipeline.decode import DecodedVideo
from pipeline.fingerprint import config_fingerprint, content_hash
from pipeline.models import load_adapter
from pipeline.store import StoredTokenSet, TokenStore
from sttm.token_set import TokenSet

SECONDS, FPS, HEIGHT, WIDTH = 60, 30.0, 720, 1280
RETENTIONS = (1.0, 0.5, 0.3)
# (checkpoint, tiny-random family with its vision geometry and recipe, LLM channels, DeepStack levels)
CHECKPOINTS = [
    ("llava-onevision-qwen2-7b-ov", "llava-onevision", 3584, 0),
    ("Qwen2-VL-7B-Instruct", "qwen2-vl", 3584, 0),
    ("Qwen2.5-VL-7B-Instruct", "qwen2.5-vl", 3584, 0),
    ("Qwen3-VL-8B-Instruct", "qwen3-vl", 4096, 3),
    ("Qwen3.5-9B", "qwen3.5", 4096, 0),
]


def token_grid(family: str) -> tuple[int, int, int]:
    """``(T, H, W)`` visual tokens of the video under ``family``'s own recipe, from its
    adapter's preprocessing (no encoding needed)."""
    adapter = load_adapter(f"tiny-random:{family}")
    policy = adapter.default_sampling()
    indices = policy.frame_indices(int(SECONDS * FPS), FPS)
    height, width = policy.frame_size(HEIGHT, WIDTH, len(indices))
    video = DecodedVideo(
        frames=torch.zeros(len(indices), height, width, 3, dtype=torch.uint8), frame_indices=indices,
        timestamps=[i / FPS for i in indices], fps=FPS, num_frames_total=int(SECONDS * FPS),
        content_hash="sha256:0", uri="synthetic",
    )
    inputs = adapter.preprocess(video)
    if "video_grid_thw" in inputs:
        t, h, w = inputs["video_grid_thw"][0].tolist()
        merge = adapter.settings.get("merge_size", 2)
        return t, h // merge, w // merge
    return len(indices), 14, 14  # LLaVA-OneVision: 2x2 pooling of 27 x 27 patches per frame


def object_bytes(grid: tuple[int, int, int], retention: float, channels: int, levels: int) -> tuple[int, int]:
    """``(tokens, bytes on disk)`` of a stored token set of that size."""
    num_tokens = max(1, round(retention * grid[0] * grid[1] * grid[2]))
    tokens = TokenSet(
        features=torch.randn(num_tokens, channels).to(torch.bfloat16),
        frame=torch.randint(0, grid[0], (num_tokens,), dtype=torch.int32),
        box=torch.randint(0, min(grid[1:]), (num_tokens, 4), dtype=torch.int32),
        num_patches=torch.randint(1, 9, (num_tokens,), dtype=torch.int32),
        assignment=torch.randint(0, num_tokens, grid, dtype=torch.int32),
        grid=grid, tau_s=0.9, tau_t=0.8, root_level=1, weighted=True, head_dim=None, budget=retention,
    )
    record = StoredTokenSet(
        video_id="video", source_uri="synthetic.mp4", content_hash=content_hash(uuid.uuid4().bytes),
        model_id="measure", model_revision=None, encoder_fingerprint="measure",
        config_fingerprint=config_fingerprint(model_id="measure", model_revision=None, encoder_fingerprint="measure",
                                              sampling={}, sttm={"budget": retention}),
        sampling={}, frame_indices=list(range(grid[0])), timestamps=[float(i) for i in range(grid[0])],
        model_extra={}, tokens=tokens, pipeline_version="measure", run_id="measure",
        created_at=datetime.now(timezone.utc),
        deepstack=torch.randn(levels, num_tokens, channels).to(torch.bfloat16) if levels else None,
    )
    with tempfile.TemporaryDirectory() as directory:
        return num_tokens, TokenStore(directory).put(record).object_bytes


def main() -> None:
    rows = []
    print(f"{SECONDS} s, {WIDTH}x{HEIGHT} video, bfloat16, each family's own sampling")
    print(f"{'checkpoint':32} {'grid T x H x W':16} " + " ".join(f"{f'kept {r:.0%}':>22}" for r in RETENTIONS))
    for checkpoint, family, channels, levels in CHECKPOINTS:
        grid = token_grid(family)
        sizes = [object_bytes(grid, retention, channels, levels) for retention in RETENTIONS]
        rows.append({"checkpoint": checkpoint, "family": family, "channels": channels, "deepstack_levels": levels,
                     "grid": list(grid), "sizes": [{"retention": r, "tokens": n, "object_bytes": b}
                                                   for r, (n, b) in zip(RETENTIONS, sizes)]})
        cells = " ".join(f"{f'{n} tok {b / 1e6:.1f} MB':>22}" for n, b in sizes)
        print(f"{checkpoint:32} {'x'.join(map(str, grid)):16} {cells}")
    out = Path(__file__).parent / "results" / "store_size_per_video.json"
    out.write_text(json.dumps({"video": {"seconds": SECONDS, "fps": FPS, "height": HEIGHT, "width": WIDTH},
                               "dtype": "bfloat16", "rows": rows}, indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
