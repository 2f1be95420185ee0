"""The network: a time-embedded residual U-Net, x0_hat = UNet(x_t, t), or UNet(x_t, t, y) with a class y.

It owns nothing of the noise process. It is given a noisy image ``x_t`` and the
integer timestep ``t`` and returns an image of the same shape; how ``x_t`` was
made and what ``t`` means live in ``ddpm/diffusion.py``.

The layout follows the U-Net of DDPM (Ho et al. 2020, appendix B), which in
turn follows PixelCNN++ and the original U-Net (Ronneberger et al. 2015),
scaled down for one image on a laptop: one ResBlock per level instead of two,
no dropout, and by default no self-attention:

    timestep t --sinusoidal embedding--> MLP --> temb (injected into every ResBlock)
    class y    --embedding table-------> + temb      (num_classes set: a conditional model)

    x_t -> conv_in -> [ResBlock -> Down] * (levels - 1) -> ResBlock      encoder
                   -> ResBlock -> ResBlock                               middle
                   -> [concat skip -> ResBlock -> Up] * (levels - 1)
                   -> concat skip -> ResBlock -> GroupNorm/SiLU/conv_out -> x0_hat

With ``channel_mults = (1, 2, 4, 8)`` there are four levels; each Down halves
the height and width, so the image side must be divisible by 2 ** 3 = 8.

Global context. A stack of 3x3 convolutions sees a bounded window of its input
(its receptive field): about 217 px for the default network, less than a
256 px image. From pure noise (w = 1) the input says nothing about the
picture, so a pixel in the middle cannot tell where it is, and the network
can only return the average colour there. Three options, each off by
default and recorded in ``config``, give it context:

    attention=True   self-attention between the middle ResBlocks, at the lowest
                     level (DDPM's AttnBlock): every position sees every other
    coords=True      two more input channels holding each pixel's (y, x) in
                     [-1, 1] (CoordConv, Liu et al. 2018): position as data
    canvas_size=S    a learned S x S image B added to the output,
                     x0_hat = unet(x_t, t) + B: a stored picture at full
                     resolution, for a network trained on one image size

Classes. With ``num_classes=K`` the network also takes a class y in {0, ..., K}:
a learned vector per class is added to the time embedding, so every ResBlock
hears what to draw as it hears how noisy the input is. The extra index K is
the "no class" of classifier-free guidance (Ho and Salimans 2022), a learned
vector too; ``y=None`` means K for the whole batch. ddpm/guidance.py trains and
samples with it.
"""

import math

import torch
from torch import nn
import torch.nn.functional as F

GROUPS = 8  # GroupNorm groups; every width in the network must divide by it


def timestep_embedding(t, dim):
    """Sinusoidal embedding of integer timesteps (Vaswani et al. 2017, sec. 3.5).

    t: (B,) integer or float tensor.  Returns (B, dim) float32, the first half
    sines and the second half cosines of t at geometrically spaced frequencies
    from 1 down to 1/10000.
    """
    half = dim // 2
    freqs = torch.exp(-math.log(10000.0) * torch.arange(half, device=t.device) / half)  # (dim/2,)
    angles = t.float()[:, None] * freqs[None, :]  # (B, dim/2)
    return torch.cat([torch.sin(angles), torch.cos(angles)], dim=1)  # (B, dim)


class GroupNorm(nn.GroupNorm):
    """nn.GroupNorm that normalises in float32, also inside a bf16 autocast region (ddpm/precision.py).

    There PyTorch would take the mean and variance of a bf16 input and return bf16; with float32 in,
    it normalises in float32, and the convolution after it casts to bf16 itself. Outside autocast its
    input is float32 already, and it is nn.GroupNorm to the bit.
    """

    in_fp32 = True  # benchmarks/precision.py turns it off to measure what bf16 normalisation costs

    def forward(self, x):
        return super().forward(x.float() if self.in_fp32 else x)


