"""The library behind ddpm_train.py, ddpm_infer.py and ddpm_sample.py.

    unet_model  the network, x0_hat = UNet(x_t, t); knows nothing of the noise
    diffusion   the noise process: w(t), add_noise, the training loss, denoising
    training    the training loop (Adam, warm-up, cosine decay, clipping, EMA, many processes)
    data        one image or a folder as a Dataset, the order of batches, the shipped digits
    checkpoint  the self-describing checkpoint file: save (atomic), load (safe)
    imaging     image files <-> tensors in [-1, 1]
    figures     the figures: result triptych, trajectory, noise sweep, training plots
    metrics     PSNR, SSIM, and how close a sample lies to its nearest training images
    cli, files, errors   what the scripts share: flags, safe writes, user errors

Data flows one way: script -> models.* -> torch. Nothing here imports a script.
"""

from .checkpoint import load_checkpoint, save_checkpoint
from .diffusion import NUM_TIMESTEPS, NoiseSchedule, denoise, generate, timestep_grid, training_losses
from .errors import UserError
from .imaging import load_image, save_image
from .metrics import psnr, ssim
from .training import train
from .unet_model import UNet, timestep_embedding

__all__ = [
    "NUM_TIMESTEPS", "NoiseSchedule", "UNet", "UserError", "denoise", "generate", "load_checkpoint", "timestep_grid",
    "load_image", "psnr", "save_checkpoint", "save_image", "ssim", "timestep_embedding",
    "train", "training_losses",
]
