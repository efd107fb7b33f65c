"""The machine a run measured: device choice and label, CPU model, library versions and the git
commit (recorded in every report, so a number can always be traced to what produced it)."""
from __future__ import annotations

import datetime as _dt
import os
import platform
import subprocess
import sys

import torch

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.lower().startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def git_commit() -> dict:
    def git(*args):
        return subprocess.run(["git", *args], cwd=REPO_ROOT, capture_output=True, text=True,
                              timeout=10).stdout.strip()
    try:
        commit = git("rev-parse", "HEAD")
        dirty = bool(git("status", "--porcelain", "--untracked-files=no"))
        return {"commit": commit or None, "dirty": dirty}
    except (OSError, subprocess.SubprocessError):
        return {"commit": None, "dirty": None}


def pick_device(name: str | None = None) -> torch.device:
    if name:
        return torch.device(name)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def device_label(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"CPU ({cpu_model()})"


def device_slug(device: torch.device) -> str:
    """Short file-name tag for a device: 'cpu', 'cuda-nvidia-h200', ..."""
    if device.type != "cuda":
        return "cpu"
    name = torch.cuda.get_device_name(device).lower()
    return "cuda-" + "".join(c if c.isalnum() else "-" for c in name).strip("-")


def environment(device: torch.device, threads: int) -> dict:
    import transformers

    try:
        import peft
        peft_version = peft.__version__
    except ImportError:  # pragma: no cover - peft is a bench dependency
        peft_version = None
    import para_kernels

    env = {
        "date_utc": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "device": str(device),
        "device_name": device_label(device),
        "cpu_model": cpu_model(),
        "cpu_count": os.cpu_count(),
        "torch_threads": threads,
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "peft": peft_version,
        "para_kernels": para_kernels.__version__,
        "git": git_commit(),
    }
    if device.type == "cuda":
        env["cuda"] = torch.version.cuda
        props = torch.cuda.get_device_properties(device)
        env["gpu_memory_gib"] = round(props.total_memory / 2**30, 1)
    return env
