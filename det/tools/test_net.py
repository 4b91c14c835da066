"""Evaluate Mask R-CNN on DATASETS.TEST with the published command line (docs/det.md), from ``det/``::

    python -m torch.distributed.launch --nproc_per_node=8 tools/test_net.py \
        --config-file configs/e2e_mask_rcnn_R_50_FPN_mabn_2x_from_scratch.yaml MODEL.WEIGHT LOGDIR/model_0180000.pth

(or ``--ckpt FILE``; without either, ``OUTPUT_DIR/last_checkpoint``). See :mod:`det.engine.launch`.
"""
import sys

from det.engine.launch import test_net_main

if __name__ == "__main__":
    sys.exit(test_net_main())
