"""Which device a command runs on: `resolve_device` is the one place a device name is
checked, so `--device cuda` on a machine without CUDA is one clear line in every command."""

from __future__ import annotations

import torch

from samout.errors import SamoutError

DEVICE_HELP = "auto (CUDA if available, else CPU), cpu, cuda, cuda:N"


def resolve_device(name: str | torch.device) -> torch.device:
    """The torch device for `name` ("auto", "cpu", "cuda", "cuda:1", ...), or a SamoutError
    when the name is unknown or the device is not available on this machine."""
    if isinstance(name, torch.device):
        name = str(name)
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except (RuntimeError, ValueError, TypeError):
        raise SamoutError(f"unknown device {name!r}: use {DEVICE_HELP}") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise SamoutError(f"--device {name}: CUDA is not available on this machine; "
                              "use --device cpu (or auto)")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise SamoutError(f"--device {name}: this machine has {torch.cuda.device_count()} CUDA "
                              f"device(s) (cuda:0 to cuda:{torch.cuda.device_count() - 1})")
    elif device.type == "mps" and not torch.backends.mps.is_available():
        raise SamoutError(f"--device {name}: MPS is not available on this machine; use --device cpu")
    elif device.type not in ("cpu", "cuda", "mps"):
        raise SamoutError(f"--device {name}: unsupported device type {device.type!r}; use {DEVICE_HELP}")
    return device
