"""detectron2's ``modeling/box_regression.py``: the box transforms of :mod:`detlayers.boxes`.

``Box2BoxTransform`` (``(dx, dy, dw, dh)`` deltas of ``(x1, y1, x2, y2)`` boxes) and
``Box2BoxTransformRotated`` (``(dx, dy, dw, dh, da)`` of ``(xc, yc, w, h, angle)`` boxes), with
detectron2's scale clamp, live in the public box module; the models import them from here, where
detectron2 keeps them.
"""

from __future__ import annotations

from detlayers.boxes import DEFAULT_SCALE_CLAMP, Box2BoxTransform, Box2BoxTransformRotated

__all__ = ["Box2BoxTransform", "Box2BoxTransformRotated", "DEFAULT_SCALE_CLAMP"]
