"""det.modeling: numbers from the config reach torchvision's modules; GroupNorm's group rule; train
and eval forwards on small images; freezing; the RPN's proposal budgets; bad names. (Every config
file builds and trains in test_det_published_configs.py; the initialization is in test_det_init.py.)"""
from __future__ import annotations

import pytest
import torch
from det_helpers import LOSSES, TINY_NORMS, images_and_targets, tiny_config, type_counts
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm
from torchvision.ops.misc import FrozenBatchNorm2d

import mabn
from det.config import load_config
from det.modeling import build_detection_model
from det.modeling.norms import body_spec
from det.modeling.rpn import first_per_level
from mabn.utils.errors import UserError

NORM_LIKE = (_BatchNorm, nn.GroupNorm, FrozenBatchNorm2d)


def test_frozen_bn_body_has_no_fpn_or_head_norms():
    cfg = tiny_config("bn", "MODEL.BACKBONE.CONV_BODY", "R-18-FPN", "MODEL.RESNETS.TRANS_FUNC",
                      "BasicBlockWithFixedBatchNorm", "MODEL.RESNETS.STEM_FUNC", "StemWithFixedBatchNorm",
                      "MODEL.ROI_BOX_HEAD.FEATURE_EXTRACTOR", "FPN2MLPFeatureExtractor",
                      "MODEL.ROI_MASK_HEAD.FEATURE_EXTRACTOR", "MaskRCNNFPNFeatureExtractor", "MODEL.FPN.USE_RELU", "True")
    model = build_detection_model(cfg)
    counts = type_counts(model)
    assert type_counts(model.backbone.fpn)["ReLU"] == 8
    assert counts["FrozenBatchNorm2d"] == 20 and sum(isinstance(m, NORM_LIKE) for m in model.modules()) == 20
    assert counts["TwoMLPHead"] == 1
    assert all(block[0].bias is not None for block in model.backbone.fpn.inner_blocks)


def test_config_numbers_reach_torchvision_modules():
    cfg = tiny_config("mabn", "MODEL.MABN.B", "1", "MODEL.MABN.REAL_B", "8", "MODEL.MABN.WARMUP_ITERS", "7",
                      "MODEL.MABN.MOMENTUM", "0.9", "MODEL.MABN.R_WARMUP_ITERS", "11", "MODEL.RPN.NMS_THRESH", "0.65",
                      "MODEL.ROI_HEADS.SCORE_THRESH", "0.1", "MODEL.RPN.MIN_SIZE", "2", fast=False)
    model = build_detection_model(cfg)
    layer = model.backbone.body.bn1
    assert (layer.B, layer.window, layer.warmup_iters, layer.momentum, layer.r_warmup_iters) == (1, 8, 7, 0.9, 11)
    assert not layer.fused_statistics
    fused = build_detection_model(tiny_config("mabn", "MODEL.MABN.FUSED_STATISTICS", "True", fast=False))
    assert fused.backbone.body.bn1.fused_statistics
    rpn, roi = model.rpn, model.roi_heads
    assert rpn._pre_nms_top_n == {"training": 300, "testing": 200}
    assert rpn._post_nms_top_n == {"training": 100, "testing": 50}
    assert (rpn.nms_thresh, rpn.min_size, rpn.fg_bg_sampler.batch_size_per_image) == (0.65, 2.0, 128)
    assert rpn.anchor_generator.sizes == ((16,), (32,), (64,), (128,), (256,))
    assert rpn.anchor_generator.aspect_ratios[0] == (0.5, 1.0, 2.0)
    assert (roi.score_thresh, roi.nms_thresh, roi.detections_per_img) == (0.1, 0.5, 30)
    assert roi.fg_bg_sampler.batch_size_per_image == 32 and roi.box_coder.weights == (10.0, 10.0, 5.0, 5.0)
    assert roi.box_roi_pool.featmap_names == ["0", "1", "2", "3"] and roi.box_roi_pool.output_size == (7, 7)
    assert roi.box_roi_pool.sampling_ratio == 2 and roi.mask_roi_pool.output_size == (14, 14)
    assert roi.box_predictor.cls_score.out_features == 4
    transform = model.transform
    assert (transform.min_size, transform.max_size) == ((96,), 160)
    model.eval()
    assert (transform.min_size, transform.max_size) == ((96,), 160) and transform.size_divisible == 32
    brn = build_detection_model(tiny_config("brn", fast=False)).backbone.body.bn1
    assert (brn.warmup_steps, brn.r_ramp_end, brn.d_ramp_end, brn.r_max, brn.d_max) == (89, 667, 444, 3.0, 5.0)
    gn = build_detection_model(tiny_config("gn", fast=False)).backbone.body.bn1
    assert gn.num_groups == 16


