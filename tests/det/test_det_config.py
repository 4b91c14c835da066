"""det.config: defaults, published files, strict loading, every key read, data root, dataset catalog."""
from __future__ import annotations

import ast
import os

import pytest
from det_helpers import ALL_CONFIGS, CONFIG_DIR, REPO

from det.config import DATA_ROOT_ENV, all_keys, get_default_config, load_config
from det.config.paths_catalog import dataset_paths, registered_names
from mabn.utils.errors import UserError

PUBLISHED = ["e2e_mask_rcnn_R_50_FPN_mabn_2x_from_scratch.yaml", "e2e_mask_rcnn_R_50_FPN_mabn_2x_fine_tune.yaml",
             "e2e_mask_rcnn_R_50_FPN_syncbn_2x_from_scratch.yaml", "e2e_mask_rcnn_R_50_FPN_syncbn_2x_fine_tune.yaml"]


def test_defaults_are_maskrcnn_benchmark_and_new_keys():
    cfg = get_default_config()
    assert cfg.MODEL.BACKBONE.FREEZE_CONV_BODY_AT == 2
    assert cfg.MODEL.RPN.ANCHOR_SIZES == (32, 64, 128, 256, 512)
    assert cfg.MODEL.ROI_HEADS.BBOX_REG_WEIGHTS == (10.0, 10.0, 5.0, 5.0)
    assert cfg.INPUT.PIXEL_MEAN == [102.9801, 115.9465, 122.7717] and cfg.INPUT.TO_BGR255
    assert cfg.SOLVER.IMS_PER_BATCH == 16 and cfg.TEST.IMS_PER_BATCH == 8
    assert cfg.SOLVER.WARMUP_FACTOR == pytest.approx(1 / 3)
    assert (cfg.MODEL.MABN.B, cfg.MODEL.MABN.REAL_B, cfg.MODEL.MABN.WARMUP_ITERS, cfg.MODEL.MABN.MOMENTUM) == (2, 32, 100, 0.98)
    assert (cfg.MODEL.BRN.WARMUP_ITERS, cfg.MODEL.BRN.R_RAMP_END, cfg.MODEL.BRN.D_RAMP_END) == (5000, 40000, 25000)
    assert (cfg.MODEL.BRN.R_MAX, cfg.MODEL.BRN.D_MAX, cfg.MODEL.GN.NUM_GROUPS) == (3.0, 5.0, 32)
    group_norm = cfg.MODEL.GROUP_NORM
    assert (group_norm.DIM_PER_GP, group_norm.NUM_GROUPS, group_norm.EPSILON) == (-1, 32, 1e-5)
    assert not (cfg.MODEL.FPN.USE_GN or cfg.MODEL.ROI_BOX_HEAD.USE_GN or cfg.MODEL.ROI_MASK_HEAD.USE_GN)
    resnets = cfg.MODEL.RESNETS
    assert (cfg.MODEL.ROI_BOX_HEAD.DILATION, resnets.NUM_GROUPS, resnets.WIDTH_PER_GROUP) == (1, 1, 64)
    assert cfg.TEST.EXPECTED_RESULTS == [] and cfg.TEST.EXPECTED_RESULTS_SIGMA_TOL == 4.0


@pytest.mark.parametrize("name", PUBLISHED)
def test_published_configs_keep_published_values(name):
    cfg = load_config(str(CONFIG_DIR / name))
    norm = "MABN" if "mabn" in name else "SyncBN"
    assert cfg.MODEL.BACKBONE.CONV_BODY == f"R-50-FPN-{norm.upper()}"
    assert cfg.MODEL.RESNETS.TRANS_FUNC == f"BottleneckWith{norm}" and cfg.MODEL.BACKBONE.FREEZE_CONV_BODY_AT == -1
    assert cfg.MODEL.ROI_BOX_HEAD.FEATURE_EXTRACTOR == f"FPNXconv1fc{norm}FeatureExtractor"
    assert cfg.MODEL.ROI_MASK_HEAD.FEATURE_EXTRACTOR == f"MaskRCNNFPN{norm}FeatureExtractor"
    assert (cfg.SOLVER.BASE_LR, cfg.SOLVER.STEPS, cfg.SOLVER.MAX_ITER) == (0.02, (120000, 160000), 180000)
    assert (cfg.MODEL.RPN.PRE_NMS_TOP_N_TRAIN, cfg.MODEL.RPN.FPN_POST_NMS_TOP_N_TEST) == (2000, 1000)
    assert cfg.DATASETS.TRAIN == ("coco_2014_train", "coco_2014_valminusminival")
    assert cfg.DATALOADER.SIZE_DIVISIBILITY == 32 and cfg.MODEL.MASK_ON
    # Our ImageNet weights (cls, torchvision, R50-wc.pth) put the stride in the 3x3 conv.
    assert cfg.MODEL.RESNETS.STRIDE_IN_1X1 is ("fine_tune" not in name)
    assert bool(cfg.MODEL.WEIGHT) is ("fine_tune" in name)


