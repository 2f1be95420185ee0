"""The noise process: every formula of the demo, in one place.

Convention (DESIGN.md section 1; images are float tensors in [-1, 1]):

    w(t)  = max_noise * t / T                      noise weight, t in {0, ..., T}
    x_t   = (1 - w(t)) * x0 + w(t) * eps           forward (noising) process, eps ~ N(0, I)
    x0_hat = unet(x_t, t)                           the network predicts the clean image
    loss  = MSE(x0_hat, x0),  t ~ Uniform{0, ..., T}

This is DDPM (Ho et al. 2020) with two simplifications that keep the idea
visible: the noise enters by linear interpolation instead of the
sqrt(alpha_bar) weights of DDPM eq. 4, and the network is trained on the
clean image x0 instead of the noise eps (DDPM sec. 3.2 discusses both
parameterisations). The default max_noise = 0.8 means t = 500 gives w = 0.4:
"40% noise, 60% signal", as in the original notes.

The network never sees w(t): it gets (x_t, t) and returns an image.
"""

from dataclasses import dataclass

import torch
import torch.nn.functional as F

NUM_TIMESTEPS = 1000  # T
DEFAULT_MAX_NOISE = 0.8


@dataclass(frozen=True)
class NoiseSchedule:
    """The linear-interpolation schedule w(t) = max_noise * t / T.

    With max_noise < 1 the noisiest input still holds (1 - max_noise) of the
    signal: the model is a denoiser, not a generator. With max_noise = 1 it
    sees pure noise at t = T and can start from there.
    """

    num_timesteps: int = NUM_TIMESTEPS
    max_noise: float = DEFAULT_MAX_NOISE

    def __post_init__(self):
        if not (isinstance(self.num_timesteps, int) and self.num_timesteps >= 1):
            raise ValueError(f"num_timesteps must be a positive integer, got {self.num_timesteps!r}")
        if not 0.0 < self.max_noise <= 1.0:
            raise ValueError(f"max_noise must be in (0, 1], got {self.max_noise!r}")

    def to_config(self):
        """Plain dict for the checkpoint's noise_config."""
        return {"num_timesteps": self.num_timesteps, "max_noise": self.max_noise}

    def w(self, t):
        """Noise weight w(t) = max_noise * t / T for a (B,) tensor of timesteps -> (B,) float32."""
        return self.max_noise * t.float() / self.num_timesteps

    def add_noise(self, x0, t, eps):
        """Forward process x_t = (1 - w) * x0 + w * eps, with one w per image of the batch.

        x0, eps: (B, C, H, W); t: (B,) -> x_t: (B, C, H, W).
        """
        w = self.w(t).view(-1, 1, 1, 1)  # (B, 1, 1, 1), broadcasts over C, H, W
        return (1 - w) * x0 + w * eps

    def sample_timesteps(self, batch_size, generator=None, device=None):
        """t ~ Uniform{0, ..., T}, shape (B,), integer."""
        return torch.randint(
            0, self.num_timesteps + 1, (batch_size,), generator=generator, device=device
        )


def training_loss(model, x0, schedule, generator=None):
    """One Monte-Carlo sample of the training objective E_{t, eps} ||unet(x_t, t) - x0||^2.

    x0: (B, C, H, W) clean images. Draws a timestep and fresh Gaussian noise
    per image (with ``generator`` if given), noises, predicts, and returns the
    mean squared error (a 0-dim tensor).
    """
    t = schedule.sample_timesteps(x0.shape[0], generator=generator, device=x0.device)  # (B,)
    eps = torch.randn(x0.shape, generator=generator, device=x0.device, dtype=x0.dtype)
    x_t = schedule.add_noise(x0, t, eps)
    x0_hat = model(x_t, t)
    return F.mse_loss(x0_hat, x0)


@torch.inference_mode()
def denoise_one_step(model, x_t, t):
    """One-step denoising, what the original demo did: x0_hat = clamp(unet(x_t, t), -1, 1).

    x_t: (B, C, H, W); t: (B,) -> (B, C, H, W) in [-1, 1].
    """
    model.eval()
    return model(x_t, t).clamp(-1.0, 1.0)

