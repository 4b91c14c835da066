"""MABN: Moving Average Batch Normalization and the norms it is compared with."""
from mabn.cen_conv import CenConv1d, CenConv2d, CenConv3d, centralize_weight
from mabn.moving_average_bn import MABN1d, MABN2d, MABN3d

__version__ = "0.1.0"
