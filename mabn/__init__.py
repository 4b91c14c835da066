"""MABN: Moving Average Batch Normalization (Yan et al., ICLR 2020) and the norms it is compared
with, plus the tools to put them into models and fold them away for inference."""
from mabn.batch_renorm import BatchRenorm1d, BatchRenorm2d, BatchRenorm3d
from mabn.cen_conv import CenConv1d, CenConv2d, CenConv3d, centralize_weight
from mabn.convert import (NormAct, NotConvertibleError, convert_conv, convert_norm, convert_sync_batchnorm,
                          is_batch_norm, is_mabn, mabn_running_var, revert_sync_batchnorm, skipped_updates)
from mabn.fold import fold_conv_norm, fold_norms
from mabn.factory import NORM_NAMES, get_norm, norm_class, resolve_norm_name
from mabn.loss_scale import GradScaleSync, set_grad_scale
from mabn.ghost_batchnorm import GhostBatchNorm1d, GhostBatchNorm2d, GhostBatchNorm3d
from mabn.moving_average_bn import MABN1d, MABN2d, MABN3d
from mabn.sync_batchnorm import SyncBatchNorm
from torchvision.ops.misc import FrozenBatchNorm2d

__version__ = "0.1.0"

__all__ = [
    "BatchRenorm1d", "BatchRenorm2d", "BatchRenorm3d",
    "CenConv1d", "CenConv2d", "CenConv3d", "centralize_weight",
    "FrozenBatchNorm2d", "GhostBatchNorm1d", "GhostBatchNorm2d", "GhostBatchNorm3d",
    "MABN1d", "MABN2d", "MABN3d",
    "NORM_NAMES", "NormAct", "NotConvertibleError", "SyncBatchNorm",
    "convert_conv", "convert_norm", "convert_sync_batchnorm", "fold_conv_norm", "fold_norms",
    "GradScaleSync", "get_norm", "is_batch_norm", "is_mabn", "mabn_running_var",
    "norm_class", "resolve_norm_name", "revert_sync_batchnorm", "set_grad_scale", "skipped_updates",
]
