"""Every config file under configs/det (the 21 published FPN Faster/Mask R-CNN configs of
maskrcnn-benchmark and the MABN fork, our own recipes, the tiny shapes configs) loads, builds the
published model (norm types, counts and places, stride, groups) and trains one step on the CPU;
published configs of models this project does not build are refused at load in one line."""
from __future__ import annotations

from typing import Dict, NamedTuple

import pytest
import torch
from det_helpers import ALL_CONFIGS, CONFIG_DIR, LOSSES, REPO, images_and_targets
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm
from torchvision.ops.misc import FrozenBatchNorm2d

import mabn
from det.config import load_config
from det.config.support import SUPPORTED
from det.modeling import build_detection_model
from mabn.utils.errors import UserError

NORM_LIKE = (_BatchNorm, nn.GroupNorm, FrozenBatchNorm2d)
# One small image, few proposals and RoIs: a training step of an R-101 model in about a second.
SMALL = ["INPUT.MIN_SIZE_TRAIN", "(64,)", "INPUT.MAX_SIZE_TRAIN", "96", "MODEL.RPN.PRE_NMS_TOP_N_TRAIN", "100",
         "MODEL.RPN.FPN_POST_NMS_TOP_N_TRAIN", "50", "MODEL.RPN.BATCH_SIZE_PER_IMAGE", "32",
         "MODEL.ROI_HEADS.BATCH_SIZE_PER_IMAGE", "16"]


class Expected(NamedTuple):
    """The published model of a config: norm class, norms in body / FPN / box head / mask head,
    masks, stride in the 1x1 conv (None: no bottlenecks), 3x3 conv groups."""

    norm: str
    counts: tuple
    masks: bool = True
    stride_in_1x1: object = True
    groups: int = 1


