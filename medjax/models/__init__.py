"""Flax Linen models: N-D layers (``layers``) and the U-Net (``unet``).

Depends only on jax, flax and numpy.
"""

from medjax.models.layers import (
    ACTIVATIONS,
    AttentionGate,
    Conv,
    ConvNormAct,
    ConvTranspose4,
    DownSample,
    Norm,
    ResidualBlock,
    StridedConv4,
    UpSample,
    conv_nd,
    depth_to_space,
    get_activation,
    match_spatial,
    space_to_depth,
)
from medjax.models.unet import ConvBlock, UNet, UNet2D, UNet2DSmall, UNet3D, UNet3DSmall

__all__ = [
    "ACTIVATIONS",
    "AttentionGate",
    "Conv",
    "ConvBlock",
    "ConvNormAct",
    "ConvTranspose4",
    "DownSample",
    "Norm",
    "ResidualBlock",
    "StridedConv4",
    "UNet",
    "UNet2D",
    "UNet2DSmall",
    "UNet3D",
    "UNet3DSmall",
    "UpSample",
    "conv_nd",
    "depth_to_space",
    "get_activation",
    "match_spatial",
    "space_to_depth",
]
