"""Typed errors for bad input videos.

Every error names its source, with credentials and query strings removed, so that a
failure record can be stored and shown without leaking secrets. The errors pickle, so
they cross process boundaries (Ray workers) intact.
"""

from __future__ import annotations

from pipeline.uris import sanitize_uri


class VideoError(Exception):
    """A video that cannot be turned into frames.

    Attributes:
        uri: the source without credentials or query string (``sanitize_uri``).
        reason: what is wrong with it, in words.
    """

    def __init__(self, uri: str, reason: str):
        self.uri = sanitize_uri(uri)
        self.reason = reason
        super().__init__(f"{self.uri}: {reason}")

    def __reduce__(self):
        return (self.__class__, (self.uri, self.reason))


class VideoNotFoundError(VideoError):
    """Nothing (or a directory) exists at the source."""


class VideoReadError(VideoError):
    """The storage holding the video could not be read (permissions, network)."""


class CorruptVideoError(VideoError):
    """The bytes are not a decodable video: empty, truncated, not a media container, or a
    damaged stream."""


class NoVideoStreamError(VideoError):
    """A readable media container that holds no video stream (audio only, for example)."""
