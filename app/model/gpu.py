"""CUDA user-space libraries for onnxruntime-gpu, loaded before the first session is created.

onnxruntime-gpu 1.31 is built for CUDA 13 and cuDNN 9 but does not bundle them. The image's `gpu`
extra installs them as NVIDIA's wheels (`onnxruntime-gpu[cuda,cudnn]`), whose libraries sit in
`site-packages/nvidia/*/lib`, a directory the dynamic loader does not search. Without this step the
CUDA provider fails to load (`libcudnn.so.9: cannot open shared object file`) and a session falls
back to the CPU. `onnxruntime.preload_dlls()` loads them by absolute path first, so the provider
library finds them already in the process. Only the GPU driver (`libcuda.so.1`) comes from the host,
through the NVIDIA Container Toolkit.
"""

from __future__ import annotations

import contextlib
import io
import logging
from pathlib import Path

import onnxruntime as ort

from app.settings import Settings

logger = logging.getLogger(__name__)

CUDA_PROVIDER = "CUDAExecutionProvider"
# The libraries whose presence in the process says that preloading worked.
_CUDA_LIBRARY_PREFIXES = ("libcudart.so", "libcublas.so", "libcublasLt.so", "libcudnn.so")


def wants_cuda(settings: Settings) -> bool:
    """Whether the session may use CUDA: not forced to CPU, and the installed runtime has it."""
    return settings.provider != "cpu" and CUDA_PROVIDER in ort.get_available_providers()


def loaded_cuda_libraries(maps: Path = Path("/proc/self/maps")) -> list[str]:
    """File names of the CUDA/cuDNN libraries mapped into this process (Linux only)."""
    try:
        lines = maps.read_text().splitlines()
    except OSError:
        return []
    names = {Path(line.split()[-1]).name for line in lines if "/" in line}
    return sorted(name for name in names if name.startswith(_CUDA_LIBRARY_PREFIXES))


def preload_cuda_libraries(settings: Settings) -> list[str]:
    """Load CUDA and cuDNN from the NVIDIA wheels when the session may use CUDA; return the CUDA
    libraries then loaded. A no-op (empty list) for CPU runtimes and `CXR_PROVIDER=cpu`.

    ONNX Runtime reports failures by printing; they are captured and logged as warnings so that
    a missing library shows up in the structured log (readiness then names the consequence)."""
    if not wants_cuda(settings):
        return []
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        ort.preload_dlls(cuda=True, cudnn=True, msvc=False)
    for line in printed.getvalue().splitlines():
        if line.strip():
            logger.warning("cuda library preload", extra={"fields": {"message": line.strip()}})
    loaded = loaded_cuda_libraries()
    logger.info("cuda libraries", extra={"fields": {"loaded": loaded}})
    return loaded
