"""Where bytes come from: a local folder (`simsearch.images` walks it) or object storage (`remote`, fsspec URLs)."""

from __future__ import annotations


def is_url(location: object) -> bool:
    """Whether `location` names object storage (s3://, gs://, az://, ...): a scheme other than file://."""
    text = str(location)
    scheme, sep, _ = text.partition("://")
    return bool(sep) and scheme.isidentifier() and scheme.lower() != "file"
