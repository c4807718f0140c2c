"""The PyTorch references that `benchmarks/suite.py` times beside medjax, one full training step
each, at the shapes, batch, optimizer and thread count of the medjax step they face.

- U-Nets: MONAI's `BasicUNet` (instance norm, LeakyReLU, max-pool, transposed-conv up-sampling:
  the architecture of `medjax.models.UNet`) with MONAI's `DiceCELoss`, Adam.
- DCGAN: the canonical PyTorch DCGAN (pytorch/examples `dcgan/main.py`: transposed-conv generator
  with batch norm, strided-conv discriminator, BCE), Adam(2e-4, 0.5); one D step (real, then the
  detached fakes) and one G step.
- pix2pix / CycleGAN: the networks of pytorch-CycleGAN-and-pix2pix (`UnetGenerator` of
  `UnetSkipConnectionBlock`s, `ResnetGenerator` with reflection padding, `NLayerDiscriminator`),
  written here from their published definitions, and the update order of its `pix2pix_model` /
  `cycle_gan_model` (vanilla GAN + 100 L1; LSGAN + 10 cycle + 0.5 x 10 identity).

Needs the optional `bench` extra (`pip install -e .[bench]`: torch's CPU build and monai);
nothing in medjax imports this file.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import torch
from torch import nn


@dataclasses.dataclass
class TorchStep:
    """One training step of a PyTorch reference: `run()` does it; `flops` of one step (forward +
    backward) counted by `torch.utils.flop_counter.FlopCounterMode`; `params` counted."""

    run: Callable[[], None]
    params: int
    flops: float = 0.0


def _count(modules: list[nn.Module]) -> int:
    return sum(p.numel() for m in modules for p in m.parameters())


def _finish(run: Callable[[], None], modules: list[nn.Module]) -> TorchStep:
    from torch.utils.flop_counter import FlopCounterMode

    run()  # warm-up (allocator, oneDNN primitive caches)
    counter = FlopCounterMode(display=False)
    with counter:
        run()
    return TorchStep(run, _count(modules), float(counter.get_total_flops()))


# ---------------------------------------------------------------------------------------------
# U-Nets (MONAI)
# ---------------------------------------------------------------------------------------------


def unet_step(
    spatial_dims: int,
    batch: int,
    size: tuple[int, ...],
    in_channels: int,
    classes: int,
    features: tuple[int, ...],
) -> TorchStep:
    """MONAI `BasicUNet` + `DiceCELoss(include_background=False)` + Adam(1e-3)."""
    from monai.losses import DiceCELoss
    from monai.networks.nets import BasicUNet

    feats = tuple(features) + (features[0],) if len(features) == 5 else tuple(features)
    net = BasicUNet(spatial_dims, in_channels, classes, features=feats)
    loss = DiceCELoss(include_background=False, to_onehot_y=True, softmax=True)
    opt = torch.optim.Adam(net.parameters(), 1e-3)
    g = torch.Generator().manual_seed(0)
    x = torch.randn((batch, in_channels, *size), generator=g)
    y = torch.randint(0, classes, (batch, 1, *size), generator=g)
    net.train()

    def run() -> None:
        opt.zero_grad(set_to_none=True)
        loss(net(x), y).backward()
        opt.step()

    return _finish(run, [net])


# ---------------------------------------------------------------------------------------------
# DCGAN (pytorch/examples)
# ---------------------------------------------------------------------------------------------


def _dcgan_nets(nz: int, ngf: int, ndf: int, nc: int) -> tuple[nn.Module, nn.Module]:
    g = nn.Sequential(
        nn.ConvTranspose2d(nz, ngf * 8, 4, 1, 0, bias=False),
        nn.BatchNorm2d(ngf * 8),
        nn.ReLU(True),
        nn.ConvTranspose2d(ngf * 8, ngf * 4, 4, 2, 1, bias=False),
        nn.BatchNorm2d(ngf * 4),
        nn.ReLU(True),
        nn.ConvTranspose2d(ngf * 4, ngf * 2, 4, 2, 1, bias=False),
        nn.BatchNorm2d(ngf * 2),
        nn.ReLU(True),
        nn.ConvTranspose2d(ngf * 2, ngf, 4, 2, 1, bias=False),
        nn.BatchNorm2d(ngf),
        nn.ReLU(True),
        nn.ConvTranspose2d(ngf, nc, 4, 2, 1, bias=False),
        nn.Tanh(),
    )
    d = nn.Sequential(
        nn.Conv2d(nc, ndf, 4, 2, 1, bias=False),
        nn.LeakyReLU(0.2, inplace=True),
        nn.Conv2d(ndf, ndf * 2, 4, 2, 1, bias=False),
        nn.BatchNorm2d(ndf * 2),
        nn.LeakyReLU(0.2, inplace=True),
        nn.Conv2d(ndf * 2, ndf * 4, 4, 2, 1, bias=False),
        nn.BatchNorm2d(ndf * 4),
        nn.LeakyReLU(0.2, inplace=True),
        nn.Conv2d(ndf * 4, ndf * 8, 4, 2, 1, bias=False),
        nn.BatchNorm2d(ndf * 8),
        nn.LeakyReLU(0.2, inplace=True),
        nn.Conv2d(ndf * 8, 1, 4, 1, 0, bias=False),
    )
    return g, d


def dcgan_step(batch: int, channels: int = 3, nz: int = 100, ngf: int = 64, ndf: int = 64):
    """64x64 DCGAN: D on real then detached fakes, then G (BCE on logits, Adam(2e-4, 0.5))."""
    g, d = _dcgan_nets(nz, ngf, ndf, channels)
    bce = nn.BCEWithLogitsLoss()
    opt_g = torch.optim.Adam(g.parameters(), 2e-4, betas=(0.5, 0.999))
    opt_d = torch.optim.Adam(d.parameters(), 2e-4, betas=(0.5, 0.999))
    gen = torch.Generator().manual_seed(0)
    real = torch.rand((batch, channels, 64, 64), generator=gen) * 2 - 1
    ones, zeros = torch.ones(batch), torch.zeros(batch)

    def run() -> None:
        opt_d.zero_grad(set_to_none=True)
        bce(d(real).view(-1), ones).backward()
        fake = g(torch.randn(batch, nz, 1, 1))
        bce(d(fake.detach()).view(-1), zeros).backward()
        opt_d.step()
        opt_g.zero_grad(set_to_none=True)
        bce(d(fake).view(-1), ones).backward()
        opt_g.step()

    return _finish(run, [g, d])


# ---------------------------------------------------------------------------------------------
# pytorch-CycleGAN-and-pix2pix networks
# ---------------------------------------------------------------------------------------------


def _norm(kind: str, channels: int) -> nn.Module:
    if kind == "batch":
        return nn.BatchNorm2d(channels, affine=True, track_running_stats=True)
    return nn.InstanceNorm2d(channels, affine=False, track_running_stats=False)


class _SkipBlock(nn.Module):
    """`UnetSkipConnectionBlock`: down -> submodule -> up, concatenated with the input."""

    def __init__(self, outer, inner, input_nc=None, sub=None, outermost=False, innermost=False,
                 norm="batch", dropout=False):  # fmt: skip
        super().__init__()
        self.outermost = outermost
        bias = norm == "instance"
        input_nc = outer if input_nc is None else input_nc
        down = nn.Conv2d(input_nc, inner, 4, 2, 1, bias=bias)
        if outermost:
            up = nn.ConvTranspose2d(inner * 2, outer, 4, 2, 1)
            layers = [down, sub, nn.ReLU(True), up, nn.Tanh()]
        elif innermost:
            up = nn.ConvTranspose2d(inner, outer, 4, 2, 1, bias=bias)
            layers = [nn.LeakyReLU(0.2, True), down, nn.ReLU(True), up, _norm(norm, outer)]
        else:
            up = nn.ConvTranspose2d(inner * 2, outer, 4, 2, 1, bias=bias)
            layers = [nn.LeakyReLU(0.2, True), down, _norm(norm, inner), sub, nn.ReLU(True), up,
                      _norm(norm, outer)] + ([nn.Dropout(0.5)] if dropout else [])  # fmt: skip
        self.model = nn.Sequential(*layers)

    def forward(self, x):
        return self.model(x) if self.outermost else torch.cat([x, self.model(x)], 1)


def unet_generator(input_nc, output_nc, num_downs=8, ngf=64, norm="batch", dropout=True):
    block = _SkipBlock(ngf * 8, ngf * 8, innermost=True, norm=norm)
    for _ in range(num_downs - 5):
        block = _SkipBlock(ngf * 8, ngf * 8, sub=block, norm=norm, dropout=dropout)
    for mult in (4, 2, 1):
        block = _SkipBlock(ngf * mult, ngf * mult * 2, sub=block, norm=norm)
    return _SkipBlock(output_nc, ngf, input_nc=input_nc, sub=block, outermost=True, norm=norm)


class _ResnetBlock(nn.Module):
    def __init__(self, dim, norm):
        super().__init__()
        bias = norm == "instance"
        self.block = nn.Sequential(
            nn.ReflectionPad2d(1), nn.Conv2d(dim, dim, 3, bias=bias), _norm(norm, dim),
            nn.ReLU(True),
            nn.ReflectionPad2d(1), nn.Conv2d(dim, dim, 3, bias=bias), _norm(norm, dim),
        )  # fmt: skip

    def forward(self, x):
        return x + self.block(x)


def resnet_generator(input_nc, output_nc, ngf=64, n_blocks=9, norm="instance"):
    bias = norm == "instance"
    layers = [nn.ReflectionPad2d(3), nn.Conv2d(input_nc, ngf, 7, bias=bias), _norm(norm, ngf),
              nn.ReLU(True)]  # fmt: skip
    for i in range(2):
        m = 2**i
        layers += [nn.Conv2d(ngf * m, ngf * m * 2, 3, 2, 1, bias=bias), _norm(norm, ngf * m * 2),
                   nn.ReLU(True)]  # fmt: skip
    layers += [_ResnetBlock(ngf * 4, norm) for _ in range(n_blocks)]
    for i in range(2):
        m = 2 ** (2 - i)
        layers += [nn.ConvTranspose2d(ngf * m, ngf * m // 2, 3, 2, 1, output_padding=1, bias=bias),
                   _norm(norm, ngf * m // 2), nn.ReLU(True)]  # fmt: skip
    layers += [nn.ReflectionPad2d(3), nn.Conv2d(ngf, output_nc, 7), nn.Tanh()]
    return nn.Sequential(*layers)


def nlayer_discriminator(input_nc, ndf=64, n_layers=3, norm="batch"):
    bias = norm == "instance"
    layers = [nn.Conv2d(input_nc, ndf, 4, 2, 1), nn.LeakyReLU(0.2, True)]
    mult = 1
    for n in range(1, n_layers + 1):
        prev, mult = mult, min(2**n, 8)
        stride = 2 if n < n_layers else 1
        layers += [nn.Conv2d(ndf * prev, ndf * mult, 4, stride, 1, bias=bias),
                   _norm(norm, ndf * mult), nn.LeakyReLU(0.2, True)]  # fmt: skip
    layers += [nn.Conv2d(ndf * mult, 1, 4, 1, 1)]
    return nn.Sequential(*layers)


def _adam(*nets: nn.Module) -> torch.optim.Optimizer:
    return torch.optim.Adam([p for n in nets for p in n.parameters()], 2e-4, betas=(0.5, 0.999))


def _set_grad(nets, on: bool) -> None:
    for n in nets:
        for p in n.parameters():
            p.requires_grad = on


def pix2pix_step(batch: int, size: int, channels: int = 3, num_downs: int = 8) -> TorchStep:
    """pix2pix (U-Net generator, 70x70 PatchGAN on (A, B), vanilla GAN + 100 L1)."""
    g = unet_generator(channels, channels, num_downs)
    d = nlayer_discriminator(2 * channels)
    opt_g, opt_d = _adam(g), _adam(d)
    gan, l1 = nn.BCEWithLogitsLoss(), nn.L1Loss()
    gen = torch.Generator().manual_seed(0)
    a = torch.rand((batch, channels, size, size), generator=gen) * 2 - 1
    b = torch.rand((batch, channels, size, size), generator=gen) * 2 - 1

    def run() -> None:
        fake = g(a)
        _set_grad([d], True)
        opt_d.zero_grad(set_to_none=True)
        pf = d(torch.cat([a, fake.detach()], 1))
        pr = d(torch.cat([a, b], 1))
        (0.5 * (gan(pf, torch.zeros_like(pf)) + gan(pr, torch.ones_like(pr)))).backward()
        opt_d.step()
        _set_grad([d], False)
        opt_g.zero_grad(set_to_none=True)
        pf = d(torch.cat([a, fake], 1))
        (gan(pf, torch.ones_like(pf)) + 100.0 * l1(fake, b)).backward()
        opt_g.step()

    return _finish(run, [g, d])


def cyclegan_step(batch: int, size: int, channels: int = 3, n_blocks: int = 9) -> TorchStep:
    """CycleGAN (two ResNet generators, two PatchGANs, LSGAN, cycle 10, identity 0.5)."""
    g_a, g_b = (
        resnet_generator(channels, channels, n_blocks=n_blocks),
        resnet_generator(channels, channels, n_blocks=n_blocks),
    )
    d_a, d_b = (
        nlayer_discriminator(channels, norm="instance"),
        nlayer_discriminator(channels, norm="instance"),
    )
    opt_g, opt_d = _adam(g_a, g_b), _adam(d_a, d_b)
    mse, l1 = nn.MSELoss(), nn.L1Loss()
    gen = torch.Generator().manual_seed(0)
    real_a = torch.rand((batch, channels, size, size), generator=gen) * 2 - 1
    real_b = torch.rand((batch, channels, size, size), generator=gen) * 2 - 1

    def gan(pred, target: bool):
        return mse(pred, torch.full_like(pred, float(target)))

    def run() -> None:
        fake_b, fake_a = g_a(real_a), g_b(real_b)
        rec_a, rec_b = g_b(fake_b), g_a(fake_a)
        _set_grad([d_a, d_b], False)
        opt_g.zero_grad(set_to_none=True)
        idt = l1(g_a(real_b), real_b) * 5.0 + l1(g_b(real_a), real_a) * 5.0
        adv = gan(d_a(fake_b), True) + gan(d_b(fake_a), True)
        cyc = l1(rec_a, real_a) * 10.0 + l1(rec_b, real_b) * 10.0
        (idt + adv + cyc).backward()
        opt_g.step()
        _set_grad([d_a, d_b], True)
        opt_d.zero_grad(set_to_none=True)
        for d, real, fake in ((d_a, real_b, fake_b), (d_b, real_a, fake_a)):
            (0.5 * (gan(d(real), True) + gan(d(fake.detach()), False))).backward()
        opt_d.step()

    return _finish(run, [g_a, g_b, d_a, d_b])
