"""What the numbers were measured on: CPU/GPU, memory, library versions."""

from __future__ import annotations

import os
import platform
from importlib import metadata

PACKAGES = ("loralab", "torch", "transformers", "peft", "bitsandbytes", "accelerate")


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as fh:
            for line in fh:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def total_memory_bytes() -> int | None:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return None


def gpu_name() -> str:
    import torch

    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        return f"{props.name} ({props.total_memory / 2**30:.0f} GiB) × {torch.cuda.device_count()}"
    return "none"


def environment() -> dict[str, str]:
    """A flat dict, shown as a table in the report and saved in results.json."""
    mem = total_memory_bytes()
    env = {
        "CPU": f"{cpu_name()} ({os.cpu_count()} logical cores)",
        "memory": f"{mem / 2**30:.1f} GiB" if mem else "unknown",
        "GPU": gpu_name(),
        "OS": f"{platform.system()} {platform.release()}",
        "Python": platform.python_version(),
    }
    for package in PACKAGES:
        try:
            env[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            env[package] = "not installed"
    return env
