"""A PNG of predictions (boxes, masks, class and score) over test images, beside the ground truth."""

from __future__ import annotations

import os

import numpy as np

from detlayers.demo.data import CLASS_NAMES, Example
from detlayers.demo.evaluate import Detections

# one colour per class: circle, rectangle, rotated rectangle
CLASS_COLOURS = np.array([[0.95, 0.25, 0.2], [0.2, 0.85, 0.3], [0.25, 0.45, 1.0]])


def _draw(ax, image: np.ndarray, boxes, classes, masks, scores, title: str) -> None:
    from matplotlib.patches import Rectangle

    h, w = image.shape[:2]
    # dim the photo so the overlays read well; masks: translucent fill plus a white outline
    shown = 0.35 + 0.4 * image
    if masks is not None:
        for mask, cls in zip(masks, classes):
            shown = np.where(mask[..., None], 0.4 * shown + 0.6 * CLASS_COLOURS[cls], shown)
    ax.imshow(shown, interpolation="nearest", extent=(0, w, h, 0))
    if masks is not None:
        for mask in masks:
            if mask.any():  # pixel centres at p + 0.5, so the outline follows pixel edges
                ax.contour(np.arange(w) + 0.5, np.arange(h) + 0.5, mask.astype(float), [0.5],
                           colors="white", linewidths=0.7)
    for i, (box, cls) in enumerate(zip(boxes, classes)):
        x1, y1, x2, y2 = (float(v) for v in box)
        ax.add_patch(Rectangle((x1, y1), x2 - x1, y2 - y1, fill=False, lw=1.5,
                               edgecolor=CLASS_COLOURS[cls]))
        label = CLASS_NAMES[cls].replace("rotated rectangle", "rot. rect")
        if scores is not None:
            label += f" {scores[i]:.2f}"
        ax.text(x1, y1 - 0.8, label, fontsize=6, color="white", va="bottom",
                bbox=dict(facecolor=CLASS_COLOURS[cls], alpha=0.8, pad=0.6, lw=0))
    ax.set_title(title, fontsize=8)
    ax.set_xticks([])
    ax.set_yticks([])


def save_predictions_png(path: str, examples: list[Example], detections: list[Detections],
                         score_threshold: float = 0.5, columns: int = 4) -> str:
    """Writes ground truth (top row of each pair) and predictions above ``score_threshold``.

    Boxes and class names are drawn in the class colour, masks as a tinted fill with a white
    outline; predictions carry their scores.

    Returns the path written.  Uses matplotlib's Agg backend, so no display is needed.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    count = len(examples)
    columns = min(columns, count)
    pair_rows = -(-count // columns)
    fig, axes = plt.subplots(2 * pair_rows, columns, figsize=(2.6 * columns, 5.4 * pair_rows),
                             squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for i, (ex, det) in enumerate(zip(examples, detections)):
        r, c = 2 * (i // columns), i % columns
        axes[r, c].axis("on")
        _draw(axes[r, c], ex.image, ex.boxes, ex.classes, ex.masks, None, f"ground truth #{i}")
        keep = det.scores >= score_threshold
        masks = None if det.masks is None else det.masks[keep]
        axes[r + 1, c].axis("on")
        _draw(axes[r + 1, c], ex.image, det.boxes[keep], det.classes[keep], masks,
              det.scores[keep], f"prediction #{i} (score ≥ {score_threshold})")
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
