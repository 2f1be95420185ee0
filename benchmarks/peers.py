"""The networks the benchmark compares: ours and the U-Nets a learner would pick instead.

Every entry builds a module with the interface of ours, ``x0_hat = net(x_t, t)``
with x_t (B, 3, H, W) and integer timesteps t (B,), so that one training loop
(ddpm/training.py) drives them all. The peers are configured to within 10%
of our parameter count (1,881,907 with the defaults); ``check_parameter_budget``
holds them to it. How each was sized:

* diffusers ``UNet2DModel``, no attention: four levels of DownBlock2D /
  UpBlock2D, widths (16, 32, 56, 112), one ResNet block per level
  (``layers_per_block=1``), GroupNorm with 8 groups, ``add_attention=False``
  in the middle block.  1,896,051 parameters (+0.8%).
* diffusers ``UNet2DModel``, with attention: the two lowest levels are
  AttnDownBlock2D / AttnUpBlock2D and the middle block keeps its attention
  (diffusers' DDPM layout, scaled down), widths (16, 32, 64, 96), heads of 8
  channels.  1,818,899 parameters (-3.3%).
* lucidrains ``denoising_diffusion_pytorch.Unet`` with its attention (linear
  attention on the outer levels, full attention on the innermost and in the
  middle, its defaults), ``dim=14``, ``dim_mults=(1, 2, 4, 8)``.  1,898,491
  parameters (+0.9%).
* the same Unet without attention: every attention block, and its
  parameters, replaced by a zero, so its ``x = attn(x) + x`` leaves x as it
  is; ``dim=16``, ``dim_mults=(1, 2, 4, 7)``, i.e. widths 16, 32, 64, 112
  (its time embedding needs an even ``dim``).  1,843,011 parameters (-2.1%).

Peer libraries are benchmark-only dependencies (benchmarks/requirements.txt):
``available()`` lists what can be built here, and the benchmark skips the rest.
"""

import importlib.util

import torch
from torch import nn

from models import UNet

OURS = "ours"
PARAMETER_TOLERANCE = 0.10  # peers within 10% of our parameter count


class DiffusersAdapter(nn.Module):
    """diffusers returns an output object; the training loop wants the tensor."""

    def __init__(self, net):
        super().__init__()
        self.net = net

    def forward(self, x_t, t):
        return self.net(x_t, t).sample


class NoAttention(nn.Module):
    """Stands in for an attention block in ``x = attn(x) + x``: contributes nothing."""

    def forward(self, x):
        return x.new_zeros(())  # a 0-d zero: attn(x) + x == x


def build_ours():
    return UNet()  # the defaults of ddpm_train.py


def build_diffusers(attention):
    from diffusers import UNet2DModel

    if attention:
        widths = (16, 32, 64, 96)
        down = ("DownBlock2D", "DownBlock2D", "AttnDownBlock2D", "AttnDownBlock2D")
        up = ("AttnUpBlock2D", "AttnUpBlock2D", "UpBlock2D", "UpBlock2D")
    else:
        widths = (16, 32, 56, 112)
        down = ("DownBlock2D",) * 4
        up = ("UpBlock2D",) * 4
    net = UNet2DModel(in_channels=3, out_channels=3, block_out_channels=widths, layers_per_block=1,
                      down_block_types=down, up_block_types=up, norm_num_groups=8,
                      attention_head_dim=8, add_attention=attention)
    return DiffusersAdapter(net)


def build_lucidrains(attention):
    from denoising_diffusion_pytorch import Unet

    if attention:
        return Unet(dim=14, dim_mults=(1, 2, 4, 8))
    net = Unet(dim=16, dim_mults=(1, 2, 4, 7))
    for level in (*net.downs, *net.ups):
        level[2] = NoAttention()  # each level is [block1, block2, attn, down/upsample]
    net.mid_attn = NoAttention()
    return net


MODELS = {
    OURS: ("this project's UNet (base 16, mults 1,2,4,8)", None, build_ours),
    "diffusers": ("diffusers UNet2DModel, no attention", "diffusers", lambda: build_diffusers(False)),
    "diffusers+attn": ("diffusers UNet2DModel, attention at 2 levels + middle", "diffusers",
                       lambda: build_diffusers(True)),
    "lucidrains": ("lucidrains Unet, attention removed", "denoising_diffusion_pytorch",
                   lambda: build_lucidrains(False)),
    "lucidrains+attn": ("lucidrains Unet, its attention", "denoising_diffusion_pytorch",
                        lambda: build_lucidrains(True)),
}


def available():
    """The names in MODELS whose library is installed here, ours first."""
    return [name for name, (_, package, _) in MODELS.items()
            if package is None or importlib.util.find_spec(package) is not None]


def build(name, seed=0):
    """A freshly initialised network; the same seed gives the same weights."""
    torch.manual_seed(seed)
    return MODELS[name][2]()


def parameter_count(model):
    return sum(p.numel() for p in model.parameters())


def check_parameter_budget(counts):
    """Raise ValueError if a peer's parameter count is not within 10% of ours. counts: name -> int."""
    ours = counts[OURS]
    for name, count in counts.items():
        if abs(count - ours) > PARAMETER_TOLERANCE * ours:
            raise ValueError(f"{name} has {count:,} parameters, not within 10% of our {ours:,}")
