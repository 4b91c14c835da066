"""The default configuration: maskrcnn-benchmark's keys and defaults, plus the keys for what the
published MABN fork hard-coded (``MODEL.MABN``, ``MODEL.BRN``, ``MODEL.GN``, ``DATASETS.ROOT``).

Conventions as in maskrcnn-benchmark: a ``_TRAIN`` / ``_TEST`` suffix for options that differ
between training and testing; ``SOLVER.IMS_PER_BATCH`` and ``TEST.IMS_PER_BATCH`` are global
(divided by the number of processes). Only keys that the model, data pipeline or engine read
exist, and every one of them is read (``tests/det/test_det_config.py`` checks it): an unknown key
in a file or on the command line is an error (see :func:`det.config.load_config`); keys of
maskrcnn-benchmark's models that are not built here are refused by name
(:mod:`det.config.support`). Keys of a part that a config does not build (mask-head keys with
``MASK_ON False``, conv-head keys with ``FPN2MLPFeatureExtractor``, ``MODEL.MABN`` without MABN)
have no effect, as in maskrcnn-benchmark. yacs refuses a value whose type differs from the
default's, so every float-valued key has a float default (``SOLVER.WEIGHT_DECAY_BIAS 0.0`` is
accepted) and only counts, sizes, iterations and pixel offsets are integers.
"""
from __future__ import annotations

import os

from yacs.config import CfgNode as CN

__all__ = ["DATA_ROOT_ENV", "get_default_config"]

DATA_ROOT_ENV = "MABN_DATA_ROOT"
"""Environment variable that replaces the default of ``DATASETS.ROOT``."""

_C = CN()

_C.MODEL = CN()
_C.MODEL.META_ARCHITECTURE = "GeneralizedRCNN"
_C.MODEL.RPN_ONLY = False
_C.MODEL.MASK_ON = False
_C.MODEL.DEVICE = "cuda"
# A local file: a det checkpoint, a cls checkpoint, a published cls state dict or a torchvision
# ResNet state dict (docs/det.md, "Weights"). No download ever happens.
_C.MODEL.WEIGHT = ""

_C.MODEL.BACKBONE = CN()
# "R-{18,34,50,101,152}-FPN[-{MABN,SYNCBN,BN,BRN,GN}]". The suffix is the FPN's norm (and must
# match the body's); without one the FPN has none (GN with MODEL.FPN.USE_GN) and the body's norm
# is the one RESNETS.TRANS_FUNC / STEM_FUNC name.
_C.MODEL.BACKBONE.CONV_BODY = "R-50-C4"
# Freeze the stem and the stages below this one (-1 or 0: nothing; 1: the stem; k: stem and res2..resk).
_C.MODEL.BACKBONE.FREEZE_CONV_BODY_AT = 2

_C.MODEL.FPN = CN()
# GroupNorm after each FPN conv (convs without bias); for a CONV_BODY without a norm suffix.
_C.MODEL.FPN.USE_GN = False
_C.MODEL.FPN.USE_RELU = False

# GroupNorm layers (body "...WithGN", FPN / head USE_GN, "-GN" names): NUM_GROUPS groups, or
# channels / DIM_PER_GP groups; exactly one of the two is -1.
_C.MODEL.GROUP_NORM = CN()
_C.MODEL.GROUP_NORM.DIM_PER_GP = -1
_C.MODEL.GROUP_NORM.NUM_GROUPS = 32
_C.MODEL.GROUP_NORM.EPSILON = 1e-5

