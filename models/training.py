"""The training loop: fit the U-Net to one image under the noise process of diffusion.py.

Each step draws, for every copy of the image in the batch, a timestep
t ~ Uniform{0, ..., T} and fresh noise eps, and takes one Adam step on
MSE(unet(x_t, t), x0) (DDPM, Algorithm 1, with x0 as the target).

Three standard aids make the short run converge further; the learning rate
passed in is the peak:

* warm-up: the learning rate rises linearly over the first steps, so the
  first updates (taken with Adam's still-empty moment estimates) stay small;
* cosine decay from the peak to zero by the last step (Loshchilov & Hutter,
  SGDR, 2017), so the final steps settle into a minimum instead of
  bouncing around it;
* gradient-norm clipping at 1.0 guards against the rare huge gradient.
"""

import math

import torch
from tqdm import tqdm

from .diffusion import training_loss

WARMUP_STEPS = 100
GRAD_CLIP_NORM = 1.0
PROGRESS_EVERY = 25  # steps between updates of the progress bar's loss


def learning_rate_factor(step, total_steps, warmup_steps=WARMUP_STEPS):
    """Multiplier of the peak learning rate at 0-based ``step``: linear warm-up, then cosine to 0."""
    warmup_steps = min(warmup_steps, max(total_steps // 10, 1))  # short runs warm up for 10%
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    progress = (step - warmup_steps) / max(total_steps - warmup_steps, 1)
    return 0.5 * (1.0 + math.cos(math.pi * progress))


def train(model, x0, schedule, train_steps, lr, batch_size=1, generator=None, show_progress=True):
    """Train ``model`` in place on the single image ``x0`` (1, C, H, W). Returns the per-step losses.

    ``generator`` drives every random draw of t and eps, so a seeded run repeats exactly.
    """
    model.train()
    x0_batch = x0.expand(batch_size, -1, -1, -1)  # (B, C, H, W): the same image B times, no copy
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: learning_rate_factor(step, train_steps)
    )
    # Losses stay on the device and are read back once at the end, not every step. A
    # preallocated buffer, not a list of loss tensors: those would keep each step alive.
    losses = torch.zeros(train_steps, device=x0.device)
    bar = tqdm(range(train_steps), desc="training", unit="step", disable=not show_progress)
    for step in bar:
        loss = training_loss(model, x0_batch, schedule, generator=generator)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), GRAD_CLIP_NORM)
        optimizer.step()
        scheduler.step()
        losses[step] = loss.detach()
        if step % PROGRESS_EVERY == 0 or step == train_steps - 1:
            recent = losses[max(step + 1 - PROGRESS_EVERY, 0) : step + 1].mean().item()
            bar.set_postfix(loss=f"{recent:.5f}", lr=f"{scheduler.get_last_lr()[0]:.1e}")
    return losses.tolist()