@pytest.mark.parametrize("path", ALL_CONFIGS)
def test_every_config_loads_frozen(path):
    cfg = load_config(path)
    assert cfg.is_frozen()


def test_published_command_line_path_works_from_det_folder(monkeypatch):
    assert os.path.islink(REPO / "det" / "configs") and os.readlink(REPO / "det" / "configs") == "../configs/det"
    monkeypatch.chdir(REPO / "det")
    assert load_config("configs/e2e_mask_rcnn_R_50_FPN_mabn_2x_from_scratch.yaml").MODEL.MABN.B == 2
    monkeypatch.chdir(REPO.parent)  # elsewhere: found relative to the repository's configs/det
    assert load_config("configs/shapes/mask_rcnn_gn_tiny.yaml").MODEL.GN.NUM_GROUPS == 16


def test_missing_config_file_is_one_line_error():
    with pytest.raises(UserError, match="no such file"):
        load_config("configs/nope.yaml")


def test_opts_override_and_coerce_types():
    cfg = load_config(None, ["MODEL.RPN.NMS_THRESH", "0.6", "INPUT.MIN_SIZE_TRAIN", "(640, 672)",
                             "MODEL.MABN.B", "1"])
    assert cfg.MODEL.RPN.NMS_THRESH == 0.6 and cfg.INPUT.MIN_SIZE_TRAIN == (640, 672) and cfg.MODEL.MABN.B == 1


def test_float_keys_accept_float_values():
    cfg = load_config(None, ["SOLVER.WEIGHT_DECAY_BIAS", "0.0", "SOLVER.BIAS_LR_FACTOR", "1.5",
                             "MODEL.RPN.MIN_SIZE", "0.5"])
    assert (cfg.SOLVER.WEIGHT_DECAY_BIAS, cfg.SOLVER.BIAS_LR_FACTOR, cfg.MODEL.RPN.MIN_SIZE) == (0.0, 1.5, 0.5)


def test_integer_values_of_float_keys_become_floats(tmp_path):
    cfg = load_config(None, ["SOLVER.WEIGHT_DECAY_BIAS", "0", "SOLVER.BIAS_LR_FACTOR", "2"])
    assert type(cfg.SOLVER.WEIGHT_DECAY_BIAS) is float and cfg.SOLVER.BIAS_LR_FACTOR == 2.0
    path = tmp_path / "ints.yaml"
    path.write_text("SOLVER:\n  BASE_LR: 1\n  MAX_ITER: 10\n")
    cfg = load_config(str(path))
    assert type(cfg.SOLVER.BASE_LR) is float and type(cfg.SOLVER.MAX_ITER) is int
    with pytest.raises(UserError, match="SOLVER.MAX_ITER"):
        load_config(None, ["SOLVER.MAX_ITER", "1.5"])