_C.MODEL.RESNETS = CN()
# Groups of each 3x3 bottleneck conv (1: ResNet; 32 with WIDTH_PER_GROUP 8: ResNeXt-32x8d); the
# res2 bottleneck width is NUM_GROUPS x WIDTH_PER_GROUP.
_C.MODEL.RESNETS.NUM_GROUPS = 1
_C.MODEL.RESNETS.WIDTH_PER_GROUP = 64
# True: the stride-2 conv of a bottleneck is the 1x1 (MSRA / published); False: the 3x3
# (torchvision and our cls nets). Must match the weights that MODEL.WEIGHT loads.
_C.MODEL.RESNETS.STRIDE_IN_1X1 = True
_C.MODEL.RESNETS.TRANS_FUNC = "BottleneckWithFixedBatchNorm"
_C.MODEL.RESNETS.STEM_FUNC = "StemWithFixedBatchNorm"
_C.MODEL.RESNETS.BACKBONE_OUT_CHANNELS = 256 * 4
_C.MODEL.RESNETS.RES2_OUT_CHANNELS = 256
_C.MODEL.RESNETS.STEM_OUT_CHANNELS = 64

# Moving Average Batch Normalization (hard-coded in the published detector).
_C.MODEL.MABN = CN()
_C.MODEL.MABN.B = 2
_C.MODEL.MABN.REAL_B = 32
_C.MODEL.MABN.WARMUP_ITERS = 100
_C.MODEL.MABN.MOMENTUM = 0.98
# Iterations with the renormalization factor r = 1; -1: max(1000, WARMUP_ITERS) as in mabn.MABN2d.
_C.MODEL.MABN.R_WARMUP_ITERS = -1
# MABN's per-channel bookkeeping as one Triton kernel per pass on CUDA (MABN2d(fused_statistics=True)).
_C.MODEL.MABN.FUSED_STATISTICS = False

# Batch Renormalization schedule (Ioffe 2017).
_C.MODEL.BRN = CN()
_C.MODEL.BRN.WARMUP_ITERS = 5000
_C.MODEL.BRN.R_RAMP_END = 40000
_C.MODEL.BRN.D_RAMP_END = 25000
_C.MODEL.BRN.R_MAX = 3.0
_C.MODEL.BRN.D_MAX = 5.0

# Older name of MODEL.GROUP_NORM.NUM_GROUPS: a value other than 32 sets the group count (and
# MODEL.GROUP_NORM.NUM_GROUPS must then be 32 or the same value).
_C.MODEL.GN = CN()
_C.MODEL.GN.NUM_GROUPS = 32

_C.MODEL.RPN = CN()
_C.MODEL.RPN.USE_FPN = False
_C.MODEL.RPN.ANCHOR_SIZES = (32, 64, 128, 256, 512)
_C.MODEL.RPN.ANCHOR_STRIDE = (16,)
_C.MODEL.RPN.ASPECT_RATIOS = (0.5, 1.0, 2.0)
# RPN targets ignore anchors that cross the image border by more than this many pixels (-1: keep
# every anchor, torchvision's behaviour).
_C.MODEL.RPN.STRADDLE_THRESH = 0
_C.MODEL.RPN.FG_IOU_THRESHOLD = 0.7
_C.MODEL.RPN.BG_IOU_THRESHOLD = 0.3
_C.MODEL.RPN.BATCH_SIZE_PER_IMAGE = 256
_C.MODEL.RPN.POSITIVE_FRACTION = 0.5
# Best-scoring anchors kept per FPN level and per image before NMS.
_C.MODEL.RPN.PRE_NMS_TOP_N_TRAIN = 12000
_C.MODEL.RPN.PRE_NMS_TOP_N_TEST = 6000
# Proposals kept per FPN level and per image after NMS (before the FPN_POST_NMS_TOP_N cut over
# all levels).
_C.MODEL.RPN.POST_NMS_TOP_N_TRAIN = 2000
_C.MODEL.RPN.POST_NMS_TOP_N_TEST = 1000
_C.MODEL.RPN.NMS_THRESH = 0.7
# Smallest proposal side in pixels (a float: torchvision's own default is 1e-3).
_C.MODEL.RPN.MIN_SIZE = 0.0
# Proposals kept over all levels: per image at test; in training per batch of a process when
# FPN_POST_NMS_PER_BATCH (maskrcnn-benchmark's behaviour), else per image (torchvision's).
_C.MODEL.RPN.FPN_POST_NMS_TOP_N_TRAIN = 2000
_C.MODEL.RPN.FPN_POST_NMS_TOP_N_TEST = 2000
_C.MODEL.RPN.FPN_POST_NMS_PER_BATCH = True
_C.MODEL.RPN.RPN_HEAD = "SingleConvRPNHead"

