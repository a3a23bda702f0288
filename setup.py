"""Build and install mmkernels.

Switches (environment variables):
  MMKERNELS_SKIP_EXT=1    do not build the extension mmkernels._C at all
  MMKERNELS_BUILD_CUDA=1  compile the CUDA sources even without a visible GPU (compile check; needs nvcc)
  MMKERNELS_BUILD_CUDA=0  never compile the CUDA sources
  TORCH_CUDA_ARCH_LIST    target architectures (default "9.0" when no GPU is visible)
  MMKERNELS_PTXAS_VERBOSE=1  pass -Xptxas=-v to nvcc (registers, spills, shared memory per CUDA kernel; CI prints them)
Install with `pip install --no-build-isolation -e .` (pyproject.toml selects the PEP 517/660 path): the extension
is built against the torch already installed, which an isolated build environment does not have.
The C++ CPU sources are always built unless MMKERNELS_SKIP_EXT=1.
"""

import glob
import os
import shutil
import subprocess
import sys

from setuptools import setup

ROOT = os.path.dirname(os.path.abspath(__file__))
VERSION = "0.1.0"


def _log(msg):
    print(f"[mmkernels setup] {msg}", file=sys.stderr)


def _cuda_home():
    home = os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH")
    if home and os.path.exists(os.path.join(home, "bin", "nvcc")):
        return home
    if os.path.exists("/usr/local/cuda/bin/nvcc"):
        return "/usr/local/cuda"
    nvcc = shutil.which("nvcc")
    if nvcc:
        return os.path.dirname(os.path.dirname(os.path.realpath(nvcc)))
    return None


def _gpu_visible():
    try:
        out = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True, timeout=20)
        return out.returncode == 0 and "GPU" in out.stdout
    except (OSError, subprocess.SubprocessError):
        return False


def _want_cuda():
    flag = os.environ.get("MMKERNELS_BUILD_CUDA")
    if flag == "0":
        return False, "MMKERNELS_BUILD_CUDA=0"
    home = _cuda_home()
    if home is None:
        return False, "no CUDA toolkit (nvcc) found"
    if flag == "1" or _gpu_visible():
        return True, f"CUDA toolkit at {home}"
    return False, "no GPU visible and MMKERNELS_BUILD_CUDA is not 1"


def _cuda_include_dirs():
    """Headers of the nvidia pip wheels (cusparse.h, curand) that a CUDA build of torch expects."""
    dirs = []
    for site in sys.path:
        for sub in ("nvidia/cu13/include", "nvidia/cu12/include"):
            d = os.path.join(site, sub)
            if os.path.isdir(d):
                dirs.append(d)
    return dirs


def _ext_modules():
    if os.environ.get("MMKERNELS_SKIP_EXT") == "1":
        _log("MMKERNELS_SKIP_EXT=1: not building mmkernels._C")
        return [], {}
    use_cuda, why = _want_cuda()
    if use_cuda:
        # torch.utils.cpp_extension reads CUDA_HOME when it is imported: set it first.
        os.environ["CUDA_HOME"] = os.environ.get("CUDA_HOME") or _cuda_home()
    try:
        from torch.utils.cpp_extension import BuildExtension, CppExtension, CUDAExtension
    except ImportError as exc:  # a build-isolation environment, or no torch yet
        raise SystemExit(
            f"[mmkernels setup] torch is not importable here ({exc}). mmkernels._C is built against the torch you "
            "have installed: install torch first, then run `pip install --no-build-isolation -e .` (or `.`). "
            "To install the pure-Python package without the extension, set MMKERNELS_SKIP_EXT=1."
        ) from None

    cpp = sorted(glob.glob(os.path.join("csrc", "*.cpp")))
    cu = sorted(glob.glob(os.path.join("csrc", "*.cu")))
    # Link the shared libstdc++ that torch itself uses. A compiler whose default search path holds only libstdc++.a
    # (a wrapper g++ on the GPU machines) otherwise embeds a second copy whose exported std:: symbols mix with the
    # process's copy: formatting an integer in an error message then crashed the interpreter (SIGSEGV).
    link_flags = ["-l:libstdc++.so.6"] if sys.platform.startswith("linux") else []
    cxx_flags = ["-O3"]  # the C++ standard is the one torch asks for (C++20 for torch >= 2.13)
    if use_cuda and cu:
        if not _gpu_visible():
            os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "9.0")
        inc = _cuda_include_dirs()
        if inc:
            os.environ["CPATH"] = os.pathsep.join(inc + [p for p in [os.environ.get("CPATH")] if p])
        _log(f"building CPU and CUDA sources ({why}): {', '.join(cu)}")
        ext = CUDAExtension(
            "mmkernels._C",
            cpp + cu,
            include_dirs=[os.path.join(ROOT, "csrc")] + inc,
            define_macros=[("MMKERNELS_WITH_CUDA", "1")],
            extra_link_args=link_flags,
            extra_compile_args={
                "cxx": cxx_flags,
                "nvcc": ["-O3", "-lineinfo"]
                + (["-Xptxas=-v"] if os.environ.get("MMKERNELS_PTXAS_VERBOSE") == "1" else []),
            },
        )
    else:
        _log(f"building CPU sources only ({why})")
        ext = CppExtension(
            "mmkernels._C",
            cpp,
            include_dirs=[os.path.join(ROOT, "csrc")],
            extra_compile_args={"cxx": cxx_flags},
            extra_link_args=link_flags,
        )
    return [ext], {"build_ext": _ReportingBuild.wrap(BuildExtension)}


class _ReportingBuild:
    """Wraps BuildExtension so a failed compile names the source file and the reason."""

    @staticmethod
    def wrap(base):
        class Build(base.with_options(use_ninja=True)):
            def build_extensions(self):
                try:
                    super().build_extensions()
                except Exception as exc:  # re-raised with the failing sources named
                    failing = [line for line in str(exc).splitlines() if "csrc/" in line][:5]
                    _log("building mmkernels._C FAILED. " + ("Failing steps: " + "; ".join(failing) if failing else ""))
                    _log(
                        "Set MMKERNELS_BUILD_CUDA=0 to build the CPU twins only, or MMKERNELS_SKIP_EXT=1 to skip the "
                        "extension."
                    )
                    raise

        return Build


ext_modules, cmdclass = _ext_modules()

setup(
    name="mmkernels",
    version=VERSION,
    description="Fused kernels and a torch.autograd API for balanced multimodal learning "
    "(OGM-GE, OGM, OPM, AGM, MLB, OLM)",
    long_description=open(os.path.join(ROOT, "README.md")).read()
    if os.path.exists(os.path.join(ROOT, "README.md"))
    else "",
    long_description_content_type="text/markdown",
    license="Apache-2.0",
    python_requires=">=3.10",
    packages=[
        "mmkernels",
        "mmkernels.triton_ops",
        "mmkernels.ext_ops",
        "mmkernels.demo",
        "mmkernels.reference",  # the pure-PyTorch oracle, imported by `import mmkernels`
        "mmkernels.integrations",
        "mmkernels.api",
    ],
    package_dir={"mmkernels.api": "python_api"},
    install_requires=["torch>=2.11,<2.15", "numpy", "tqdm", "triton; platform_system == 'Linux'"],  # the range CI tests
    extras_require={
        "test": ["pytest", "pytest-benchmark", "torchvision"],
        "lightning": ["lightning"],  # mmkernels.integrations.lightning
        "hf": ["transformers", "accelerate"],  # mmkernels.integrations.hf
    },
    ext_modules=ext_modules,
    cmdclass=cmdclass,
    zip_safe=False,
)
