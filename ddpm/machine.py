"""Which machine a time was measured on: a time means little without the CPU that gave it."""

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