_C.MODEL.ROI_HEADS = CN()
_C.MODEL.ROI_HEADS.USE_FPN = False
_C.MODEL.ROI_HEADS.FG_IOU_THRESHOLD = 0.5
_C.MODEL.ROI_HEADS.BG_IOU_THRESHOLD = 0.5
_C.MODEL.ROI_HEADS.BBOX_REG_WEIGHTS = (10.0, 10.0, 5.0, 5.0)
_C.MODEL.ROI_HEADS.BATCH_SIZE_PER_IMAGE = 512
_C.MODEL.ROI_HEADS.POSITIVE_FRACTION = 0.25
_C.MODEL.ROI_HEADS.SCORE_THRESH = 0.05
_C.MODEL.ROI_HEADS.NMS = 0.5
_C.MODEL.ROI_HEADS.DETECTIONS_PER_IMG = 100

_C.MODEL.ROI_BOX_HEAD = CN()
# "FPN2MLPFeatureExtractor" (2 fc of MLP_HEAD_DIM, GN after each with USE_GN) or
# "FPNXconv1fc[<NORM>]FeatureExtractor" (NUM_STACKED_CONVS 3x3 convs of CONV_HEAD_DIM with DILATION,
# each followed by the norm (GN with USE_GN), then one fc of MLP_HEAD_DIM). The C4 extractor of the
# default is refused.
_C.MODEL.ROI_BOX_HEAD.FEATURE_EXTRACTOR = "ResNet50Conv5ROIFeatureExtractor"
# "FPNPredictor"; the default, the C4 "FastRCNNPredictor" (average-pools a res5 map), is refused.
_C.MODEL.ROI_BOX_HEAD.PREDICTOR = "FastRCNNPredictor"
_C.MODEL.ROI_BOX_HEAD.POOLER_RESOLUTION = 14
_C.MODEL.ROI_BOX_HEAD.POOLER_SAMPLING_RATIO = 0
_C.MODEL.ROI_BOX_HEAD.POOLER_SCALES = (1.0 / 16,)
_C.MODEL.ROI_BOX_HEAD.NUM_CLASSES = 81
_C.MODEL.ROI_BOX_HEAD.MLP_HEAD_DIM = 1024
_C.MODEL.ROI_BOX_HEAD.USE_GN = False
_C.MODEL.ROI_BOX_HEAD.DILATION = 1
_C.MODEL.ROI_BOX_HEAD.CONV_HEAD_DIM = 256
_C.MODEL.ROI_BOX_HEAD.NUM_STACKED_CONVS = 4

_C.MODEL.ROI_MASK_HEAD = CN()
# "MaskRCNNFPNFeatureExtractor" (no norm; GN with USE_GN) or "MaskRCNNFPN<NORM>FeatureExtractor".
_C.MODEL.ROI_MASK_HEAD.FEATURE_EXTRACTOR = "ResNet50Conv5ROIFeatureExtractor"
_C.MODEL.ROI_MASK_HEAD.PREDICTOR = "MaskRCNNC4Predictor"
_C.MODEL.ROI_MASK_HEAD.POOLER_RESOLUTION = 14
_C.MODEL.ROI_MASK_HEAD.POOLER_SAMPLING_RATIO = 0
_C.MODEL.ROI_MASK_HEAD.POOLER_SCALES = (1.0 / 16,)
_C.MODEL.ROI_MASK_HEAD.CONV_LAYERS = (256, 256, 256, 256)
# Side of the predicted masks: 2 x POOLER_RESOLUTION (the predictor upsamples by 2).
_C.MODEL.ROI_MASK_HEAD.RESOLUTION = 14
_C.MODEL.ROI_MASK_HEAD.SHARE_BOX_FEATURE_EXTRACTOR = True
_C.MODEL.ROI_MASK_HEAD.DILATION = 1
_C.MODEL.ROI_MASK_HEAD.USE_GN = False

