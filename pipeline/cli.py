"""The ``sttm`` command line: a thin layer over the pipeline's functions."""
from __future__ import annotations

import json

import click


@click.group()
@click.version_option(package_name="sttm-pipeline")
def main() -> None:
    """sttm-pipeline: compress Video LLM visual tokens with STTM and query them fast."""


@main.command()
@click.option("--retention", default=0.5, show_default=True, help="Token budget (fraction kept).")
@click.option("--frames", default=16, show_default=True, help="Frames sampled uniformly per video.")
@click.option("--json", "as_json", is_flag=True, help="Print machine-readable JSON.")
def demo(retention: float, frames: int, as_json: bool) -> None:
    """Merge raw-pixel patch tokens of the bundled sample videos (no model involved)."""
    import decord
    import torch

    import sttm
    from pipeline.samples import SAMPLE_VIDEOS

    rows = []
    for path in SAMPLE_VIDEOS:
        reader = decord.VideoReader(str(path), width=224, height=224)
        indices = torch.linspace(0, len(reader) - 1, frames).round().long().tolist()
        pixels = torch.from_numpy(reader.get_batch(indices).asnumpy()).float() / 255  # [T, 224, 224, 3]
        # 16x16 pixel patches as 768-channel tokens on a 14x14 grid.
        patches = pixels.view(frames, 14, 16, 14, 16, 3).permute(0, 1, 3, 2, 4, 5).reshape(frames, 14, 14, 768)
        tokens = sttm.merge_to_budget(patches, retention)
        rows.append(dict(video=path.name, tokens_in=patches[..., 0].numel(), tokens_kept=tokens.num_tokens,
                         retention=round(tokens.retention, 4), tau=round(tokens.tau_s, 4)))
    if as_json:
        click.echo(json.dumps(rows))
    else:
        for row in rows:
            click.echo(f"{row['video']}: {row['tokens_in']} -> {row['tokens_kept']} tokens "
                       f"(retention {row['retention']}, tau {row['tau']})")