class ResBlock(nn.Module):
    """GroupNorm -> SiLU -> conv3x3, + time embedding, GroupNorm -> SiLU -> conv3x3, + shortcut."""

    def __init__(self, in_ch, out_ch, temb_dim):
        super().__init__()
        self.norm1 = GroupNorm(GROUPS, in_ch)
        self.conv1 = nn.Conv2d(in_ch, out_ch, 3, padding=1)
        self.temb_proj = nn.Linear(temb_dim, out_ch)
        self.norm2 = GroupNorm(GROUPS, out_ch)
        self.conv2 = nn.Conv2d(out_ch, out_ch, 3, padding=1)
        # a 1x1 conv matches the channel count of the residual path when it changes
        self.shortcut = nn.Conv2d(in_ch, out_ch, 1) if in_ch != out_ch else nn.Identity()

    def forward(self, x, temb):
        """x: (B, in_ch, H, W), temb: (B, temb_dim) -> (B, out_ch, H, W)."""
        h = self.conv1(F.silu(self.norm1(x)))  # (B, out_ch, H, W)
        h = h + self.temb_proj(F.silu(temb))[:, :, None, None]  # tell the block how noisy x is
        h = self.conv2(F.silu(self.norm2(h)))  # (B, out_ch, H, W)
        return h + self.shortcut(x)


class Down(nn.Module):
    """Halve height and width with a stride-2 3x3 conv (channels unchanged)."""

    def __init__(self, ch):
        super().__init__()
        self.conv = nn.Conv2d(ch, ch, 3, stride=2, padding=1)

    def forward(self, x):
        return self.conv(x)  # (B, C, H, W) -> (B, C, H/2, W/2)


class Up(nn.Module):
    """Double height and width: nearest-neighbour upsampling, then a 3x3 conv."""

    def __init__(self, ch):
        super().__init__()
        self.conv = nn.Conv2d(ch, ch, 3, padding=1)

    def forward(self, x):
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))  # (B, C, 2H, 2W)


class AttentionBlock(nn.Module):
    """Self-attention over the H * W positions of a feature map, with a residual (DDPM's AttnBlock).

    GroupNorm, then queries, keys and values from 1x1 convs, softmax(q k^T / sqrt(C)) v, a 1x1
    projection started at zero (the block begins as the identity, as in DDPM), added to the input.
    It knows nothing of position: permuting the positions of its input permutes its output alike.
    """

    def __init__(self, ch):
        super().__init__()
        self.norm = GroupNorm(GROUPS, ch)
        self.qkv = nn.Conv2d(ch, 3 * ch, 1)
        self.proj_out = nn.Conv2d(ch, ch, 1)
        nn.init.zeros_(self.proj_out.weight)
        nn.init.zeros_(self.proj_out.bias)

    def forward(self, x):
        """x: (B, C, H, W) -> (B, C, H, W)."""
        B, C, H, W = x.shape
        q, k, v = self.qkv(self.norm(x)).reshape(B, 3, C, H * W).transpose(2, 3).unbind(1)  # each (B, HW, C)
        h = F.scaled_dot_product_attention(q, k, v)  # softmax(q k^T / sqrt(C)) v, (B, HW, C)
        return x + self.proj_out(h.transpose(1, 2).reshape(B, C, H, W))


def coordinate_channels(x):
    """Each pixel's (y, x) position in [-1, 1], as two channels shaped like x: (B, 2, H, W)."""
    B, _, H, W = x.shape
    ys = torch.linspace(-1.0, 1.0, H, device=x.device, dtype=x.dtype)
    xs = torch.linspace(-1.0, 1.0, W, device=x.device, dtype=x.dtype)
    grid = torch.stack(torch.meshgrid(ys, xs, indexing="ij"))  # (2, H, W)
    return grid.expand(B, 2, H, W)


