"""What machine a benchmark ran on, printed with every result table."""

from __future__ import annotations

import os
import platform


def cpu_name() -> str:
    """The CPU model from /proc/cpuinfo, else what ``platform`` knows."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown CPU"


def describe_machine(device: str = "cpu") -> str:
    """CPU model, logical CPUs, torch version and threads; the GPU's name when ``device`` is CUDA."""
    import torch

    cpu = (f"{cpu_name()}; {os.cpu_count()} logical CPUs; torch threads {torch.get_num_threads()}; "
           f"torch {torch.__version__}")
    if str(device).startswith("cuda") and torch.cuda.is_available():
        return f"{torch.cuda.get_device_name(0)}; {cpu}"
    return cpu