# Counts, sizes, iterations and pixel offsets; every other numeric default must be a float, since
# yacs refuses a float on the command line where the default is an int.
INTEGER_KEYS = {
    "MODEL.BACKBONE.FREEZE_CONV_BODY_AT", "MODEL.RESNETS.NUM_GROUPS", "MODEL.RESNETS.WIDTH_PER_GROUP",
    "MODEL.RESNETS.BACKBONE_OUT_CHANNELS", "MODEL.RESNETS.RES2_OUT_CHANNELS", "MODEL.RESNETS.STEM_OUT_CHANNELS",
    "MODEL.GROUP_NORM.DIM_PER_GP", "MODEL.GROUP_NORM.NUM_GROUPS", "MODEL.ROI_BOX_HEAD.DILATION",
    "MODEL.MABN.B", "MODEL.MABN.REAL_B", "MODEL.MABN.WARMUP_ITERS", "MODEL.MABN.R_WARMUP_ITERS",
    "MODEL.BRN.WARMUP_ITERS", "MODEL.BRN.R_RAMP_END", "MODEL.BRN.D_RAMP_END", "MODEL.GN.NUM_GROUPS",
    "MODEL.RPN.STRADDLE_THRESH", "MODEL.RPN.BATCH_SIZE_PER_IMAGE", "MODEL.RPN.PRE_NMS_TOP_N_TRAIN",
    "MODEL.RPN.PRE_NMS_TOP_N_TEST", "MODEL.RPN.POST_NMS_TOP_N_TRAIN", "MODEL.RPN.POST_NMS_TOP_N_TEST",
    "MODEL.RPN.FPN_POST_NMS_TOP_N_TRAIN", "MODEL.RPN.FPN_POST_NMS_TOP_N_TEST",
    "MODEL.ROI_HEADS.BATCH_SIZE_PER_IMAGE", "MODEL.ROI_HEADS.DETECTIONS_PER_IMG",
    "MODEL.ROI_BOX_HEAD.POOLER_RESOLUTION", "MODEL.ROI_BOX_HEAD.POOLER_SAMPLING_RATIO",
    "MODEL.ROI_BOX_HEAD.NUM_CLASSES", "MODEL.ROI_BOX_HEAD.MLP_HEAD_DIM", "MODEL.ROI_BOX_HEAD.CONV_HEAD_DIM",
    "MODEL.ROI_BOX_HEAD.NUM_STACKED_CONVS", "MODEL.ROI_MASK_HEAD.POOLER_RESOLUTION",
    "MODEL.ROI_MASK_HEAD.POOLER_SAMPLING_RATIO", "MODEL.ROI_MASK_HEAD.RESOLUTION", "MODEL.ROI_MASK_HEAD.DILATION",
    "INPUT.MAX_SIZE_TRAIN", "INPUT.MIN_SIZE_TEST", "INPUT.MAX_SIZE_TEST", "DATALOADER.NUM_WORKERS",
    "DATALOADER.SIZE_DIVISIBILITY", "SOLVER.MAX_ITER", "SOLVER.WARMUP_ITERS", "SOLVER.CHECKPOINT_PERIOD",
    "SOLVER.TEST_PERIOD", "SOLVER.IMS_PER_BATCH", "TEST.IMS_PER_BATCH", "SEED",
}


def test_only_counts_and_sizes_have_integer_defaults():
    cfg = get_default_config()
    integers = set()
    for key in all_keys(cfg):
        value = cfg
        for part in key.split("."):
            value = value[part]
        if isinstance(value, int) and not isinstance(value, bool):
            integers.add(key)
    assert integers == INTEGER_KEYS

@pytest.mark.parametrize("key, closest", [("MODEL.RPN.NMS_THRES", "MODEL.RPN.NMS_THRESH"),
                                          ("MODEL.NMS_THRESH", "MODEL.RPN.NMS_THRESH"),
                                          ("MODEL.MABN.REALB", "MODEL.MABN.REAL_B")])
def test_unknown_opt_names_closest_key(key, closest):
    with pytest.raises(UserError) as info:
        load_config(None, [key, "1"])
    message = str(info.value)
    assert "\n" not in message and f"unknown config key {key}" in message and f"did you mean {closest}?" in message


