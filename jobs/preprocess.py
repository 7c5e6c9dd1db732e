"""Ray Jobs entrypoint of the preprocessing job.

    ray job submit --working-dir . -- python -m jobs.preprocess --config jobs/configs/corpus.yaml

Reads a YAML config (``pipeline.config.PreprocessConfig`` fields), joins the cluster the
job was submitted to, runs the pipeline, prints the summary as JSON and exits non-zero
when more videos failed than ``max_failure_rate`` allows.
"""
from __future__ import annotations

import argparse
import json
import sys

from pipeline.config import PreprocessConfig
from pipeline.run import exit_code, run_preprocess


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Preprocess a video corpus into an STTM token store.")
    parser.add_argument("--config", required=True, help="YAML file of PreprocessConfig settings")
    parser.add_argument("--input", help="override the config's input")
    parser.add_argument("--output", help="override the config's output store")
    parser.add_argument("--address", default="auto",
                        help="Ray cluster to join (default: the one the job runs on; 'local' for an embedded one)")
    args = parser.parse_args(argv)
    config = PreprocessConfig.from_yaml(args.config, input=args.input, output=args.output)
    summary = run_preprocess(config, address=args.address)
    print(json.dumps(summary.to_dict(), indent=2))
    return exit_code(summary, config.max_failure_rate)


if __name__ == "__main__":
    sys.exit(main())
