"""``ShapeSpec``: the static description of a feature map that detectron2 passes between modules."""

from __future__ import annotations

import dataclasses


@dataclasses.dataclass(frozen=True)
class ShapeSpec:
    """Channels, spatial size and stride of a tensor, each optional.

    Mirrors ``detectron2.layers.ShapeSpec`` field for field. It describes an NHWC feature map
    ``[N, height, width, channels]`` whose pixels are ``stride`` input pixels apart. Backbones
    report one per output so heads can be built before any data is seen (Flax modules, like
    detectron2's, need channel counts at construction).

    Immutable and hashable like detectron2's namedtuple (so it can be a dict key, a static
    ``jit`` argument or a field of a hashable Flax module); ``spec._replace(stride=8)`` returns a
    changed copy as the namedtuple does.
    """

    channels: int | None = None
    height: int | None = None
    width: int | None = None
    stride: int | None = None

    def _replace(self, **changes: int | None) -> ShapeSpec:
        """A copy with ``changes`` applied (``namedtuple._replace``)."""
        return dataclasses.replace(self, **changes)
