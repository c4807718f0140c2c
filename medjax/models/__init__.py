"""Flax Linen models: N-D layers (``layers``), the U-Net (``unet``), GAN generators and
discriminators (``dcgan``, ``generators``, ``discriminators``) and a CNN classifier
(``classifier``).

Depends only on jax, flax and numpy.
"""

from medjax.models.classifier import Classifier
from medjax.models.dcgan import (
    DCGANDiscriminator,
    DCGANGenerator,
    dcgan_num_upsamples,
    spectral_normed,
)
from medjax.models.discriminators import (
    PatchGAN,
    patchgan_output_shape,
    patchgan_receptive_field,
)
from medjax.models.generators import (
    PaddedConv,
    ResnetBlock,
    ResnetGenerator,
    UNetGenerator,
    conv_bias,
    gan_norm,
    reflect_pad,
)
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
    conv_im2col,
    conv_nd,
    conv_overlap_add,
    conv_space_to_depth,
    conv_stride_phases,
    conv_transpose4_overlap_add,
    conv_transpose4_shuffle,
    conv_winograd,
    depth_to_space,
    get_activation,
    match_spatial,
    max_pool,
    space_to_depth,
    winograd_convolutions,
)
from medjax.models.unet import ConvBlock, UNet, UNet2D, UNet2DSmall, UNet3D, UNet3DSmall

__all__ = [
    "ACTIVATIONS",
    "AttentionGate",
    "Classifier",
    "Conv",
    "ConvBlock",
    "ConvNormAct",
    "ConvTranspose4",
    "DCGANDiscriminator",
    "DCGANGenerator",
    "DownSample",
    "Norm",
    "PaddedConv",
    "PatchGAN",
    "ResidualBlock",
    "ResnetBlock",
    "ResnetGenerator",
    "StridedConv4",
    "UNet",
    "UNet2D",
    "UNet2DSmall",
    "UNet3D",
    "UNet3DSmall",
    "UNetGenerator",
    "UpSample",
    "conv_bias",
    "conv_im2col",
    "conv_nd",
    "conv_overlap_add",
    "conv_space_to_depth",
    "conv_stride_phases",
    "conv_transpose4_overlap_add",
    "conv_transpose4_shuffle",
    "conv_winograd",
    "dcgan_num_upsamples",
    "depth_to_space",
    "gan_norm",
    "get_activation",
    "match_spatial",
    "max_pool",
    "patchgan_output_shape",
    "patchgan_receptive_field",
    "reflect_pad",
    "space_to_depth",
    "spectral_normed",
    "winograd_convolutions",
]