def _groupnorms(model: nn.Module):
    return [m for m in model.modules() if isinstance(m, nn.GroupNorm)]


def test_group_norm_rule_of_maskrcnn_benchmark():
    """GROUP_NORM.NUM_GROUPS groups, or channels / DIM_PER_GP; EPSILON; the older MODEL.GN.NUM_GROUPS."""
    per_group = build_detection_model(tiny_config("gn", "MODEL.GN.NUM_GROUPS", "32", "MODEL.GROUP_NORM.DIM_PER_GP",
                                                  "16", "MODEL.GROUP_NORM.NUM_GROUPS", "-1",
                                                  "MODEL.GROUP_NORM.EPSILON", "0.001"))
    norms = _groupnorms(per_group)
    assert len(norms) == 36 and all(m.num_groups == m.num_channels // 16 and m.eps == 0.001 for m in norms)
    assert {m.num_channels for m in norms} == {64, 128, 256, 512}
    counted = build_detection_model(tiny_config("gn", "MODEL.GN.NUM_GROUPS", "32", "MODEL.GROUP_NORM.NUM_GROUPS", "8"))
    assert {m.num_groups for m in _groupnorms(counted)} == {8}
    with pytest.raises(UserError, match="MODEL.GN.NUM_GROUPS 16 and MODEL.GROUP_NORM.NUM_GROUPS 8 disagree"):
        build_detection_model(tiny_config("gn", "MODEL.GROUP_NORM.NUM_GROUPS", "8"))
    with pytest.raises(UserError, match="MODEL.GROUP_NORM.DIM_PER_GP 48 does not divide the 64 channels"):
        build_detection_model(tiny_config("gn", "MODEL.GN.NUM_GROUPS", "32", "MODEL.GROUP_NORM.DIM_PER_GP", "48",
                                          "MODEL.GROUP_NORM.NUM_GROUPS", "-1"))


def test_use_gn_keys_put_group_norm_in_fpn_and_heads():
    cfg = tiny_config("bn", "MODEL.BACKBONE.CONV_BODY", "R-18-FPN", "MODEL.FPN.USE_GN", "True",
                      "MODEL.ROI_BOX_HEAD.FEATURE_EXTRACTOR", "FPN2MLPFeatureExtractor",
                      "MODEL.ROI_BOX_HEAD.USE_GN", "True",
                      "MODEL.ROI_MASK_HEAD.FEATURE_EXTRACTOR", "MaskRCNNFPNFeatureExtractor",
                      "MODEL.ROI_MASK_HEAD.USE_GN", "True")
    model = build_detection_model(cfg)
    assert sum(isinstance(m, nn.BatchNorm2d) for m in model.backbone.body.modules()) == 20
    counts = [len(_groupnorms(part)) for part in (model.backbone.fpn, model.roi_heads.box_head,
                                                  model.roi_heads.mask_head)]
    assert counts == [8, 2, 4]
    assert all(block[0].bias is None for block in model.backbone.fpn.inner_blocks)


def test_box_head_dilation():
    model = build_detection_model(tiny_config("gn", "MODEL.ROI_BOX_HEAD.DILATION", "2"))
    convs = [m for m in model.roi_heads.box_head.modules() if isinstance(m, nn.Conv2d)]
    assert len(convs) == 4 and all(c.dilation == (2, 2) and c.padding == (2, 2) for c in convs)
    images, targets = images_and_targets()
    assert set(model.train()(images, targets)) == LOSSES


def test_transform_uses_published_pixel_convention():
    model = build_detection_model(tiny_config("bn")).eval()
    image = torch.rand(3, 64, 80)
    normalized = model.transform.normalize(image)
    mean = torch.tensor([102.9801, 115.9465, 122.7717]).view(3, 1, 1)
    torch.testing.assert_close(normalized, image.flip(0) * 255 - mean)
    batch, _ = model.transform([image])
    assert batch.image_sizes == [(64, 80)] and batch.tensors.shape[-2:] == (64, 96)  # padded to 32


@pytest.mark.parametrize("norm", TINY_NORMS)
def test_train_forward_returns_the_five_losses(norm):
    model = build_detection_model(tiny_config(norm)).train()
    images, targets = images_and_targets()
    losses = model(images, targets)
    assert set(losses) == LOSSES
    assert all(torch.isfinite(value) for value in losses.values())
    sum(losses.values()).backward()
    assert model.backbone.body.conv1.weight.grad is not None
    assert model.roi_heads.mask_predictor.mask_fcn_logits.weight.grad.abs().sum() > 0


def test_eval_returns_detections_in_original_coordinates():
    cfg = tiny_config("mabn", "MODEL.ROI_HEADS.SCORE_THRESH", "0.0", "INPUT.MIN_SIZE_TEST", "96",
                      "INPUT.MAX_SIZE_TEST", "160")
    model = build_detection_model(cfg).eval()
    sizes = ((60, 90), (70, 50))
    images, _ = images_and_targets(sizes)
    batch, _ = model.transform(images)
    assert batch.image_sizes == [(96, 144), (134, 96)]  # resized internally
    with torch.no_grad():
        outputs = model(images)
    for (height, width), output in zip(sizes, outputs):
        assert set(output) == {"boxes", "labels", "scores", "masks"}
        count = len(output["scores"])
        assert 0 < count <= cfg.MODEL.ROI_HEADS.DETECTIONS_PER_IMG
        assert output["masks"].shape == (count, 1, height, width)
        boxes = output["boxes"]
        assert (boxes >= 0).all() and (boxes[:, 2] <= width).all() and (boxes[:, 3] <= height).all()
        assert boxes[:, 2].max() > 0.5 * width or boxes[:, 3].max() > 0.5 * height  # not left at the resized scale
        assert ((output["labels"] >= 1) & (output["labels"] <= 3)).all()


def test_freeze_conv_body_at():
    def trainable(model):
        body = model.backbone.body
        parts = {"stem": body.conv1, "layer1": body.layer1, "layer2": body.layer2, "layer4": body.layer4}
        return {name: all(p.requires_grad for p in part.parameters()) for name, part in parts.items()}

    frozen = build_detection_model(tiny_config("bn", "MODEL.BACKBONE.FREEZE_CONV_BODY_AT", "2"))
    assert trainable(frozen) == {"stem": False, "layer1": False, "layer2": True, "layer4": True}
    assert not frozen.backbone.body.bn1.weight.requires_grad
    assert all(p.requires_grad for p in frozen.backbone.fpn.parameters())
    for nothing in ("-1", "0"):
        model = build_detection_model(tiny_config("bn", "MODEL.BACKBONE.FREEZE_CONV_BODY_AT", nothing))
        assert all(trainable(model).values())
    stem_only = build_detection_model(tiny_config("bn", "MODEL.BACKBONE.FREEZE_CONV_BODY_AT", "1"))
    assert trainable(stem_only) == {"stem": False, "layer1": True, "layer2": True, "layer4": True}
    with pytest.raises(UserError, match="FREEZE_CONV_BODY_AT 6"):
        build_detection_model(tiny_config("bn", "MODEL.BACKBONE.FREEZE_CONV_BODY_AT", "6"))


@pytest.mark.parametrize("opts, message", [
    (["MODEL.RESNETS.TRANS_FUNC", "BasicBlockWithSyncBN"], "norms disagree.*MABN.*SyncBN"),
    (["MODEL.RESNETS.STEM_FUNC", "StemWithGN"], "norms disagree"),
    (["MODEL.RESNETS.TRANS_FUNC", "BottleneckWithMABN"], "whose blocks are BasicBlocks; use BasicBlockWithMABN"),
    (["MODEL.BACKBONE.CONV_BODY", "R-50-C4"], r"C4/C5 body \(MODEL.BACKBONE.CONV_BODY 'R-50-C4'\) is not available"),
    (["MODEL.BACKBONE.CONV_BODY", "R-18-FP"], r"this body \(MODEL.BACKBONE.CONV_BODY 'R-18-FP'\) is not available"),
    (["MODEL.BACKBONE.CONV_BODY", "R-42-FPN-MABN"], "depth 42"),
    (["MODEL.BACKBONE.CONV_BODY", "R-18-FPN-XBN"], "unknown norm 'XBN'"),
    (["MODEL.ROI_BOX_HEAD.FEATURE_EXTRACTOR", "FPNXconv1fcFrozenBNFeatureExtractor"], "FrozenBN in a randomly"),
    (["MODEL.ROI_MASK_HEAD.RESOLUTION", "14"], "RESOLUTION 14 must be 2 x POOLER_RESOLUTION"),
    (["MODEL.ROI_BOX_HEAD.POOLER_SCALES", "(0.3,)"], "POOLER_SCALES"),
    (["MODEL.RPN.ANCHOR_STRIDE", "(16,)"], "ANCHOR_STRIDE"),
    (["MODEL.RESNETS.RES2_OUT_CHANNELS", "256"], "RES2_OUT_CHANNELS 256 does not match R-18"),
    (["MODEL.MABN.REAL_B", "3"], "MODEL.MABN: .*multiple of B"),
    (["MODEL.RPN_ONLY", "True"], "RPN_ONLY"),
    (["INPUT.PIXEL_STD", "[1.0, 0.0, 1.0]"], "PIXEL_STD"),
    (["MODEL.BACKBONE.CONV_BODY", "R-18-FPN-GN", "MODEL.RESNETS.TRANS_FUNC", "BasicBlockWithGN",
      "MODEL.RESNETS.STEM_FUNC", "StemWithGN", "MODEL.GN.NUM_GROUPS", "48"], "NUM_GROUPS 48 does not divide"),
    (["MODEL.ROI_BOX_HEAD.PREDICTOR", "FastRCNNPredictor"], "'FastRCNNPredictor', the C4 predictor"),
    (["MODEL.FPN.USE_GN", "True"], "MODEL.FPN.USE_GN True asks for GroupNorm, but MODEL.BACKBONE.CONV_BODY "
                                   "'R-18-FPN-MABN' names MABN"),
    (["MODEL.ROI_BOX_HEAD.USE_GN", "True"], "ROI_BOX_HEAD.USE_GN True asks for GroupNorm, but .*names MABN"),
    (["MODEL.ROI_MASK_HEAD.USE_GN", "True"], "ROI_MASK_HEAD.USE_GN True asks for GroupNorm"),
    (["MODEL.ROI_BOX_HEAD.DILATION", "0"], "DILATION must be >= 1"),
    (["MODEL.GROUP_NORM.DIM_PER_GP", "16", "MODEL.ROI_BOX_HEAD.USE_GN", "True", "MODEL.ROI_BOX_HEAD.FEATURE_EXTRACTOR",
      "FPN2MLPFeatureExtractor"], "DIM_PER_GP 16 and NUM_GROUPS 32: exactly one of them must be -1"),
])
def test_bad_model_configs_are_one_line_errors(opts, message):
    with pytest.raises(UserError, match=message) as info:
        build_detection_model(tiny_config("mabn", *opts))
    assert "\n" not in str(info.value)


@pytest.mark.parametrize("depth", [34, 101, 152])
def test_published_body_names_of_other_depths(depth):
    cfg = load_config(None, ["MODEL.BACKBONE.CONV_BODY", f"R-{depth}-FPN-MABN", "MODEL.RESNETS.TRANS_FUNC",
                             ("BottleneckWithMABN" if depth >= 50 else "BasicBlockWithMABN"),
                             "MODEL.RESNETS.STEM_FUNC", "StemWithMABN"])
    parsed_depth, norm = body_spec(cfg)
    assert (parsed_depth, norm.name, norm.centralize_convs) == (depth, "MABN", True)
    assert isinstance(norm.layer(8), mabn.MABN2d)


def test_faster_rcnn_without_masks():
    model = build_detection_model(tiny_config("gn", "MODEL.MASK_ON", "False")).train()
    images, targets = images_and_targets()
    assert set(model(images, targets)) == LOSSES - {"loss_mask"}


@pytest.mark.parametrize("per_batch", [True, False])
def test_fpn_post_nms_top_n_per_batch_in_training(per_batch):
    cfg = tiny_config("gn", "MODEL.RPN.FPN_POST_NMS_TOP_N_TRAIN", "10", "MODEL.RPN.FPN_POST_NMS_TOP_N_TEST", "7",
                      "MODEL.RPN.FPN_POST_NMS_PER_BATCH", str(per_batch))
    model = build_detection_model(cfg).train()
    images, targets = images_and_targets()
    with torch.no_grad():
        batch, targets = model.transform(images, targets)
        features = model.backbone(batch.tensors)
        proposals, _ = model.rpn(batch, features, targets)
        counts = [len(p) for p in proposals]
        assert (sum(counts) == 10 and max(counts) < 10) if per_batch else counts == [10, 10]
        model.eval()
        assert [len(p) for p in model.rpn(batch, features)[0]] == [7, 7]  # per image at test


def test_first_per_level_keeps_order_and_cuts_each_level():
    levels = torch.tensor([0, 1, 0, 2, 1, 0, 1, 1])
    keep = torch.tensor([7, 0, 2, 4, 5, 6, 3, 1])  # in score order; levels 1, 0, 0, 1, 0, 1, 2, 1
    assert first_per_level(keep, levels, 2, 3).tolist() == [7, 0, 2, 4, 3]
    assert first_per_level(keep, levels, 8, 3).tolist() == keep.tolist()
    assert first_per_level(keep[:0], levels, 2, 3).numel() == 0


def test_post_nms_top_n_cuts_each_level_after_nms():
    cfg = tiny_config("gn", "MODEL.RPN.POST_NMS_TOP_N_TEST", "3", "MODEL.RPN.FPN_POST_NMS_TOP_N_TEST", "100",
                      "MODEL.RPN.PRE_NMS_TOP_N_TEST", "100")
    model = build_detection_model(cfg).eval()
    assert model.rpn.post_nms_top_n_per_level() == 3
    assert model.train().rpn.post_nms_top_n_per_level() == cfg.MODEL.RPN.POST_NMS_TOP_N_TRAIN
    model.eval()
    images, _ = images_and_targets()
    with torch.no_grad():
        batch, _ = model.transform(images)
        features = model.backbone(batch.tensors)
        cut = [len(p) for p in model.rpn(batch, features)[0]]
        model.rpn._post_nms_top_n_per_level = None
        uncut = [len(p) for p in model.rpn(batch, features)[0]]
    assert all(3 < count <= 3 * 5 for count in cut) and all(u > c for u, c in zip(uncut, cut))


@pytest.mark.parametrize("straddle_thresh", [0, -1])
def test_straddling_anchors_are_ignored_unless_disabled(straddle_thresh):
    model = build_detection_model(tiny_config("gn", "MODEL.RPN.STRADDLE_THRESH", str(straddle_thresh))).train()
    recorded = []
    sampler = model.rpn.fg_bg_sampler

    def record(labels):
        recorded.extend(label.clone() for label in labels)
        return sampler(labels)

    model.rpn.fg_bg_sampler = record
    images, targets = images_and_targets()
    with torch.no_grad():
        batch, targets = model.transform(images, targets)
        features = model.backbone(batch.tensors)
        model.rpn(batch, features, targets)
        anchors = model.rpn.anchor_generator(batch, list(features.values()))
    for labels, anchors_per_image, (height, width) in zip(recorded, anchors, batch.image_sizes):
        outside = ((anchors_per_image[:, :2] < 0).any(dim=1) | (anchors_per_image[:, 2] > width)
                   | (anchors_per_image[:, 3] > height))
        assert outside.any() and (~outside).any()
        if straddle_thresh == 0:
            assert (labels[outside] == -1).all()
        else:
            assert (labels[outside] == 0).any()  # torchvision's rule: straddling anchors can be negatives
        assert (labels[~outside] >= 0).any()