R50_EVERYWHERE = (53, 8, 4, 4)
FROZEN_R50, FROZEN_R101 = (53, 0, 0, 0), (104, 0, 0, 0)
PUBLISHED: Dict[str, Expected] = {
    # maskrcnn-benchmark configs/: FrozenBN bodies, no norm in FPN and heads.
    "e2e_mask_rcnn_R_50_FPN_1x.yaml": Expected("FrozenBatchNorm2d", FROZEN_R50),
    "e2e_faster_rcnn_R_50_FPN_1x.yaml": Expected("FrozenBatchNorm2d", FROZEN_R50, masks=False),
    "e2e_mask_rcnn_R_101_FPN_1x.yaml": Expected("FrozenBatchNorm2d", FROZEN_R101),
    "e2e_faster_rcnn_R_101_FPN_1x.yaml": Expected("FrozenBatchNorm2d", FROZEN_R101, masks=False),
    "e2e_mask_rcnn_X_101_32x8d_FPN_1x.yaml": Expected("FrozenBatchNorm2d", FROZEN_R101, stride_in_1x1=False, groups=32),
    "e2e_faster_rcnn_X_101_32x8d_FPN_1x.yaml": Expected("FrozenBatchNorm2d", FROZEN_R101, masks=False,
                                                        stride_in_1x1=False, groups=32),
    "e2e_mask_rcnn_R_50_FPN_1x_periodically_testing.yaml": Expected("FrozenBatchNorm2d", FROZEN_R50),
    # The MABN fork's det/configs.
    "e2e_mask_rcnn_R_50_FPN_1x_from_scratch.yaml": Expected("SyncBatchNorm", R50_EVERYWHERE),
    "e2e_mask_rcnn_R_50_FPN_2x.yaml": Expected("SyncBatchNorm", R50_EVERYWHERE),
    "e2e_mask_rcnn_R_50_FPN_mabn_2x_from_scratch.yaml": Expected("MABN2d", R50_EVERYWHERE),
    "e2e_mask_rcnn_R_50_FPN_mabn_2x_fine_tune.yaml": Expected("MABN2d", R50_EVERYWHERE, stride_in_1x1=False),
    "e2e_mask_rcnn_R_50_FPN_syncbn_2x_from_scratch.yaml": Expected("SyncBatchNorm", R50_EVERYWHERE),
    "e2e_mask_rcnn_R_50_FPN_syncbn_2x_fine_tune.yaml": Expected("SyncBatchNorm", R50_EVERYWHERE, stride_in_1x1=False),
    # maskrcnn-benchmark configs/gn_baselines: GN (32 groups) in body and FPN; the 2fc box head has
    # a GN after each fc, the 4conv1fc head one per conv; 4 in the mask head.
    "gn_baselines/e2e_faster_rcnn_R_50_FPN_1x_gn.yaml": Expected("GroupNorm", (53, 8, 2, 0), False, False),
    "gn_baselines/e2e_faster_rcnn_R_50_FPN_Xconv1fc_1x_gn.yaml": Expected("GroupNorm", (53, 8, 4, 0), False, False),
    "gn_baselines/e2e_mask_rcnn_R_50_FPN_1x_gn.yaml": Expected("GroupNorm", (53, 8, 2, 4), True, False),
    "gn_baselines/e2e_mask_rcnn_R_50_FPN_Xconv1fc_1x_gn.yaml": Expected("GroupNorm", (53, 8, 4, 4), True, False),
    "gn_baselines/scratch_e2e_faster_rcnn_R_50_FPN_3x_gn.yaml": Expected("GroupNorm", (53, 8, 2, 0), False, False),
    "gn_baselines/scratch_e2e_faster_rcnn_R_50_FPN_Xconv1fc_3x_gn.yaml": Expected("GroupNorm", (53, 8, 4, 0), False,
                                                                                  False),
    "gn_baselines/scratch_e2e_mask_rcnn_R_50_FPN_3x_gn.yaml": Expected("GroupNorm", (53, 8, 2, 4), True, False),
    "gn_baselines/scratch_e2e_mask_rcnn_R_50_FPN_Xconv1fc_3x_gn.yaml": Expected("GroupNorm", (53, 8, 4, 4), True,
                                                                                False),
}
OURS: Dict[str, Expected] = {
    "e2e_mask_rcnn_R_50_FPN_bn_2x_from_scratch.yaml": Expected("BatchNorm2d", R50_EVERYWHERE),
    "e2e_mask_rcnn_R_50_FPN_brn_2x_from_scratch.yaml": Expected("BatchRenorm2d", R50_EVERYWHERE),
    "e2e_mask_rcnn_R_50_FPN_gn_2x_from_scratch.yaml": Expected("GroupNorm", R50_EVERYWHERE),
    **{f"shapes/mask_rcnn_{norm}_tiny.yaml": Expected(name, (20, 8, 4, 4), stride_in_1x1=None)
       for norm, name in (("bn", "BatchNorm2d"), ("brn", "BatchRenorm2d"), ("gn", "GroupNorm"),
                          ("syncbn", "SyncBatchNorm"), ("mabn", "MABN2d"))},
}
EXPECTED = {**PUBLISHED, **OURS}


