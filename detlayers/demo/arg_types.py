"""argparse types for the demo's flags: a value out of range is a usage error at start
(``argument --steps: must be >= 1, got -3``), never a crash or a silent no-op minutes later.

Plain Python (no JAX): the CLI parses its arguments before JAX starts.
"""

from __future__ import annotations

import argparse
import math
from collections.abc import Callable

# The smallest --image-size the demo runs with. Shapes are 14-30 px across
# (ShapesConfig.min_size / max_size) and their centres are drawn at least 0.75 x their extent
# from the border, so the image needs 2 x 0.75 x 30 = 45 px; sizes are multiples of 8 (the
# stride-8 feature map is upsampled onto the stride-4 one), hence 48.
MIN_IMAGE_SIZE = 48
IMAGE_SIZE_MULTIPLE = 8


def _as_int(text: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None


def int_at_least(minimum: int) -> Callable[[str], int]:
    """argparse type: an int >= ``minimum``."""

    def parse(text: str) -> int:
        value = _as_int(text)
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be >= {minimum}, got {value}")
        return value

    parse.__name__ = f"int_at_least_{minimum}"
    return parse


positive_int = int_at_least(1)
non_negative_int = int_at_least(0)


def positive_float(text: str) -> float:
    """argparse type: a finite float > 0."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not math.isfinite(value) or value <= 0:
        raise argparse.ArgumentTypeError(f"must be a finite number > 0, got {text}")
    return value


def image_size(text: str) -> int:
    """argparse type: a multiple of 8 that is at least :data:`MIN_IMAGE_SIZE`."""
    value = _as_int(text)
    if value < MIN_IMAGE_SIZE or value % IMAGE_SIZE_MULTIPLE:
        raise argparse.ArgumentTypeError(
            f"must be a multiple of {IMAGE_SIZE_MULTIPLE} and >= {MIN_IMAGE_SIZE} (the shapes are up to "
            f"30 px and kept 0.75 x their size from the border), got {value}")
    return value
