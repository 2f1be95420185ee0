"""Which machine a time was measured on (a time means little without the CPU that gave it), and how much memory
a run on it has left."""

import os
import platform

import torch


# The CPU features that change how fast torch runs here: wide vectors, and native bfloat16
SPEED_FLAGS = ("avx2", "avx512f", "avx512_bf16", "amx_bf16")


def _cpuinfo_field(name):
    """The first value of ``name`` in /proc/cpuinfo (Linux), or None where there is none."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.split(":", 1)[0].strip() == name:
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return None


def cpu_name():
    """The CPU's model name where Linux tells it (/proc/cpuinfo), else what Python's platform knows."""
    return _cpuinfo_field("model name") or platform.processor() or platform.machine()


def cpu_speed_flags():
    """Which of SPEED_FLAGS the CPU has, in that order (none where /proc/cpuinfo is not there to say)."""
    flags = set((_cpuinfo_field("flags") or "").split())
    return [flag for flag in SPEED_FLAGS if flag in flags]


def describe():
    """The machine as a run record names it: CPU model, the speed flags it has, cores, the threads torch uses,
    torch's version. Two CPUs of the same name may differ in flags (one AMD EPYC has AVX-512, another stops at
    AVX2), and with them in speed."""
    return {"cpu": cpu_name(), "cpu_flags": cpu_speed_flags(), "cores": os.cpu_count(),
            "threads": torch.get_num_threads(), "torch": str(torch.__version__)}


def available_memory(device):
    """Bytes that a run on ``device`` can still have: the GPU's free memory, or the RAM that Linux says is
    available (MemAvailable: free memory plus caches it can drop). None where this cannot be known."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    if device.type != "cpu":
        return None
    try:
        with open("/proc/meminfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024  # the file counts in kB
    except (OSError, ValueError, IndexError):
        pass
    return None
