"""On CUDA, float32: every tiny family's questions answered together against one question
per fresh prefill (the property tests/test_query_batched.py checks on the CPU), with the
decoding steps the query stage picks on CUDA (graphs where the family allows them), on the
GPU machine's own transformers. Frames are random: that machine has no decord.

    python -m jobs.check_families_cuda --out jobs/results/check_families_cuda_h200.json
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import torch
import transformers

from pipeline.decode import DecodedVideo
from pipeline.models import TINY_RANDOM_NAMES, load_adapter
from pipeline.query import Decoding, QueryEngine

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from query_setup import stored_token_set  # noqa: E402 (the tests' token-set builder)

QUESTIONS = ["What happens?", "Which color is the car on the left of the road, and why is it there?", "Count.",
             "Describe the whole scene in detail, frame by frame.", "Yes or no?"]  # fmt: skip
FRAMES = 8


def check_family(name: str, generator: torch.Generator, device: str) -> dict:
    """One family's row: the decoding steps used and how many answers equal."""
    spec = f"tiny-random:{name}"
    adapter = load_adapter(spec)
    frames = torch.randint(0, 256, (FRAMES, 224, 224, 3), dtype=torch.uint8, generator=generator)
    video = DecodedVideo(uri=f"random-{name}", frames=frames, frame_indices=list(range(FRAMES)),
                         timestamps=[i / 2 for i in range(FRAMES)], fps=2.0, num_frames_total=FRAMES,
                         content_hash="sha256:" + "0" * 64)  # fmt: skip
    stored = stored_token_set(adapter, video, "random", retention=0.5)
    engine = QueryEngine(spec, device=device, dtype=torch.float32)
    decoding = Decoding(max_new_tokens=6)
    _, together = engine.prefill_and_answer_all(stored, QUESTIONS, decoding)
    alone = [engine.prefill_and_answer_all(stored, [question], decoding)[1][0] for question in QUESTIONS]
    static = engine._static_decoder
    return {
        "model": name,
        "decoding_steps": "dynamic" if static is None else "graphs" if static.use_graphs else "static",
        "questions": len(QUESTIONS),
        "equal_answers": sum(a.token_ids == b.token_ids for a, b in zip(together, alone)),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("check_families_cuda.json"))
    parser.add_argument("--device", default=os.environ.get("DEVICE", "cuda"))
    parser.add_argument("--families", nargs="+", default=list(TINY_RANDOM_NAMES))
    args = parser.parse_args()
    torch.backends.cuda.matmul.allow_tf32 = False  # float32 exactness, as on the CPU
    torch.backends.cudnn.allow_tf32 = False
    generator = torch.Generator().manual_seed(0)
    rows = []
    for name in args.families:
        try:
            rows.append(check_family(name, generator, args.device))
        except Exception as error:  # report it and go on to the next family
            rows.append({"model": name, "error": f"{type(error).__name__}: {error}"[:500]})
        print(json.dumps(rows[-1]), flush=True)
    device = torch.cuda.get_device_name() if args.device.startswith("cuda") else args.device
    result = {"device": device, "torch": torch.__version__, "transformers": transformers.__version__, "rows": rows}
    args.out.write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
