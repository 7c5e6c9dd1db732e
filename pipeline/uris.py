"""Keep credentials out of what we store and print.

Video URIs come from users' manifests and may carry secrets: ``user:password@`` in the
authority, or a pre-signed URL whose query string holds the signature and access key
(``?X-Amz-Signature=...``, ``?sig=...``). Nothing the store writes, logs or raises may
contain them, so every URI passes through :func:`sanitize_uri` first.
"""
from __future__ import annotations

import re
from urllib.parse import urlsplit, urlunsplit

# "scheme://rest" up to whitespace or a quote: the URLs inside free text (error messages).
_URL_IN_TEXT = re.compile(r"[A-Za-z][A-Za-z0-9+.\-]*://[^\s'\"<>]+")


def sanitize_uri(uri: str) -> str:
    """``uri`` without user info, query string and fragment; local paths unchanged.

    ``https://user:pw@host/v.mp4?X-Amz-Signature=abc`` -> ``https://host/v.mp4``.
    The query is dropped whole rather than filtered by parameter name: signing schemes
    differ between clouds and a video's identity never depends on it.
    """
    if "://" not in uri:
        return uri
    parts = urlsplit(uri)
    host = parts.netloc.rpartition("@")[2]
    return urlunsplit((parts.scheme, host, parts.path, "", ""))


def redact_urls(text: str) -> str:
    """``text`` with :func:`sanitize_uri` applied to every URL in it."""
    return _URL_IN_TEXT.sub(lambda match: sanitize_uri(match.group(0)), text)
