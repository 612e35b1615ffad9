"""Turning stored bytes into RGB PIL images, and reporting the ones that cannot be read.

Every dataset decodes through :func:`decode_image`; a failure is reported once per source with
:func:`warn_unreadable` and the dataset substitutes another sample, so a bad file is never a crash
and never a silent hole in the data.
"""

from __future__ import annotations

import gzip
import logging
from io import BytesIO

from PIL import Image

logger = logging.getLogger(__name__)

_GZIP_MAGIC = b"\x1f\x8b"
_reported_sources: set[str] = set()


def decode_image(data: bytes) -> Image.Image:
    """Decode encoded image bytes (any format PIL reads; gzip-wrapped files too) into an RGB image.

    Raises whatever PIL raises for unreadable or truncated data; the image is fully loaded here,
    so a truncated file fails now rather than later inside a transform.
    """
    if data[:2] == _GZIP_MAGIC:
        data = gzip.decompress(data)
    with Image.open(BytesIO(data)) as image:
        image.load()
        return image.convert("RGB")


def warn_unreadable(source: str, error: BaseException) -> None:
    """Log a warning naming ``source`` (a path, or ``shard.tar:key``), at most once per source per process."""
    if source in _reported_sources:
        return
    _reported_sources.add(source)
    logger.warning(
        "unreadable image %s (%s: %s); using another sample in its place", source, type(error).__name__, error
    )
