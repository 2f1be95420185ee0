"""Mixed precision: run the network's big operations in bfloat16 where the hardware does them natively.

bfloat16 ("bf16") keeps float32's 8-bit exponent, so it covers the same range and needs no loss scaling,
but only 8 bits of mantissa (float32 has 24): about 2 to 3 significant decimal digits. A processor with
bf16 instructions (Intel AVX512-BF16 or AMX, NVIDIA compute capability 8.0 and up) multiplies twice as
many of them per cycle, and moves half the bytes.

``--precision bf16`` means PyTorch's automatic mixed precision, ``torch.autocast``: inside it, each
convolution, matrix product and attention casts its inputs to bf16 and returns bf16, and everything else
runs as it is. What stays float32, as in every mixed-precision recipe:
  * the master weights, Adam's moments, the gradients' update and the checkpoint: autocast never touches
    the parameters, only the copies it casts for one operation;
  * the loss, and the backward pass's sums (autocast is entered for the forward pass only);
  * in our network (models/unet_model.py), every GroupNorm and the output convolution: the statistics of
    a normalisation and the last layer, whose output is x0_hat itself. benchmarks/precision.py measures
    what each of these costs in quality when it is left to bf16.

The default, fp32, enters no autocast at all, so it is the same computation to the bit.
It is opt-in, as in diffusers (--mixed_precision), accelerate and lucidrains' Trainer (amp=False).
"""

import contextlib

import torch

from .errors import UserError

PRECISIONS = ("fp32", "bf16")
DEFAULT_PRECISION = "fp32"


def add_precision_argument(parser):
    parser.add_argument(
        "--precision", default=DEFAULT_PRECISION, choices=PRECISIONS,
        help="fp32, or bf16: the convolutions and attention in bfloat16 (torch.autocast), weights, optimizer "
             "and loss in float32; faster where the CPU has AVX512-BF16 or AMX, or on a GPU of compute "
             "capability 8.0 and up",
    )


def native_bf16(device):
    """True where ``device`` computes in bf16 natively, by PyTorch's own checks: on a CPU, the AVX512-BF16
    or AMX instructions; on CUDA, compute capability 8.0 and up (not an emulation)."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported(including_emulation=False)
    if device.type == "cpu":
        return torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported()
    return False


def check_precision(precision, device, warn):
    """Refuse bf16 on a CUDA GPU without it (UserError) or on a device autocast does not serve here;
    on a CPU without native bf16, ``warn`` once that it runs, but slower than fp32 (emulated)."""
    if precision != "bf16":
        return
    if device.type == "cuda" and not native_bf16(device):
        name = torch.cuda.get_device_name(device)
        major, minor = torch.cuda.get_device_capability(device)
        raise UserError(f"--precision bf16 needs a GPU of compute capability 8.0 or higher; {name} is "
                        f"{major}.{minor} (use --precision fp32)")
    if device.type not in ("cpu", "cuda"):
        raise UserError(f"--precision bf16 runs on the CPU or a CUDA GPU, not on {device.type} "
                        "(use --precision fp32)")
    if device.type == "cpu" and not native_bf16(device):
        warn("this CPU has no native bf16 (AVX512-BF16 or AMX): --precision bf16 is emulated here, "
             "and slower than fp32")


def autocast(precision, device):
    """The region in which the network's forward pass runs at ``precision``: a bf16 torch.autocast, or,
    for fp32, nothing at all."""
    if precision == "bf16":
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()
