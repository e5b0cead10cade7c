"""Static check of the GPU image, run inside it (no GPU needed):

    docker run --rm --network none --entrypoint python \
        -v "$PWD/scripts/ci/check_gpu_image.py:/tmp/check.py:ro" \
        pneumonia-screening:gpu /tmp/check.py

(scripts/ci/docker-smoke.sh runs it after building the image.) The service's modules come from the
image's own PYTHONPATH, /srv/pneumonia.

1. the only ONNX Runtime installed is onnxruntime-gpu, and it offers CUDAExecutionProvider;
2. ONNX Runtime's CUDA provider library, and every CUDA/cuDNN library in the NVIDIA wheels (cuDNN
   opens its engine libraries at run time, so they are checked as well), resolve all their shared
   library dependencies with `ldd`, given the wheels' lib directories on LD_LIBRARY_PATH as the
   preload makes them available; the one exception allowed is the driver, libcuda.so.1, which the
   NVIDIA Container Toolkit mounts from the host;
3. the service's own preload step (app/model/gpu.py) loads CUDA, cuBLAS and cuDNN into the process.

What it cannot show is a session running on a GPU: that needs a GPU host. Exit status 0 when
every check passes; the report goes to stdout.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

# Provided at run time by the host's NVIDIA driver through the container toolkit, not the image.
HOST_DRIVER_LIBRARIES = {"libcuda.so.1"}
# What preloading must have put into the process (prefixes of the mapped file names).
MUST_PRELOAD = ("libcudart.so.", "libcublas.so.", "libcublasLt.so.", "libcudnn.so.")

failures: list[str] = []


def check(ok: bool, what: str) -> bool:
    print(f"[gpu-image] {'ok  ' if ok else 'FAIL'} {what}")
    if not ok:
        failures.append(what)
    return ok


def unresolved(library: Path, search_path: str) -> set[str]:
    env = {**os.environ, "LD_LIBRARY_PATH": search_path}
    result = subprocess.run(
        ["ldd", str(library)], capture_output=True, text=True, env=env, check=False
    )
    if result.returncode != 0:
        return {f"(ldd failed: {result.stderr.strip() or result.stdout.strip()})"}
    return {
        line.split("=>")[0].strip() for line in result.stdout.splitlines() if "not found" in line
    }


def main() -> int:
    import onnxruntime as ort

    from app.model.gpu import preload_cuda_libraries
    from app.model.loading import installed_runtimes
    from app.settings import Settings

    runtimes = installed_runtimes()
    check(runtimes == ["onnxruntime-gpu"], f"ONNX Runtime distributions installed: {runtimes}")
    providers = ort.get_available_providers()
    check("CUDAExecutionProvider" in providers, f"onnxruntime {ort.__version__} offers {providers}")

    capi = Path(ort.__file__).parent / "capi"
    provider_library = capi / "libonnxruntime_providers_cuda.so"
    if not check(provider_library.is_file(), f"{provider_library.name} in {capi}"):
        return 1

    site_packages = Path(ort.__file__).parent.parent
    lib_dirs = sorted(p for p in (site_packages / "nvidia").glob("*/lib") if p.is_dir())
    check(bool(lib_dirs), f"NVIDIA wheel lib directories: {[str(d.parent.name) for d in lib_dirs]}")
    search_path = os.pathsep.join(str(d) for d in lib_dirs)
    cuda_libraries = sorted(p for d in lib_dirs for p in d.glob("lib*.so*") if p.is_file())
    names = {p.name for p in cuda_libraries}
    for soname in ("libcudart.so.13", "libcublas.so.13", "libcublasLt.so.13", "libcudnn.so.9"):
        check(soname in names, f"{soname} is in the image")

    for library in [provider_library, *cuda_libraries]:
        missing = unresolved(library, search_path)
        from_host = sorted(missing & HOST_DRIVER_LIBRARIES)
        missing -= HOST_DRIVER_LIBRARIES
        detail = f" (missing {sorted(missing)})" if missing else ""
        if from_host:
            detail += f" (the host's driver provides {', '.join(from_host)})"
        shown = library.relative_to(site_packages)
        check(not missing, f"ldd {shown}: dependencies resolve{detail}")

    settings = Settings(provider="cuda", _env_file=None)  # type: ignore[call-arg]
    loaded = preload_cuda_libraries(settings)
    for prefix in MUST_PRELOAD:
        check(any(name.startswith(prefix) for name in loaded), f"preload loaded {prefix}*")

    size = sum(p.stat().st_size for d in lib_dirs for p in d.rglob("*") if p.is_file())
    print(f"[gpu-image] NVIDIA libraries: {len(cuda_libraries)} files, {size / 1e9:.2f} GB")
    if failures:
        print(f"[gpu-image] {len(failures)} check(s) failed", file=sys.stderr)
        return 1
    print("[gpu-image] all checks passed (not run on a GPU: that needs a GPU host)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
