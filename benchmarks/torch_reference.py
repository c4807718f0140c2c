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
nothing in medjax imports this file. `use("cuda", torch.bfloat16)` first builds every later step
on a GPU under bf16 autocast (the suite does, when JAX's default backend is a GPU).
"""

from __future__ import annotations

import contextlib
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


# Where the steps run, and the dtype autocast computes in (None: float32 throughout).
_DEVICE = torch.device("cpu")
_AUTOCAST: torch.dtype | None = None


def use(device: str = "cpu", autocast: torch.dtype | None = None) -> None:
    """Builds the steps that follow on `device` (their networks, data and every tensor they
    make) and runs each under `torch.autocast(device, autocast)` when given: bf16 mixed
    precision as PyTorch recommends it (float32 parameters and optimizer, the autocast ops in
    bf16, no loss scaling; the backward passes follow the forward's dtypes)."""
    global _DEVICE, _AUTOCAST
    _DEVICE, _AUTOCAST = torch.device(device), autocast
    torch.set_default_device(_DEVICE)
    if _DEVICE.type == "cuda":
        torch.backends.cudnn.benchmark = True  # cuDNN's kernels timed per shape, as XLA's are


def _generator(seed: int = 0) -> torch.Generator:
    return torch.Generator(device=_DEVICE).manual_seed(seed)


def _count(modules: list[nn.Module]) -> int:
    return sum(p.numel() for m in modules for p in m.parameters())


def _finish(step: Callable[[], None], modules: list[nn.Module]) -> TorchStep:
    """The TorchStep of `step` (run under the autocast of `use`; on a GPU it returns once the
    step's kernels finished, as the medjax step it faces is waited for)."""
    from torch.utils.flop_counter import FlopCounterMode

    device, dtype = _DEVICE, _AUTOCAST

    def run() -> None:
        cast = torch.autocast(device.type, dtype) if dtype else contextlib.nullcontext()
        with cast:
            step()
        if device.type == "cuda":
            torch.cuda.synchronize(device)

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
    g = _generator()
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
    gen = _generator()
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


def _norm(kind: str, channels: int, dims: int = 2) -> nn.Module:
    if kind == "batch":
        return (nn.BatchNorm2d, nn.BatchNorm3d)[dims - 2](channels)
    return (nn.InstanceNorm2d, nn.InstanceNorm3d)[dims - 2](channels)


def _conv(dims: int, transpose: bool = False) -> type[nn.Module]:
    if transpose:
        return (nn.ConvTranspose2d, nn.ConvTranspose3d)[dims - 2]
    return (nn.Conv2d, nn.Conv3d)[dims - 2]


class _SkipBlock(nn.Module):
    """`UnetSkipConnectionBlock`: down -> submodule -> up, concatenated with the input."""

    def __init__(self, outer, inner, input_nc=None, sub=None, outermost=False, innermost=False,
                 norm="batch", dropout=False, dims=2):  # fmt: skip
        super().__init__()
        self.outermost = outermost
        bias = norm == "instance"
        input_nc = outer if input_nc is None else input_nc
        conv, convt = _conv(dims), _conv(dims, transpose=True)
        down = conv(input_nc, inner, 4, 2, 1, bias=bias)
        if outermost:
            up = convt(inner * 2, outer, 4, 2, 1)
            layers = [down, sub, nn.ReLU(True), up, nn.Tanh()]
        elif innermost:
            up = convt(inner, outer, 4, 2, 1, bias=bias)
            layers = [nn.LeakyReLU(0.2, True), down, nn.ReLU(True), up, _norm(norm, outer, dims)]
        else:
            up = convt(inner * 2, outer, 4, 2, 1, bias=bias)
            layers = [nn.LeakyReLU(0.2, True), down, _norm(norm, inner, dims), sub, nn.ReLU(True),
                      up, _norm(norm, outer, dims)]  # fmt: skip
            layers += [nn.Dropout(0.5)] if dropout else []
        self.model = nn.Sequential(*layers)

    def forward(self, x):
        return self.model(x) if self.outermost else torch.cat([x, self.model(x)], 1)


def unet_generator(input_nc, output_nc, num_downs=8, ngf=64, norm="batch", dropout=True, dims=2):
    """`UnetGenerator`; level i has min(ngf * 2^i, 8 ngf) channels (for num_downs >= 5 exactly
    the repository's nesting; fewer levels, as Vox2Vox uses, keep the same rule)."""
    feats = [min(ngf * 2**i, ngf * 8) for i in range(num_downs)]
    kw = dict(norm=norm, dims=dims)
    block = _SkipBlock(feats[-2], feats[-1], innermost=True, **kw)
    for i in range(num_downs - 2, 0, -1):
        drop = dropout and i >= 4  # the num_downs - 5 `use_dropout` blocks
        block = _SkipBlock(feats[i - 1], feats[i], sub=block, dropout=drop, **kw)
    return _SkipBlock(output_nc, ngf, input_nc=input_nc, sub=block, outermost=True, **kw)


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


def nlayer_discriminator(input_nc, ndf=64, n_layers=3, norm="batch", dims=2):
    bias = norm == "instance"
    conv = _conv(dims)
    layers = [conv(input_nc, ndf, 4, 2, 1), nn.LeakyReLU(0.2, True)]
    mult = 1
    for n in range(1, n_layers + 1):
        prev, mult = mult, min(2**n, 8)
        stride = 2 if n < n_layers else 1
        layers += [conv(ndf * prev, ndf * mult, 4, stride, 1, bias=bias),
                   _norm(norm, ndf * mult, dims), nn.LeakyReLU(0.2, True)]  # fmt: skip
    layers += [conv(ndf * mult, 1, 4, 1, 1)]
    return nn.Sequential(*layers)


def _adam(*nets: nn.Module) -> torch.optim.Optimizer:
    return torch.optim.Adam([p for n in nets for p in n.parameters()], 2e-4, betas=(0.5, 0.999))


def _set_grad(nets, on: bool) -> None:
    for n in nets:
        for p in n.parameters():
            p.requires_grad = on


def pix2pix_step(
    batch: int,
    size: int | tuple[int, ...],
    channels: int = 3,
    num_downs: int = 8,
    *,
    target_channels: int | None = None,
    ngf: int = 64,
    ndf: int = 64,
    norm: str = "batch",
    recon_weight: float = 100.0,
) -> TorchStep:
    """pix2pix (U-Net generator, 70x70 PatchGAN on (A, B), vanilla GAN + 100 L1); `size` a
    tuple of three gives the 3D version (Vox2Vox: Conv3d everywhere)."""
    shape = (size, size) if isinstance(size, int) else tuple(size)
    dims, out = len(shape), channels if target_channels is None else target_channels
    g = unet_generator(channels, out, num_downs, ngf, norm, dims=dims)
    d = nlayer_discriminator(channels + out, ndf, norm=norm, dims=dims)
    opt_g, opt_d = _adam(g), _adam(d)
    gan, l1 = nn.BCEWithLogitsLoss(), nn.L1Loss()
    gen = _generator()
    a = torch.rand((batch, channels, *shape), generator=gen) * 2 - 1
    b = torch.rand((batch, out, *shape), generator=gen) * 2 - 1

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
        (gan(pf, torch.ones_like(pf)) + recon_weight * l1(fake, b)).backward()
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
    gen = _generator()
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


# ---------------------------------------------------------------------------------------------
# WGAN-GP (Gulrajani et al. 2017) and the classifier
# ---------------------------------------------------------------------------------------------


def wgan_gp_step(
    critic_batch: int,
    channels: int = 1,
    n_critic: int = 5,
    nz: int = 100,
    ngf: int = 32,
    ndf: int = 64,
    gp_weight: float = 10.0,
) -> TorchStep:
    """64x64 WGAN-GP: the DCGAN nets with the critic's batch norm removed (as the paper
    prescribes), `n_critic` critic updates on fresh real batches, each with the gradient
    penalty at random interpolates (`torch.autograd.grad(create_graph=True)`), then one
    generator update; Adam(1e-4, 0, 0.9)."""
    g, d = _dcgan_nets(nz, ngf, ndf, channels)
    d = nn.Sequential(*[m for m in d if not isinstance(m, nn.BatchNorm2d)])
    opt_g = torch.optim.Adam(g.parameters(), 1e-4, betas=(0.0, 0.9))
    opt_d = torch.optim.Adam(d.parameters(), 1e-4, betas=(0.0, 0.9))
    gen = _generator()
    reals = torch.rand((n_critic, critic_batch, channels, 64, 64), generator=gen) * 2 - 1

    def run() -> None:
        for real in reals:
            opt_d.zero_grad(set_to_none=True)
            with torch.no_grad():
                fake = g(torch.randn(critic_batch, nz, 1, 1))
            eps = torch.rand(critic_batch, 1, 1, 1)
            # A non-leaf input: FlopCounterMode's module hooks refuse autograd.grad of a leaf.
            x_hat = (eps * real + (1 - eps) * fake).requires_grad_(True) * 1.0
            (grad,) = torch.autograd.grad(d(x_hat).sum(), x_hat, create_graph=True)
            gp = ((grad.flatten(1).norm(dim=1) - 1) ** 2).mean()
            (d(fake).mean() - d(real).mean() + gp_weight * gp).backward()
            opt_d.step()
        opt_g.zero_grad(set_to_none=True)
        (-d(g(torch.randn(critic_batch, nz, 1, 1))).mean()).backward()
        opt_g.step()

    return _finish(run, [g, d])


def classifier_step(
    batch: int, size: tuple[int, ...], channels: int, classes: int, features=(32, 64, 128),
    dropout: float = 0.2,
) -> TorchStep:  # fmt: skip
    """The VGG-style classifier of `medjax.models.Classifier`: per stage two (3^d conv + batch
    norm + ReLU), 2x max-pool between stages, global average pooling, dropout, linear;
    cross-entropy, Adam(1e-3)."""
    dims = len(size)
    conv, pool = _conv(dims), (nn.MaxPool2d, nn.MaxPool3d)[dims - 2]
    layers, cin = [], channels
    for s, f in enumerate(features):
        if s:
            layers.append(pool(2))
        for _ in range(2):
            layers += [conv(cin, f, 3, 1, 1, bias=False), _norm("batch", f, dims), nn.ReLU(True)]
            cin = f
    layers += [nn.AdaptiveAvgPool2d(1) if dims == 2 else nn.AdaptiveAvgPool3d(1), nn.Flatten(),
               nn.Dropout(dropout), nn.Linear(cin, classes)]  # fmt: skip
    net = nn.Sequential(*layers)
    opt = torch.optim.Adam(net.parameters(), 1e-3)
    gen = _generator()
    x = torch.randn((batch, channels, *size), generator=gen)
    y = torch.randint(0, classes, (batch,), generator=gen)
    ce = nn.CrossEntropyLoss()
    net.train()

    def run() -> None:
        opt.zero_grad(set_to_none=True)
        ce(net(x), y).backward()
        opt.step()

    return _finish(run, [net])
