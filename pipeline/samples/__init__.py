"""Sample videos shipped with the package (see README.md here for their sources)."""
from pathlib import Path

SAMPLE_DIR = Path(__file__).parent
SAMPLE_VIDEOS = sorted(SAMPLE_DIR.glob("*.mp4"))
