"""Small lung-window PNG thumbnails of evidence slices, for dashboards.

The worker publishes the evidence slices of each result as thumbnails (topic
``triage.evidence``), so a dashboard shows what the agent looked at without reaching into the
PACS. 128 pixels on the long side is enough to see where the opacities are and small enough
(about 10-20 kB per slice) for a message bus; they carry patient pixel data (PHI) like the
other topics.
"""

from __future__ import annotations

from typing import Final

import cv2
import numpy as np

from engines import preprocess
from schemas.errors import EngineError

__all__ = ["THUMBNAIL_PX", "WINDOW_CENTER_HU", "WINDOW_WIDTH_HU", "thumbnail_png"]

THUMBNAIL_PX: Final = 128
WINDOW_CENTER_HU: Final = -600.0
WINDOW_WIDTH_HU: Final = 1500.0
"""The lung window readers use (W 1500 / L -600), wider than the network's input window."""


def thumbnail_png(hu: np.ndarray, size: int = THUMBNAIL_PX) -> tuple[bytes, int, int]:
    """(PNG bytes, width, height) of one slice in HU, the long side scaled to ``size``."""
    image = preprocess.window(hu, WINDOW_CENTER_HU, WINDOW_WIDTH_HU)
    rows, cols = image.shape
    scale = size / max(rows, cols)
    width, height = max(1, round(cols * scale)), max(1, round(rows * scale))
    small = cv2.resize(image, (width, height), interpolation=cv2.INTER_AREA)
    ok, encoded = cv2.imencode(".png", small)
    if not ok:
        raise EngineError("PNG encoding of a thumbnail failed")
    return encoded.tobytes(), width, height
