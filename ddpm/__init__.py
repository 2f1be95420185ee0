"""The library behind ddpm_train.py, ddpm_infer.py and ddpm_sample.py: everything but the networks.

    diffusion    the noise process: w(t), add_noise, the training loss, denoising, generation
    training     the training loop (Adam, warm-up, cosine decay, clipping, EMA, many processes)
    guidance     classifier-free guidance: label dropout in training, x0_uncond + S * (x0_cond - x0_uncond)
    training_run one run of ddpm_train.py: its files, resuming it, quality checks, its run record
    distributed  this process's rank, and joining the process group that torchrun starts
    data         one image or a folder as a Dataset, the order of batches, the shipped digits and their split,
                 a folder's classes, and the check that data are what a checkpoint was trained on
    checkpoint   the self-describing checkpoint file: save (atomic), load (safe)
    imaging      image files <-> tensors in [-1, 1], and the one safe way to open an image file
    figures      the figures: result triptych, trajectory, noise sweep, training plots, samples
    metrics      PSNR, SSIM, and how close a sample lies to its nearest training images (L2, cosine)
    quality      how good generated digits are: FLD, precision and recall in the judge's features, accuracy
    machine      which machine a time was measured on
    cli          what the scripts share: flags, the device, messages, the error exit
    files        safe writes: atomic files and JSON, checks before writing
    errors       UserError, the one exception for mistakes a user can fix

The networks live in models/. Data flows one way: script -> ddpm -> models -> torch.
Nothing here imports a script.
"""

from .checkpoint import load_checkpoint, save_checkpoint
from .diffusion import NUM_TIMESTEPS, NoiseSchedule, denoise, generate, timestep_grid, training_losses
from .errors import UserError
from .imaging import load_image, save_image
from .metrics import psnr, ssim

__all__ = [
    "NUM_TIMESTEPS", "NoiseSchedule", "UserError", "denoise", "generate", "load_checkpoint", "load_image", "psnr",
    "save_checkpoint", "save_image", "ssim", "timestep_grid", "training_losses",
]
