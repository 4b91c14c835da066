"""MABN: Moving Average Batch Normalization and the norms it is compared with."""
from mabn.cen_conv import CenConv1d, CenConv2d, CenConv3d, centralize_weight

__version__ = "0.1.0"
