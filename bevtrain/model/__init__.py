"""The Simple-BEV family segmentation network."""

from bevtrain.model.encoders import ENCODER_TYPES, build_encoder
from bevtrain.model.lift import feature_pix_T_ref, fold_y_into_channels, lift_features, lift_reference
from bevtrain.model.segnet import Segnet

__all__ = [
    "ENCODER_TYPES",
    "Segnet",
    "build_encoder",
    "feature_pix_T_ref",
    "fold_y_into_channels",
    "lift_features",
    "lift_reference",
]
