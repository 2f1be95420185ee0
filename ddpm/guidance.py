"""Classifier-free guidance (Ho and Salimans 2022): one network, with and without the class, mixed at sampling.

Training (their Algorithm 1): each image comes with its class y, and with
probability p_uncond (LABEL_DROPOUT, 0.1) the class is replaced by the null
class, "no class". So one network learns both

    x0_cond   = unet(x_t, t, y)          the clean image, given that it shows a y
    x0_uncond = unet(x_t, t, null)       the clean image, knowing nothing of its class

Sampling (their eq. 6, written for x0 and with one scale S):

    x0_guided = x0_uncond + S * (x0_cond - x0_uncond)

S = 0 is the unconditional model, S = 1 the plain conditional one, S > 1 goes
past the conditional prediction, away from what the unconditional one expects:
each image looks more like its class and less like the rest, at the price of
variety. Ho and Salimans write eps_tilde = (1 + w) eps_cond - w eps_uncond,
which is the same line with w = S - 1; diffusers' guidance_scale is S.

Why the formula may be applied to x0 here although the paper applies it to
the noise eps: under our noising x_t = (1 - w) x0 + w eps, the noise a
prediction implies is eps_hat = (x_t - (1 - w) x0_hat) / w, an affine function
of x0_hat with the same x_t and w for both predictions. An affine map keeps
the mix: guiding eps_cond and eps_uncond with S gives the eps_hat of
x0_guided, so the sampler takes exactly the same step either way.
"""

import torch
from torch import nn

LABEL_DROPOUT = 0.1  # p_uncond of Ho and Salimans, Algorithm 1: the share of training images shown with no class
DEFAULT_GUIDANCE = 2.0  # ddpm_sample.py's S where none is given


def drop_labels(labels, null_class, p_uncond, generator=None):
    """The classes a training batch is shown with: each of ``labels`` (B,) becomes ``null_class`` with
    probability ``p_uncond``, drawn from ``generator`` (Algorithm 1: c <- null with probability p_uncond)."""
    if p_uncond == 0:
        return labels
    drop = torch.rand(labels.shape, generator=generator, device=labels.device) < p_uncond
    return torch.where(drop, torch.full_like(labels, null_class), labels)


def guided_x0(x0_uncond, x0_cond, scale):
    """x0_guided = x0_uncond + S * (x0_cond - x0_uncond); S = 0 and S = 1 return their prediction itself."""
    if scale == 0:
        return x0_uncond
    if scale == 1:
        return x0_cond
    return x0_uncond + scale * (x0_cond - x0_uncond)


class Guided(nn.Module):
    """A conditional network asked for ``labels`` (B,) at guidance scale ``scale``, as a network of (x_t, t).

    The samplers of diffusion.py call it as they call any model, model(x_t, t), and get x0_guided.
    For S other than 0 and 1 it runs the network on the batch twice, with the classes and with
    none; S = 0 needs only the unconditional pass and S = 1 only the conditional one.
    """

    def __init__(self, model, labels, scale):
        super().__init__()
        self.model, self.labels, self.scale = model, labels, scale

    def forward(self, x_t, t):
        labels = self.labels.to(x_t.device)
        if self.scale == 0:
            return self.model(x_t, t)  # y = None: the null class
        if self.scale == 1:
            return self.model(x_t, t, labels)
        both = self.model(torch.cat([x_t, x_t]), torch.cat([t, t]),
                          torch.cat([labels, torch.full_like(labels, self.model.null_class)]))
        x0_cond, x0_uncond = both.chunk(2)
        return guided_x0(x0_uncond, x0_cond, self.scale)


def balanced_labels(count, num_classes):
    """Classes for ``count`` samples, every class equally often: 0, 1, ..., K - 1, 0, 1, ... (K = num_classes)."""
    return torch.arange(count) % num_classes