class UNet(nn.Module):
    """x0_hat = UNet(x_t, t): predicts the clean image from a noisy one.

    in_channels:   colour channels of the image (3 for RGB)
    base_channels: width of the first level
    channel_mults: width of each level as a multiple of base_channels; its
                   length is the number of levels
    attention, coords, canvas_size: global context (module docstring)
    num_classes:   K classes to draw on demand, plus the null class K
                   (module docstring); None: an unconditional network
    The defaults build the plain U-Net, as in checkpoints that predate these options.
    """

    def __init__(self, in_channels=3, base_channels=16, channel_mults=(1, 2, 4, 8), attention=False,
                 coords=False, canvas_size=None, num_classes=None):
        super().__init__()
        check_config(in_channels, base_channels, channel_mults, canvas_size, num_classes)
        self.config = {
            "in_channels": in_channels,
            "base_channels": base_channels,
            "channel_mults": list(channel_mults),
            "attention": bool(attention),
            "coords": bool(coords),
            "canvas_size": canvas_size,
            "num_classes": num_classes,
        }
        widths = [base_channels * m for m in channel_mults]
        temb_dim = 4 * base_channels

        self.time_mlp = nn.Sequential(
            nn.Linear(base_channels, temb_dim), nn.SiLU(), nn.Linear(temb_dim, temb_dim)
        )
        # one learned vector per class and one for "no class" (index num_classes), starting at zero: the
        # untrained network draws every class alike, and training pulls each vector where its class needs it
        self.class_embedding = nn.Embedding(num_classes + 1, temb_dim) if num_classes else None
        if self.class_embedding is not None:
            nn.init.zeros_(self.class_embedding.weight)
        self.conv_in = nn.Conv2d(in_channels + (2 if coords else 0), base_channels, 3, padding=1)

        self.encoder = nn.ModuleList()
        self.downs = nn.ModuleList()
        ch = base_channels
        for level, width in enumerate(widths):
            self.encoder.append(ResBlock(ch, width, temb_dim))
            ch = width
            if level < len(widths) - 1:
                self.downs.append(Down(ch))

        self.middle = nn.ModuleList([ResBlock(ch, ch, temb_dim), ResBlock(ch, ch, temb_dim)])
        self.middle_attention = AttentionBlock(ch) if attention else None  # between the two

        self.decoder = nn.ModuleList()
        self.ups = nn.ModuleList()
        for level, width in reversed(list(enumerate(widths))):
            self.decoder.append(ResBlock(ch + width, width, temb_dim))  # + width: the skip
            ch = width
            if level > 0:
                self.ups.append(Up(ch))

        self.norm_out = GroupNorm(GROUPS, ch)
        self.conv_out = nn.Conv2d(ch, in_channels, 3, padding=1)
        # the canvas B starts blank: training paints into it what every output shares
        self.canvas = nn.Parameter(torch.zeros(1, in_channels, canvas_size, canvas_size)) if canvas_size else None

    output_in_fp32 = True  # benchmarks/precision.py turns it off to measure what a bf16 output costs

    def output_layer(self, h):
        """GroupNorm -> SiLU -> conv3x3 down to the image's channels: x0_hat, computed in float32 also
        inside a bf16 autocast region, since it is the prediction itself (ddpm/precision.py)."""
        # (tensors on the "meta" device, which have shapes but no data, have no autocast: a step is sized on them)
        if self.output_in_fp32 and h.device.type != "meta" and torch.is_autocast_enabled(h.device.type):
            with torch.autocast(h.device.type, enabled=False):
                return self.conv_out(F.silu(self.norm_out(h.float())))
        return self.conv_out(F.silu(self.norm_out(h)))

    @property
    def null_class(self):
        """The index of "no class": K for a network of K classes (None if it has none)."""
        return self.config["num_classes"]

    def forward(self, x_t, t, y=None):
        """x_t: (B, C, H, W) noisy image, t: (B,) timesteps, y: (B,) classes or None -> x0_hat: (B, C, H, W).

        y is only for a network built with num_classes; there, None asks for no class (the null class).
        """
        B, C, H, W = x_t.shape
        levels = len(self.encoder)
        if not (side_fits(H, levels) and side_fits(W, levels)):
            multiple = side_multiple(levels)
            raise ValueError(
                f"image size {H}x{W} does not fit this {levels}-level U-Net: both sides must "
                f"be multiples of {multiple} and at least {2 * multiple}"
            )
        if self.canvas is not None and (H, W) != self.canvas.shape[-2:]:
            side = self.canvas.shape[-1]
            raise ValueError(f"image size {H}x{W} does not fit this U-Net's {side}x{side} canvas")
        temb = self.time_mlp(timestep_embedding(t, self.config["base_channels"]))  # (B, temb_dim)
        if self.class_embedding is not None:
            if y is None:
                y = torch.full((B,), self.null_class, dtype=torch.long, device=x_t.device)
            temb = temb + self.class_embedding(y)  # what to draw, beside how noisy x_t is
        elif y is not None:
            raise ValueError("this U-Net has no classes (built without num_classes): it cannot take y")

        if self.config["coords"]:
            x_t = torch.cat([x_t, coordinate_channels(x_t)], dim=1)  # (B, C + 2, H, W)
        h = self.conv_in(x_t)  # (B, base, H, W)
        skips = []
        for level, block in enumerate(self.encoder):
            h = block(h, temb)  # (B, width, H / 2**level, W / 2**level)
            skips.append(h)
            if level < len(self.downs):
                h = self.downs[level](h)  # halve H and W

        h = self.middle[0](h, temb)  # (B, widest, H / 8, W / 8) with four levels
        if self.middle_attention is not None:
            h = self.middle_attention(h)  # every position mixes in every other
        h = self.middle[1](h, temb)

        for i, block in enumerate(self.decoder):
            h = block(torch.cat([h, skips.pop()], dim=1), temb)  # concat skip of the same size
            if i < len(self.ups):
                h = self.ups[i](h)  # double H and W

        x0_hat = self.output_layer(h)  # (B, C, H, W)
        if self.canvas is not None:
            x0_hat = x0_hat + self.canvas  # x0_hat = unet(x_t, t) + B
        return x0_hat


