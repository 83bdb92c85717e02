"""Where a result was measured: hardware and library versions, recorded with every run."""

from __future__ import annotations

import importlib.metadata
import os
import platform

import torch

LIBRARIES = ("torch", "transformers", "peft", "accelerate", "lm_eval", "optuna", "pandas", "numpy")


def versions() -> dict[str, str]:
    out = {"python": platform.python_version()}
    for name in LIBRARIES:
        try:
            out[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            continue
    return out


def describe(device: torch.device) -> dict:
    info = {
        "platform": platform.platform(),
        "processor": platform.machine(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "device": str(device),
    }
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        info["gpu"] = props.name
        info["gpu_memory_gib"] = round(props.total_memory / 2**30, 1)
    return info


def one_line(machine: dict) -> str:
    where = machine.get("gpu") or f"{machine['processor']} CPU, {machine['torch_threads']} threads ({machine['cpu_count']} cores)"
    return f"{where}; {machine['platform']}"
