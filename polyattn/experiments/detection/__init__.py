"""COCO instance segmentation with XCiT backbones (the paper's Table 3): the Mask R-CNN model and its evaluation.

    from polyattn.experiments.detection import build_mask_rcnn, evaluate_coco, to_coco_results

Needs timm, torchvision and pycocotools; imported on demand only (``import
polyattn`` never imports this package).
"""

from .evaluate import COCO_STATS, IOU_TYPES, evaluate_coco, to_coco_results
from .model import ANCHOR_ASPECT_RATIOS, ANCHOR_SIZES, DEFAULT_OUT_INDICES, XCiTBackbone, XCiTFPN, build_mask_rcnn

__all__ = [
    "ANCHOR_ASPECT_RATIOS",
    "ANCHOR_SIZES",
    "COCO_STATS",
    "DEFAULT_OUT_INDICES",
    "IOU_TYPES",
    "XCiTBackbone",
    "XCiTFPN",
    "build_mask_rcnn",
    "evaluate_coco",
    "to_coco_results",
]
