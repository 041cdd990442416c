"""``ShapeSpec``: the static description of a feature map that detectron2 passes between modules."""

from __future__ import annotations

import dataclasses


@dataclasses.dataclass
class ShapeSpec:
    """Channels, spatial size and stride of a tensor, each optional.

    Mirrors ``detectron2.layers.ShapeSpec`` field for field. It describes an NHWC feature map
    ``[N, height, width, channels]`` whose pixels are ``stride`` input pixels apart. Backbones
    report one per output so heads can be built before any data is seen (Flax modules, like
    detectron2's, need channel counts at construction).
    """

    channels: int | None = None
    height: int | None = None
    width: int | None = None
    stride: int | None = None
