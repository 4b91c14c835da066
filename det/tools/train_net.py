"""Train Mask R-CNN with the published command line (docs/det.md), from ``det/``::

    python -m torch.distributed.launch --nproc_per_node=8 tools/train_net.py --skip-test \
        --config-file configs/e2e_mask_rcnn_R_50_FPN_mabn_2x_from_scratch.yaml OUTPUT_DIR LOGDIR

(or ``torchrun``, or one process). See :mod:`det.engine.launch`.
"""
import sys

from det.engine.launch import train_net_main

if __name__ == "__main__":
    sys.exit(train_net_main())