def test_unknown_key_in_file_names_closest_key(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("MODEL:\n  BACKBONE:\n    CONV_BODY: R-50-FPN-MABN\n  RESNET:\n    STRIDE_IN_1X1: False\n")
    with pytest.raises(UserError, match=r"unknown config key MODEL\.RESNET in .*bad\.yaml; did you mean MODEL\.RESNETS\?"):
        load_config(str(path))


def test_duplicate_yaml_key_is_an_error(tmp_path):
    path = tmp_path / "twice.yaml"
    path.write_text("SOLVER:\n  BASE_LR: 0.02\n  MAX_ITER: 10\n  BASE_LR: 0.01\n")
    with pytest.raises(UserError, match="'BASE_LR' appears twice .*lines 2 and 4"):
        load_config(str(path))


def test_bad_values_and_odd_opts_are_user_errors(tmp_path):
    with pytest.raises(UserError, match="MODEL.RPN.NMS_THRESH"):
        load_config(None, ["MODEL.RPN.NMS_THRESH", "high"])
    with pytest.raises(UserError, match="KEY VALUE pairs"):
        load_config(None, ["MODEL.RPN.NMS_THRESH"])
    path = tmp_path / "broken.yaml"
    path.write_text("MODEL: [1, 2\n")
    with pytest.raises(UserError, match="not valid yaml"):
        load_config(str(path))


def test_data_root_from_environment(monkeypatch, tmp_path):
    monkeypatch.setenv(DATA_ROOT_ENV, str(tmp_path))
    assert load_config(None).DATASETS.ROOT == str(tmp_path)
    assert load_config(None, ["DATASETS.ROOT", "/data"]).DATASETS.ROOT == "/data"
    monkeypatch.delenv(DATA_ROOT_ENV)
    assert get_default_config().DATASETS.ROOT == "datasets"


def test_paths_catalog_published_layout():
    paths = dataset_paths("coco_2014_minival", "/data")
    assert paths == {"img_dir": "/data/coco/val2014", "ann_file": "/data/coco/annotations/instances_minival2014.json"}
    assert {"coco_2014_train", "coco_2014_valminusminival", "coco_2017_val", "shapes_train"} <= set(registered_names())
    with pytest.raises(UserError, match="unknown dataset 'coco_2015'.*registered: .*coco_2014_minival"):
        dataset_paths("coco_2015", "/data")


def _attribute_reads() -> set:
    """(section, key) of every attribute read in det/ outside defaults.py: ``cfg.MODEL.RPN.NMS_THRESH``
    gives (RPN, NMS_THRESH), and so does ``rpn.NMS_THRESH`` after ``rpn = cfg.MODEL.RPN`` or in a
    function whose parameter ``rpn`` is given the section."""
    pairs = set()
    for path in (REPO / "det").rglob("*.py"):
        if path.name == "defaults.py":
            continue
        tree = ast.parse(path.read_text())
        aliases = {}
        for node in ast.walk(tree):
            if isinstance(node, ast.Assign) and isinstance(node.value, ast.Attribute):
                for target in node.targets:
                    if isinstance(target, ast.Name):
                        aliases.setdefault(target.id, set()).add(node.value.attr)
        for node in ast.walk(tree):
            if isinstance(node, ast.Attribute):
                owner = node.value
                if isinstance(owner, ast.Attribute):
                    pairs.add((owner.attr, node.attr))
                elif isinstance(owner, ast.Name):
                    names = aliases.get(owner.id, set()) | {owner.id, owner.id.upper()}
                    pairs.update((name, node.attr) for name in names)
    return pairs


def test_every_default_key_is_read_by_the_code():
    """No key is accepted and ignored: each leaf of the defaults is read, as SECTION.KEY, somewhere
    in det/ (keys of models that are not built are not in the defaults: det.config.support refuses them)."""
    reads = _attribute_reads()
    unread = []
    for key in all_keys(get_default_config()):
        parts = key.split(".")
        if len(parts) == 1:
            found = any(attr == key for _, attr in reads)
        else:
            found = (parts[-2], parts[-1]) in reads
        if not found:
            unread.append(key)
    assert unread == []


def test_keys_of_unbuilt_models_are_refused_by_name(tmp_path):
    path = tmp_path / "jitter.yaml"
    path.write_text("INPUT:\n  BRIGHTNESS: 0.2\n")
    with pytest.raises(UserError, match=r"INPUT.BRIGHTNESS belongs to maskrcnn-benchmark's colour-jitter augmentation, "
                                        r"which is not available; this project builds"):
        load_config(str(path))
    with pytest.raises(UserError, match=r"^the command-line options: MODEL.KEYPOINT_ON belongs to "
                                        r"maskrcnn-benchmark's keypoint R-CNN"):
        load_config(None, ["MODEL.KEYPOINT_ON", "True"])


def test_a_file_without_a_model_section_is_not_checked_as_a_model(tmp_path):
    path = tmp_path / "solver.yaml"
    path.write_text("SOLVER:\n  BASE_LR: 0.01\n")
    assert load_config(str(path)).MODEL.BACKBONE.CONV_BODY == "R-50-C4"  # the default; refused when built


def test_all_keys_lists_leaves():
    keys = all_keys(get_default_config())
    assert "MODEL.MABN.R_WARMUP_ITERS" in keys and "MODEL" not in keys and len(keys) == len(set(keys))
