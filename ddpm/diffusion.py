"""The noise process: every formula of the demo, in one place.

Convention (images are float tensors in [-1, 1]):

    w(t)  = max_noise * t / T                      noise weight, t in {0, ..., T}
    x_t   = (1 - w(t)) * x0 + w(t) * eps           forward (noising) process, eps ~ N(0, I)
    x0_hat = unet(x_t, t)                           the network predicts the clean image
    loss  = MSE(x0_hat, x0),  t ~ Uniform{0, ..., T}  (or p(t) ~ t: sample_timesteps)
    (optionally weighted per image by clamp(SNR(t), 1, gamma), SNR = ((1 - w) / w)^2: loss_weights)

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

NUM_TIMESTEPS = 1000  # T
DEFAULT_MAX_NOISE = 0.8
T_DENSITIES = ("uniform", "linear")  # how training draws t: NoiseSchedule.sample_timesteps


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
        """Noise weight w(t) = max_noise * t / T: a (B,) tensor of timesteps -> (B,) float32, an int -> float."""
        return self.max_noise * (t.float() if torch.is_tensor(t) else t) / self.num_timesteps

    def snr(self, t):
        """Signal-to-noise ratio of x_t, SNR(t) = ((1 - w) / w)^2: (B,) timesteps -> (B,) float32, inf at t = 0."""
        w = self.w(t)
        return ((1 - w) / w) ** 2

    def timestep_for(self, w):
        """The integer timestep at which w(t) is (nearest to) ``w``: t = w * T / max_noise.

        For w above max_noise this is above T: a noise level the model never saw in training.
        """
        return round(w * self.num_timesteps / self.max_noise)

    def add_noise(self, x0, t, eps):
        """Forward process x_t = (1 - w) * x0 + w * eps, with one w per image of the batch.

        x0, eps: (B, C, H, W); t: (B,) -> x_t: (B, C, H, W).
        """
        w = self.w(t).view(-1, 1, 1, 1)  # (B, 1, 1, 1), broadcasts over C, H, W
        return (1 - w) * x0 + w * eps

    def sample_timesteps(self, batch_size, generator=None, device=None, density="uniform"):
        """The timesteps of a training batch, shape (B,), integer, drawn with ``density`` (T_DENSITIES):

        uniform: t ~ Uniform{0, ..., T};
        linear:  p(t) proportional to t, drawn as t = round(T * u^(1/2)) with u ~ Uniform(0, 1)
                 (the inverse of the CDF (t / T)^2): twice the uniform density at t = T, so more
                 of the noisiest steps, where a generator decides what it draws.
        """
        if density == "uniform":
            return torch.randint(0, self.num_timesteps + 1, (batch_size,), generator=generator, device=device)
        if density == "linear":
            u = torch.rand(batch_size, generator=generator, device=device)
            return (u ** 0.5 * self.num_timesteps).round().long()
        raise ValueError(f"unknown timestep density {density!r}: choose one of {', '.join(T_DENSITIES)}")


def noise_stream(seed):
    """A CPU random generator seeded with ``seed``: every device then draws the same numbers from it."""
    return torch.Generator().manual_seed(seed)


def seeded_noise(x0, seed):
    """eps ~ N(0, I) shaped like x0, the first draw of noise_stream(seed): every device sees the same noisy input."""
    return torch.randn(x0.shape, generator=noise_stream(seed))


def training_losses(model, x0, schedule, generator=None, y=None, t_density="uniform"):
    """One Monte-Carlo sample of the training objective E_{t, eps} ||unet(x_t, t) - x0||^2, per image.

    x0: (B, C, H, W) clean images. Draws a timestep and fresh Gaussian noise
    per image (with ``generator`` if given), noises, predicts, and returns the
    mean squared error of each image, (B,), and the timesteps drawn, (B,).
    y: (B,) the classes to show a conditional network, ||unet(x_t, t, y) - x0||^2 (None: no classes).
    t_density: how t is drawn (NoiseSchedule.sample_timesteps).
    """
    t = schedule.sample_timesteps(x0.shape[0], generator=generator, device=x0.device, density=t_density)  # (B,)
    eps = torch.randn(x0.shape, generator=generator, device=x0.device, dtype=x0.dtype)
    x_t = schedule.add_noise(x0, t, eps)
    x0_hat = model(x_t, t) if y is None else model(x_t, t, y)
    return ((x0_hat.float() - x0) ** 2).mean(dim=(1, 2, 3)), t  # the loss in float32, also under bf16 autocast


def loss_weights(schedule, t, snr_gamma):
    """Each image's weight in the training loss, clamp(SNR(t), 1, snr_gamma): (B,) timesteps -> (B,) float32.

    The noise that x0_hat implies, eps_hat = (x_t - (1 - w) x0_hat) / w, is off by (1 - w) / w
    times as much as x0_hat is, so ||eps_hat - eps||^2 = SNR(t) * ||x0_hat - x0||^2, and the
    weighted loss reads

        max(||x0_hat - x0||^2, min(||eps_hat - eps||^2, snr_gamma * ||x0_hat - x0||^2)):

    the plain x0 error where noise dominates (w > 1/2, SNR < 1); the noise error where the image
    does (the truncated-SNR weighting of Salimans and Ho 2022), which the plain x0 loss all but
    ignores there; capped at snr_gamma times the x0 error (Min-SNR-gamma, Hang et al. 2023), so that
    the nearly clean steps do not take over. With snr_gamma = 1 every weight is 1.
    """
    return schedule.snr(t).clamp(1.0, snr_gamma)


def timestep_grid(t_start, steps):
    """Evenly spaced integer timesteps t_start = s_N > ... > s_1 > s_0 = 0, with N = steps.

    Raises ValueError if the grid cannot be strictly decreasing (more steps
    than timesteps); from t_start = 0 the only grid is one step, [0, 0].
    """
    if steps < 1 or steps > max(t_start, 1):
        raise ValueError(f"cannot take {steps} steps from t={t_start}: choose 1 to {max(t_start, 1)} steps")
    return [round(t_start * k / steps) for k in range(steps, -1, -1)]


def ddim_step(x, x0_hat, w_t, w_s, eta=0.0, noise=None):
    """One step of the generalised DDIM sampler (Song et al. 2021, eq. 12 and 16), from level w_t down to w_s.

    For any process x_t = a_t * x0 + sigma_t * eps, DDIM's eq. 12 reads

        eps_hat = (x_t - a_t * x0_hat) / sigma_t                            the noise that x0_hat implies
        x_s     = a_s * x0_hat + sqrt(sigma_s^2 - c^2) * eps_hat + c * z,   z ~ N(0, I) fresh noise
        c       = eta * (sigma_s / sigma_t) * sqrt(sigma_t^2 - (a_t / a_s)^2 * sigma_s^2)

    and here a = 1 - w, sigma = w. With eta = 1, c^2 is the variance of the DDPM posterior
    q(x_s | x_t, x0) (DDPM eq. 6-7 for this process; eq. 16 of DDIM is the same c written with
    alpha_bar), so the step is DDPM's ancestral sampling: keep part of the old noise, add fresh
    noise z. With eta = 0 no fresh noise is added and the step is deterministic (DDIM). ``noise``
    is z, shaped like x; it is only needed when eta > 0.
    """
    eps_hat = (x - (1 - w_t) * x0_hat) / w_t
    if eta == 0:  # c = 0; written out so that sqrt(w_s^2) cannot round w_s and change eta = 0's outputs
        return (1 - w_s) * x0_hat + w_s * eps_hat
    c = eta * (w_s / w_t) * max(w_t**2 - ((1 - w_t) / (1 - w_s)) ** 2 * w_s**2, 0.0) ** 0.5
    return (1 - w_s) * x0_hat + max(w_s**2 - c**2, 0.0) ** 0.5 * eps_hat + c * noise


@torch.inference_mode()
def denoise(model, x_t, t_start, schedule, steps=1, trajectory=None, eta=0.0, generator=None):
    """Denoise x_t, noised to the level of timestep t_start, in ``steps`` steps.

    At each s_k of timestep_grid(t_start, steps), k = N, ..., 1:

        x0_hat  = clamp(unet(x, s_k), -1, 1)                    predict the clean image
        eps_hat = (x - (1 - w(s_k)) * x0_hat) / w(s_k)           the noise that x0_hat implies
        x       = (1 - w(s_{k-1})) * x0_hat + w(s_{k-1}) * eps_hat  re-noise to the next, lower level

    and the answer is the x0_hat of the last step (where s_{k-1} = 0). With
    steps = 1 this is the original demo's one-step denoising,
    clamp(unet(x_t, t), -1, 1). The update is DDIM's deterministic step
    (Song et al. 2021, eq. 12, eta = 0) for this noising, and an Euler step
    of the rectified-flow ODE dx/dw = eps_hat - x0_hat. With eta > 0 the
    re-noising keeps only part of eps_hat and adds fresh Gaussian noise drawn
    from ``generator`` (on the CPU, so every device gets the same numbers);
    eta = 1 is DDPM's ancestral sampling (ddim_step has the formula).

    x_t: (B, C, H, W). If ``trajectory`` is a list, one (s_k, w(s_k), x, x0_hat)
    per step is appended to it (tensors on the CPU), for the figures.
    """
    if eta < 0:
        raise ValueError(f"eta must be at least 0, got {eta}")
    model.eval()
    x = x_t
    grid = timestep_grid(t_start, steps)
    for s_k, s_next in zip(grid[:-1], grid[1:]):
        t = torch.full((x.shape[0],), s_k, device=x.device)
        x0_hat = model(x, t).clamp(-1.0, 1.0)  # (B, C, H, W)
        w_k, w_next = schedule.w(s_k), schedule.w(s_next)
        if trajectory is not None:
            trajectory.append((s_k, w_k, x.cpu(), x0_hat.cpu()))
        if s_next == 0:
            break
        z = torch.randn(x.shape, generator=generator).to(x.device) if eta > 0 else None
        x = ddim_step(x, x0_hat, w_k, w_next, eta, z)
    return x0_hat


def generate(model, schedule, shape, steps, eta=0.0, seed=0, device="cpu"):
    """New images from pure noise: start at t = T, where w = 1 and x_T = eps, and denoise in ``steps`` steps.

    shape: (K, C, H, W). The noise comes from noise_stream(seed): x_T first, then the sampler's
    fresh noise (eta above 0), so a seed gives the same images on every device. Needs a model
    trained with max_noise = 1; a denoiser never saw pure noise (ValueError).
    """
    if schedule.max_noise < 1:
        raise ValueError(f"the model was trained with max_noise {schedule.max_noise:g}, so it never saw pure noise: "
                         "it is a denoiser, not a generator (train with --max_noise 1, or on a folder)")
    noise = noise_stream(seed)
    x_T = torch.randn(shape, generator=noise)
    return denoise(model, x_T.to(device), schedule.num_timesteps, schedule, steps, eta=eta, generator=noise)


class InBatches(torch.nn.Module):
    """``model`` run on at most ``batch_size`` images at a time: model(x, t, ...) for the whole batch, in pieces.

    For memory: the sampler still steps every image together and draws their noise as one batch, so
    the images are those of one big batch (up to float rounding: a kernel may add in another order for
    another batch size; tests/test_sampling.py), while the network's activations are those of
    ``batch_size`` images.
    """

    def __init__(self, model, batch_size):
        super().__init__()
        self.model, self.batch_size = model, batch_size
        self.null_class = getattr(model, "null_class", None)  # what guidance.Guided asks of a network

    def forward(self, x, *per_image):
        """x: (B, ...), and each of ``per_image`` (t, a class) with B entries -> the model's output, (B, ...)."""
        pieces = zip(x.split(self.batch_size), *(value.split(self.batch_size) for value in per_image))
        return torch.cat([self.model(*piece) for piece in pieces])
