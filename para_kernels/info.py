"""What this installation has and which kernels run where: ``python -m para_kernels.info [--json]``.

Paste its output into a bug report. Every probe is guarded: a broken part shows as an error
line, never as a crash of this tool.
"""
from __future__ import annotations

import json
import os
import platform
import re
import shutil
import subprocess
import sys
import warnings


def _guard(probe):
    try:
        return probe()
    except Exception as e:  # shown, never raised
        return {"error": f"{type(e).__name__}: {e}"}


def _package() -> dict:
    from importlib import metadata

    import para_kernels
    try:  # a wheel's version names the torch and CUDA it was built for (0.1.0+cu130torch2.14)
        installed = metadata.version("para_kernels")
    except metadata.PackageNotFoundError:
        installed = None
    return {"version": para_kernels.__version__, "installed": installed,
            "path": os.path.dirname(os.path.abspath(para_kernels.__file__))}


def _python() -> dict:
    return {"version": platform.python_version(), "executable": sys.executable}


def _torch() -> dict:
    import torch
    try:
        cudnn = torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None
    except Exception as e:
        cudnn = f"{type(e).__name__}: {e}"
    return {"version": torch.__version__, "cuda_build": torch.version.cuda, "cudnn": cudnn}


def _triton() -> dict:
    try:
        import triton
    except Exception as e:
        return {"version": None, "error": f"not importable ({type(e).__name__}: {e})"}
    return {"version": triton.__version__, "interpreter": os.environ.get("TRITON_INTERPRET") == "1"}


def _gpus() -> dict:
    import torch
    if not torch.cuda.is_available():
        return {"count": 0, "devices": []}
    driver = getattr(torch._C, "_cuda_getDriverVersion", lambda: None)()
    devices = [{"name": torch.cuda.get_device_name(i), "capability": "%d.%d" % torch.cuda.get_device_capability(i)}
               for i in range(torch.cuda.device_count())]
    return {"count": len(devices), "driver": None if driver is None else f"{driver // 1000}.{driver % 1000 // 10}",
            "devices": devices}


def _toolkit() -> dict:
    nvcc = shutil.which("nvcc")
    release = None
    if nvcc:
        out = subprocess.run([nvcc, "--version"], capture_output=True, text=True, timeout=60).stdout
        match = re.search(r"release (\d+\.\d+)", out)
        release = match.group(1) if match else None
    return {"nvcc": nvcc, "nvcc_cuda": release, "CUDA_HOME": os.environ.get("CUDA_HOME") or None,
            "usr_local_cuda": os.path.isdir("/usr/local/cuda")}


def _extension() -> dict:
    from para_kernels.ops import cuda_ops
    return cuda_ops.status()


def _dispatch() -> dict:
    import torch

    from para_kernels.ops import dispatch
    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    with warnings.catch_warnings(record=True) as caught:  # fallback warnings become text here
        warnings.simplefilter("always")
        per_device = {dev: {op: _guard(lambda op=op, dev=dev: dispatch.backend_for(op, torch.device(dev)))
                            for op in dispatch.OPS} for dev in devices}
    return {"forced": dispatch.get_backend(), "env": {dispatch.ENV_VAR: os.environ.get(dispatch.ENV_VAR)},
            "available": {dev: dispatch.available_backends(dev) for dev in devices},
            "backend_for": per_device, "warnings": sorted({str(w.message) for w in caught})}


def collect() -> dict:
    return {"para_kernels": _guard(_package), "python": _guard(_python), "torch": _guard(_torch),
            "triton": _guard(_triton), "gpu": _guard(_gpus), "toolkit": _guard(_toolkit),
            "extension": _guard(_extension), "dispatch": _guard(_dispatch)}


def _line(label: str, value: str) -> str:
    return f"{label:<14}{value}"


def _err(section: dict) -> str | None:
    return section.get("error") if isinstance(section, dict) else None


def render(info: dict) -> str:
    lines = []
    pkg, py, tc, tr = info["para_kernels"], info["python"], info["torch"], info["triton"]
    version = pkg.get("version")
    if pkg.get("installed") and pkg["installed"].split("+")[0] == version:  # not a stale editable record
        version = pkg["installed"]
    lines.append(_line("para_kernels", _err(pkg) or f"{version} at {pkg['path']}"))
    lines.append(_line("Python", _err(py) or f"{py['version']} ({py['executable']})"))
    lines.append(_line("torch", _err(tc) or f"{tc['version']}, CUDA build: {tc['cuda_build'] or 'none (CPU only)'}, "
                                            f"cuDNN: {tc['cudnn']}"))
    lines.append(_line("Triton", tr.get("error") or f"{tr['version']}"
                       + (" (interpreter: TRITON_INTERPRET=1)" if tr.get("interpreter") else "")))
    gpu = info["gpu"]
    if _err(gpu):
        lines.append(_line("GPU", _err(gpu)))
    elif not gpu["count"]:
        lines.append(_line("GPU", "no GPU visible"))
    else:
        for i, dev in enumerate(gpu["devices"]):
            lines.append(_line(f"GPU {i}", f"{dev['name']}, compute capability {dev['capability']}, "
                                           f"driver {gpu['driver']}"))
    tk = info["toolkit"]
    lines.append(_line("nvcc", _err(tk) or (f"{tk['nvcc']} (CUDA {tk['nvcc_cuda']})" if tk["nvcc"] else "not on PATH")
                       + ("" if _err(tk) else f"; CUDA_HOME={tk['CUDA_HOME'] or 'unset'}")))
    ext = info["extension"]
    if _err(ext):
        lines.append(_line("_C", _err(ext)))
    else:
        state = "built and loaded" if ext["loaded"] else ("built, NOT loaded" if ext["built"] else "not built")
        lines.append(_line("_C", state + ("" if ext["loaded"] else f": {ext['reason']}")))
        meta = ext.get("build_info") or {}
        if meta:
            lines.append(_line("  built for", f"torch {meta.get('torch')}, CUDA {meta.get('torch_cuda')} "
                                              f"(nvcc {meta.get('nvcc_cuda')}), archs {meta.get('archs')}"))
            lines.append(_line("  built with", f"{meta.get('compiler')}, at {meta.get('built_at')}"))
        if ext.get("compiled_against"):
            lines.append(_line("  binary", str(ext["compiled_against"])))
        if ext["loaded"]:
            lines.append(_line("  kernels", ", ".join(ext["kernel_ops"]) or "none registered"))
    dp = info["dispatch"]
    if _err(dp):
        lines.append(_line("backends", _err(dp)))
    else:
        env_var, env_value = next(iter(dp["env"].items()))
        lines.append(_line("backend", f"forced: {dp['forced'] or 'no (best per device)'}; "
                                      f"{env_var}={env_value if env_value is not None else 'unset'}"))
        for dev, per_op in dp["backend_for"].items():
            by_backend = {}
            for op, name in per_op.items():
                by_backend.setdefault(str(name), []).append(op)
            runs = "; ".join(f"{name}: {'every op' if len(by_backend) == 1 else ', '.join(ops)}"
                             for name, ops in by_backend.items())
            lines.append(_line(f"  {dev}", f"{runs} (can run here: {', '.join(dp['available'][dev])})"))
        lines += [_line("  warning", w) for w in dp["warnings"]]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if any(a not in ("--json",) for a in argv):
        print("usage: python -m para_kernels.info [--json]", file=sys.stderr)
        return 2
    info = collect()
    print(json.dumps(info, indent=1, default=str) if "--json" in argv else render(info))
    return 0


if __name__ == "__main__":
    sys.exit(main())
