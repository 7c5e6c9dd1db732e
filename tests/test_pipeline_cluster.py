"""The preprocessing job on a two-node Ray cluster (``ray.cluster_utils.Cluster``) that
loses its worker node mid-run: every video is still accounted for, none stored twice."""
from __future__ import annotations

import threading
import time

from conftest import worker_node
from pipeline.config import PreprocessConfig
from pipeline.run import run_preprocess
from pipeline.samples import SAMPLE_VIDEOS
from pipeline.store import TokenStore

VIDEOS = 8


def test_worker_node_removed_mid_run(local_ray, tmp_path):
    videos = tmp_path / "videos"
    videos.mkdir()
    for copy in range(VIDEOS):  # distinct bytes: one token set each
        (videos / f"clip{copy}.mp4").write_bytes(SAMPLE_VIDEOS[copy % 2].read_bytes() + bytes([copy]))
    store_dir = tmp_path / "store"
    config = PreprocessConfig(input=str(videos), output=str(store_dir), model="tiny-random:llava-onevision",
                              frames=4, encode_workers=2, progress=False)

    # The session's cluster: its head (2 CPUs) alone can still run the whole pipeline (a
    # decode actor and an encoder), and a worker node of 3 CPUs, removed mid-run.
    with worker_node(local_ray, num_cpus=3) as worker:
        outcome = {}
        job = threading.Thread(target=lambda: outcome.update(summary=run_preprocess(config)))
        job.start()
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline and not (store_dir / "index").exists():
            time.sleep(0.1)
        assert job.is_alive(), "the job ended before the node could be removed"
        local_ray.remove_node(worker)
        job.join(timeout=600)
        assert not job.is_alive()

    summary = outcome["summary"]
    assert summary.inputs == VIDEOS
    assert summary.stored + summary.skipped + summary.failed == VIDEOS
    assert summary.failed == 0, summary.failures
    store = TokenStore(str(store_dir))
    assert sorted(s.video_id for s in store.list()) == sorted(f"clip{i}" for i in range(VIDEOS))
    assert len(list((store_dir / "tokens").rglob("*.parquet"))) == VIDEOS
    manifest = store.list_manifests()[0]
    assert len(manifest.entries) == VIDEOS and {e.status for e in manifest.entries} == {"stored"}