_C.INPUT = CN()
_C.INPUT.MIN_SIZE_TRAIN = (800,)
_C.INPUT.MAX_SIZE_TRAIN = 1333
_C.INPUT.MIN_SIZE_TEST = 800
_C.INPUT.MAX_SIZE_TEST = 1333
# Applied to BGR 0-255 pixels when TO_BGR255 (the published convention), else to RGB in [0, 1].
_C.INPUT.PIXEL_MEAN = [102.9801, 115.9465, 122.7717]
_C.INPUT.PIXEL_STD = [1.0, 1.0, 1.0]
_C.INPUT.TO_BGR255 = True
_C.INPUT.HORIZONTAL_FLIP_PROB_TRAIN = 0.5

_C.DATASETS = CN()
_C.DATASETS.TRAIN = ()
_C.DATASETS.TEST = ()
# Folder that the dataset paths of det/config/paths_catalog.py are relative to.
_C.DATASETS.ROOT = os.environ.get(DATA_ROOT_ENV, "datasets")

_C.DATALOADER = CN()
_C.DATALOADER.NUM_WORKERS = 4
# Batched images are padded to a multiple of this (0: no padding constraint).
_C.DATALOADER.SIZE_DIVISIBILITY = 0
_C.DATALOADER.ASPECT_RATIO_GROUPING = True

_C.SOLVER = CN()
_C.SOLVER.MAX_ITER = 40000
_C.SOLVER.BASE_LR = 0.001
_C.SOLVER.BIAS_LR_FACTOR = 2.0
_C.SOLVER.MOMENTUM = 0.9
_C.SOLVER.WEIGHT_DECAY = 0.0005
_C.SOLVER.WEIGHT_DECAY_BIAS = 0.0
_C.SOLVER.GAMMA = 0.1
_C.SOLVER.STEPS = (30000,)
_C.SOLVER.WARMUP_FACTOR = 1.0 / 3
_C.SOLVER.WARMUP_ITERS = 500
_C.SOLVER.WARMUP_METHOD = "linear"
_C.SOLVER.CHECKPOINT_PERIOD = 2500
# Evaluate every this many iterations during training (0: only at the end), as in later
# maskrcnn-benchmark.
_C.SOLVER.TEST_PERIOD = 0
# Global: divided by the number of processes.
_C.SOLVER.IMS_PER_BATCH = 16

_C.TEST = CN()
# Checked after the final evaluation: entries [task, metric, [mean, std]] such as
# ["bbox", "AP", [0.365, 0.002]] (metrics as fractions); a value outside the open range
# mean +- EXPECTED_RESULTS_SIGMA_TOL x std fails the run (det/evaluation/expected.py).
_C.TEST.EXPECTED_RESULTS = []
_C.TEST.EXPECTED_RESULTS_SIGMA_TOL = 4.0
# Global: divided by the number of processes.
_C.TEST.IMS_PER_BATCH = 8

_C.OUTPUT_DIR = "."
# Seed of the weight initialization and of the training data's order and augmentation (the same
# on every process); a resume refuses another value.
_C.SEED = 0
# "float32" or "float16" (mixed precision with torch.amp).
_C.DTYPE = "float32"


def get_default_config() -> CN:
    """A fresh copy of the defaults (``DATASETS.ROOT`` read from the environment now)."""
    config = _C.clone()
    config.DATASETS.ROOT = os.environ.get(DATA_ROOT_ENV, "datasets")
    return config
