"""Which machine a time was measured on: a time means little without the CPU that gave it."""

import os
import platform

import torch


def cpu_name():
    """The CPU's model name where Linux tells it (/proc/cpuinfo), else what Python's platform knows."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def describe():
    """The machine as a run record names it: CPU model, cores, the threads torch uses, torch's version."""
    return {"cpu": cpu_name(), "cores": os.cpu_count(), "threads": torch.get_num_threads(),
            "torch": str(torch.__version__)}
