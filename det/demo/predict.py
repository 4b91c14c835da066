"""Detect objects in one image and write it with masks, boxes and class names drawn.

    python demo/predict.py --config-file configs/e2e_mask_rcnn_R_50_FPN_mabn_2x_from_scratch.yaml \
        --ckpt LOGDIR/model_final.pth --input IMG.jpg --output OUT.png [KEY VALUE ...]
"""
from __future__ import annotations

import argparse
import os
import sys
from typing import List, Optional

from mabn.utils.errors import UserError


def parse_args(argv: Optional[List[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config-file", required=True, help="yacs config (e.g. configs/e2e_...yaml)")
    parser.add_argument("--ckpt", default=None, help="detection checkpoint (default: MODEL.WEIGHT)")
    parser.add_argument("--input", required=True, help="image file readable by OpenCV")
    parser.add_argument("--output", required=True, help="where to write the drawn image (e.g. OUT.png)")
    parser.add_argument("--score-threshold", type=float, default=0.5, help="draw detections scoring at least this")
    parser.add_argument("opts", nargs=argparse.REMAINDER, help="config overrides: KEY VALUE ...")
    return parser.parse_args(argv)


def main(argv: Optional[List[str]] = None) -> int:
    args = parse_args(argv)
    try:
        import cv2

        from det.config import load_config
        from det.engine.predictor import Predictor
        from det.engine.visualize import class_names_for, draw_detections

        cfg = load_config(args.config_file, args.opts)
        image = cv2.imread(args.input, cv2.IMREAD_COLOR) if os.path.isfile(args.input) else None
        if image is None:
            raise UserError(f"--input {args.input}: no such file or not an image OpenCV can read")
        if not os.path.isdir(os.path.dirname(os.path.abspath(args.output))):
            raise UserError(f"--output {args.output}: the folder does not exist")
        predictor = Predictor(cfg, args.ckpt)
        detections = predictor.predict(image)
        drawn = draw_detections(image, detections, class_names_for(cfg.MODEL.ROI_BOX_HEAD.NUM_CLASSES),
                                args.score_threshold)
        if not cv2.imwrite(args.output, drawn):
            raise UserError(f"--output {args.output}: OpenCV could not write it (use a .png or .jpg name)")
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    shown = int((detections["scores"] >= args.score_threshold).sum())
    print(f"{len(detections['scores'])} detections, {shown} drawn with score >= {args.score_threshold}: {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
