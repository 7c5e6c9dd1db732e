"""Send the preprocessing job to a Ray cluster through Ray Jobs."""
from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from ray.job_submission import JobStatus, JobSubmissionClient

from pipeline.config import PreprocessConfig

TERMINAL = {JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.STOPPED}


def entrypoint(config_path: str) -> str:
    """The command Ray Jobs runs: the same job as ``sttm preprocess --config``."""
    return f"python -m jobs.preprocess --config {config_path}"


def submit_job(config_path: str, address: str, working_dir: str = ".", *, wait: bool = False,
               poll_seconds: float = 2.0, timeout_seconds: float = 24 * 3600,
               agent_wait_seconds: float = 120.0) -> dict[str, Any]:
    """Submit the job of ``config_path`` (relative to ``working_dir``, which ships with it).

    Returns ``{"job_id", "status", "entrypoint"}`` (and ``"logs"`` when ``wait``).
    """
    relative = Path(config_path).resolve().relative_to(Path(working_dir).resolve())
    PreprocessConfig.from_yaml(config_path)  # refuse a bad config before it reaches the cluster
    client = JobSubmissionClient(address)
    command = entrypoint(relative.as_posix())
    job_id = _submit_when_ready(client, command, working_dir, timeout_seconds=agent_wait_seconds)
    status = client.get_job_status(job_id)
    result: dict[str, Any] = {"job_id": job_id, "status": str(status.value), "entrypoint": command}
    if wait:
        deadline = time.monotonic() + timeout_seconds
        while status not in TERMINAL and time.monotonic() < deadline:
            time.sleep(poll_seconds)
            status = client.get_job_status(job_id)
        result.update(status=str(status.value), logs=client.get_job_logs(job_id))
    return result


def _submit_when_ready(client: JobSubmissionClient, command: str, working_dir: str, *, timeout_seconds: float) -> str:
    """Submit, retrying while the head's job agent is still starting (a fresh cluster
    answers "No available agent to submit job" for its first seconds)."""
    deadline = time.monotonic() + timeout_seconds
    while True:
        try:
            return client.submit_job(entrypoint=command, runtime_env={"working_dir": working_dir})
        except RuntimeError as error:
            if "No available agent" not in str(error) or time.monotonic() > deadline:
                raise
            time.sleep(2.0)
