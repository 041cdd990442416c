"""Faster R-CNN R50-FPN (``faster_rcnn_R_50_FPN_3x.yaml``: ``GeneralizedRCNN`` with ``MASK_ON``
False) against detectron2's own outputs on both photographs as one batch at ``MIN_SIZE_TEST`` 256.

The fixture ``tests/fixtures/faster_rcnn_256.npz`` is written by ``tools/fixtures/make_retinanet.py``
from ``faster_rcnn_r50_fpn_state_dict(seed=0, calibration=<Mask R-CNN file>)``, which the test
regenerates; the backbone, RPN and box head are Mask R-CNN's (``tests/test_mask_rcnn.py`` compares
their FPN maps and proposals), so this compares the instances of the mask-free path.
"""

from __future__ import annotations

import pathlib

import detection_parity as parity

FIXTURES = pathlib.Path(__file__).parent / "fixtures"


def _merged(cfg, pairs):
    """``cfg`` with ``pairs`` merged in (``merge_from_list`` changes a config in place)."""
    cfg.merge_from_list(list(pairs))
    return cfg



def test_config_is_mask_rcnn_without_masks():
    from detlayers.models import faster_rcnn_R_50_FPN_3x_config, mask_rcnn_R_50_FPN_3x_config

    def flat(node, prefix=""):
        out = {}
        for key, value in node.items():
            out.update(flat(value, f"{prefix}{key}.") if hasattr(value, "items") else {prefix + key: value})
        return out

    faster, mask = flat(faster_rcnn_R_50_FPN_3x_config()), flat(mask_rcnn_R_50_FPN_3x_config())
    assert faster.pop("MODEL.MASK_ON") is False and mask.pop("MODEL.MASK_ON") is True
    assert faster == mask


def test_parity_with_detectron2():
    from detlayers.models import Predictor, faster_rcnn_R_50_FPN_3x_config
    from detlayers.models.synthetic_weights import faster_rcnn_r50_fpn_state_dict

    case = parity.load_case("faster_rcnn_256")
    calibration = FIXTURES / "mask_rcnn_bn_calibration.npz"
    state = faster_rcnn_r50_fpn_state_dict(seed=int(case["seed"]), calibration=calibration)
    assert not any(name.startswith("roi_heads.mask_head.") for name in state)
    cfg = _merged(faster_rcnn_R_50_FPN_3x_config(),
        ["INPUT.MIN_SIZE_TEST", int(case["min_size"]), "INPUT.MAX_SIZE_TEST", int(case["max_size"])]
    )
    predictor = Predictor(cfg, state)
    checked = parity.check_case(predictor, case)
    assert sum(checked) >= 100