@pytest.fixture
def one_thread():
    """One intra-op thread: on a shared 2-core machine a second thread makes these steps far slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _name(path: str) -> str:
    return str((REPO / path).relative_to(CONFIG_DIR))


def test_every_config_file_is_listed_and_21_are_published():
    assert sorted(_name(path) for path in ALL_CONFIGS) == sorted(EXPECTED)
    assert len(PUBLISHED) == 21


def _conv_before(model: nn.Module, norm_name: str) -> nn.Module:
    """The conv that feeds the norm called ``norm_name`` (torchvision naming: bnK <- convK,
    Sequential index i <- i - 1)."""
    parent_name, _, attr = norm_name.rpartition(".")
    parent = model.get_submodule(parent_name)
    if attr.startswith("bn"):
        return getattr(parent, "conv" + attr[2:])
    return parent[int(attr) - 1]


def _check_norms(model: nn.Module, expected: Expected, gn_groups: int) -> None:
    parts = {"body": model.backbone.body, "fpn": model.backbone.fpn, "box": model.roi_heads.box_head,
             "mask": model.roi_heads.mask_head if expected.masks else None}
    counts = tuple(0 if part is None else sum(isinstance(m, NORM_LIKE) for m in part.modules())
                   for part in parts.values())
    assert counts == expected.counts
    norms = [m for m in model.modules() if isinstance(m, NORM_LIKE)]
    assert len(norms) == sum(counts) and {type(m).__name__ for m in norms} == {expected.norm}
    for part in (model.rpn.head, model.roi_heads.box_predictor, model.roi_heads.mask_predictor):
        assert part is None or not any(isinstance(m, NORM_LIKE) for m in part.modules())
    assert all((m.num_groups, m.eps) == (gn_groups, 1e-5) for m in norms if isinstance(m, nn.GroupNorm))
    cen_convs = sum(isinstance(m, mabn.CenConv2d) for m in model.modules())
    if expected.norm == "MABN2d":
        assert cen_convs == len(norms)
        for name, module in model.named_modules():
            if isinstance(module, mabn.MABN2d):
                assert isinstance(_conv_before(model, name), mabn.CenConv2d), name
                assert (module.B, module.real_B, module.momentum) == (2, 32, 0.98)
    else:
        assert cen_convs == 0
    if expected.counts[1] == 0:  # no FPN norm: convs with a (zero-initialized) bias, as published
        assert all(block[0].bias is not None for block in model.backbone.fpn.inner_blocks)


def _check_body_layout(model: nn.Module, expected: Expected) -> None:
    block = model.backbone.body.layer2[0]
    if expected.stride_in_1x1 is not None:
        strides = (block.conv1.stride, block.conv2.stride)
        assert strides == (((2, 2), (1, 1)) if expected.stride_in_1x1 else ((1, 1), (2, 2)))
        assert block.conv2.groups == expected.groups
        width = model.backbone.body.layer1[0].conv2.out_channels
        assert width == (256 if expected.groups == 32 else 64)  # 32 x 8 for ResNeXt-32x8d


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_config_builds_the_published_model_and_trains_a_step(name, one_thread):
    expected = EXPECTED[name]
    cfg = load_config(str(CONFIG_DIR / name), SMALL)
    assert cfg.MODEL.MASK_ON is expected.masks
    model = build_detection_model(cfg).train()
    _check_norms(model, expected, gn_groups=16 if name.startswith("shapes/") else 32)
    _check_body_layout(model, expected)
    images, targets = images_and_targets(((64, 80),))
    losses = model(images, targets)
    assert set(losses) == (LOSSES if expected.masks else LOSSES - {"loss_mask"})
    assert all(torch.isfinite(value) for value in losses.values())
    sum(losses.values()).backward()
    assert model.roi_heads.box_predictor.cls_score.weight.grad.abs().sum() > 0
    assert model.rpn.head.cls_logits.weight.grad.abs().sum() > 0


# Published maskrcnn-benchmark configs of models this project does not build (abridged to the
# lines that name the model; the rest of each file is the usual solver and data settings).
UNSUPPORTED = {
    "e2e_mask_rcnn_R_50_C4_1x": ("MODEL:\n  META_ARCHITECTURE: \"GeneralizedRCNN\"\n"
                                 "  WEIGHT: \"catalog://ImageNetPretrained/MSRA/R-50\"\n  RPN:\n"
                                 "    PRE_NMS_TOP_N_TEST: 6000\n    POST_NMS_TOP_N_TEST: 1000\n  ROI_MASK_HEAD:\n"
                                 "    PREDICTOR: \"MaskRCNNC4Predictor\"\n    SHARE_BOX_FEATURE_EXTRACTOR: True\n"
                                 "  MASK_ON: True\n", "a C4/C5 body (MODEL.BACKBONE.CONV_BODY 'R-50-C4')"),
    "e2e_keypoint_rcnn_R_50_FPN_1x": ("MODEL:\n  BACKBONE:\n    CONV_BODY: \"R-50-FPN\"\n  ROI_KEYPOINT_HEAD:\n"
                                      "    RESOLUTION: 56\n  KEYPOINT_ON: True\n", "keypoint R-CNN"),
    "retinanet_R-50-FPN_1x": ("MODEL:\n  RPN_ONLY: True\n  RETINANET_ON: True\n  BACKBONE:\n"
                              "    CONV_BODY: \"R-50-FPN-RETINANET\"\n", "RetinaNet"),
    "e2e_mask_rcnn_dconv_R_50_FPN_1x": ("MODEL:\n  BACKBONE:\n    CONV_BODY: \"R-50-FPN\"\n  RESNETS:\n"
                                        "    STAGE_WITH_DCN: (False, True, True, True)\n", "deformable convolutions"),
    "e2e_faster_rcnn_fbnet": ("MODEL:\n  BACKBONE:\n    CONV_BODY: FBNet\n  FBNET:\n    ARCH: \"default\"\n",
                              "FBNet"),
    "e2e_mask_rcnn_R-50-FPN_1x_test_time_aug": ("TEST:\n  BBOX_AUG:\n    ENABLED: True\n", "test-time augmentation"),
    "rpn_R_50_FPN_1x": ("MODEL:\n  RPN_ONLY: True\n  BACKBONE:\n    CONV_BODY: \"R-50-FPN\"\n", "RPN-only"),
}


@pytest.mark.parametrize("name", sorted(UNSUPPORTED))
def test_unsupported_published_config_is_refused_at_load_in_one_line(name, tmp_path):
    text, what = UNSUPPORTED[name]
    path = tmp_path / f"{name}.yaml"
    path.write_text(text)
    with pytest.raises(UserError) as info:
        load_config(str(path))
    message = str(info.value)
    assert "\n" not in message and message.startswith(str(path)) and what in message
    assert message.endswith(SUPPORTED)


def test_renamed_key_names_its_current_name(tmp_path):
    path = tmp_path / "old.yaml"
    path.write_text("MODEL:\n  BACKBONE:\n    CONV_BODY: \"R-50-FPN\"\n    OUT_CHANNELS: 256\n")
    with pytest.raises(UserError, match="MODEL.BACKBONE.OUT_CHANNELS .*renamed it MODEL.RESNETS.BACKBONE_OUT_CHANNELS"):
        load_config(str(path))


def test_unsupported_value_from_the_command_line_is_refused_at_load():
    with pytest.raises(UserError, match=r"with the command-line options: .*PREDICTOR 'FastRCNNPredictor', the C4 "
                                        r"predictor .* is not available \(FPN heads take 'FPNPredictor'\)"):
        load_config(str(CONFIG_DIR / "e2e_mask_rcnn_R_50_FPN_1x.yaml"),
                    ["MODEL.ROI_BOX_HEAD.PREDICTOR", "FastRCNNPredictor"])


def test_published_files_keep_published_values():
    x101 = load_config(str(CONFIG_DIR / "e2e_mask_rcnn_X_101_32x8d_FPN_1x.yaml"))
    assert (x101.MODEL.RESNETS.NUM_GROUPS, x101.MODEL.RESNETS.WIDTH_PER_GROUP) == (32, 8)
    assert (x101.SOLVER.BASE_LR, x101.SOLVER.IMS_PER_BATCH, x101.SOLVER.MAX_ITER) == (0.01, 8, 180000)
    assert x101.MODEL.WEIGHT == "catalog://ImageNetPretrained/FAIR/20171220/X-101-32x8d"
    r50 = load_config(str(CONFIG_DIR / "e2e_faster_rcnn_R_50_FPN_1x.yaml"))
    assert (r50.MODEL.BACKBONE.FREEZE_CONV_BODY_AT, r50.SOLVER.STEPS, r50.SOLVER.MAX_ITER) == (2, (60000, 80000), 90000)
    periodic = load_config(str(CONFIG_DIR / "e2e_mask_rcnn_R_50_FPN_1x_periodically_testing.yaml"))
    assert periodic.SOLVER.TEST_PERIOD == 2500
    scratch = load_config(str(CONFIG_DIR / "gn_baselines" / "scratch_e2e_mask_rcnn_R_50_FPN_Xconv1fc_3x_gn.yaml"))
    assert (scratch.MODEL.WEIGHT, scratch.MODEL.BACKBONE.FREEZE_CONV_BODY_AT) == ("", 0)
    assert (scratch.SOLVER.STEPS, scratch.SOLVER.MAX_ITER) == ((210000, 250000), 270000)
    assert scratch.MODEL.FPN.USE_GN and scratch.MODEL.ROI_BOX_HEAD.USE_GN and scratch.MODEL.ROI_MASK_HEAD.USE_GN