def check_config(in_channels, base_channels, channel_mults, canvas_size=None, num_classes=None):
    """Raise ValueError, in words a user can act on, for a network that cannot be built."""
    if num_classes is not None and (not isinstance(num_classes, int) or num_classes < 2):
        raise ValueError(f"num_classes must be an integer of at least 2, got {num_classes!r}")
    if canvas_size is not None and (not isinstance(canvas_size, int) or canvas_size < 1):
        raise ValueError(f"canvas_size must be a positive integer (the image side), got {canvas_size!r}")
    if in_channels < 1:
        raise ValueError(f"in_channels must be at least 1, got {in_channels}")
    if not channel_mults:
        raise ValueError("channel_mults needs at least one level")
    if any(m < 1 for m in channel_mults):
        raise ValueError(f"channel multipliers must be at least 1, got {list(channel_mults)}")
    if base_channels < GROUPS or base_channels % GROUPS:
        raise ValueError(
            f"base_channels must be a positive multiple of {GROUPS} (GroupNorm uses {GROUPS} groups), "
            f"got {base_channels}"
        )


def side_multiple(levels):
    """An image side must divide by this: each of the levels - 1 Downs halves it."""
    return 2 ** (levels - 1)


def side_fits(side, levels):
    """The shape contract: a multiple of side_multiple, and at least 2x2 pixels left at the bottom
    level (with 1x1, GroupNorm would have a single value to normalise)."""
    multiple = side_multiple(levels)
    return side % multiple == 0 and side >= 2 * multiple


def check_image_size(img_size, channel_mults):
    """Raise ValueError naming the nearest sizes that work if a square image of this side cannot pass."""
    multiple = side_multiple(len(channel_mults))
    smallest = 2 * multiple
    if not side_fits(img_size, len(channel_mults)):
        below, above = (img_size // multiple) * multiple, max((img_size // multiple + 1) * multiple, smallest)
        nearest = f"{below} or {above}" if below >= smallest else str(above)
        raise ValueError(
            f"img_size {img_size} does not fit a {len(channel_mults)}-level U-Net: the side must be "
            f"a multiple of {multiple} and at least {smallest} (nearest: {nearest})"
        )
