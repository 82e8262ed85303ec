"""Build of ftkernels and its one compiled extension, ftkernels._C.

CPU C++ sources always compile. CUDA sources compile when torch is a CUDA build and nvcc is
found (or FTKERNELS_FORCE_CUDA=1); FTKERNELS_CPU_ONLY=1 skips them. Architectures come from
TORCH_CUDA_ARCH_LIST (default 8.0;8.6;8.9;9.0+PTX); MAX_JOBS is honoured by torch's builder.
The version gets a local tag naming torch and CUDA, because the extension only loads with the
torch it was built against.
"""

import glob
import os
import platform

import torch
from setuptools import find_packages, setup
from torch.utils import cpp_extension

BASE_VERSION = "0.1.0"
DEFAULT_ARCHS = "8.0;8.6;8.9;9.0+PTX"
ROOT = os.path.dirname(os.path.abspath(__file__))


def _flag(name):
    return os.environ.get(name, "0").lower() in ("1", "true", "yes", "on")


def want_cuda():
    if _flag("FTKERNELS_CPU_ONLY"):
        return False
    if _flag("FTKERNELS_FORCE_CUDA"):
        if torch.version.cuda is None or cpp_extension.CUDA_HOME is None:
            raise RuntimeError(
                "FTKERNELS_FORCE_CUDA=1 but torch is a CPU build "
                f"(torch {torch.__version__}, CUDA_HOME={cpp_extension.CUDA_HOME}): "
                "install a CUDA build of torch (e.g. torch==2.14.1) and nvcc"
            )
        return True
    return torch.version.cuda is not None and cpp_extension.CUDA_HOME is not None


def local_tag(cuda):
    major_minor = ".".join(torch.__version__.split("+")[0].split(".")[:2])
    flavour = "cu" + torch.version.cuda.replace(".", "") if cuda else "cpu"
    return f"{flavour}.torch{major_minor}"


def cpu_flags():
    flags = ["-O3", "-fopenmp", "-ffp-contract=off"]  # C++ standard: torch picks it
    if platform.machine().lower() in ("x86_64", "amd64"):
        # AVX2 baseline: at::vec::Vectorized is scalar unless the ISA macro is set. CPU_CAPABILITY
        # itself stays undefined so our inline vec symbols live in their own namespace.
        flags += ["-DCPU_CAPABILITY_AVX2", "-mavx2", "-mfma", "-mf16c"]
    return flags


def pip_cuda_includes():
    """Headers of the CUDA libraries that torch's wheels pull in (cuBLAS, cuSPARSE, ...): a minimal
    toolkit (nvcc only) lacks them, and ATen's CUDA headers include them."""
    site = os.path.dirname(os.path.dirname(torch.__file__))
    return sorted(
        d for d in glob.glob(os.path.join(site, "nvidia", "**", "include"), recursive=True) if os.path.isdir(d)
    )


def cudart_dirs():
    """Where libcudart.so lives: torch looks only in CUDA_HOME/lib64, which misses it when CUDA_HOME
    is guessed as /usr/local from an nvcc installed in /usr/local/bin."""
    import shutil

    roots = [cpp_extension.CUDA_HOME or "", os.environ.get("CUDA_PATH", ""), "/usr/local/cuda"]
    nvcc = shutil.which("nvcc")
    if nvcc:
        roots.append(os.path.dirname(os.path.dirname(os.path.realpath(nvcc))))
    dirs = []
    for root in roots:
        for sub in ("lib64", "lib", os.path.join("targets", "x86_64-linux", "lib")):
            d = os.path.join(root, sub)
            if os.path.exists(os.path.join(d, "libcudart.so")) and d not in dirs:
                dirs.append(d)
    return dirs


def build_extension():
    cuda = want_cuda()
    csrc = os.path.join("csrc")
    sources = [os.path.join(csrc, "ftkernels.cpp")] + sorted(
        glob.glob(os.path.join(csrc, "cpu", "*.cpp")) + glob.glob(os.path.join(csrc, "autograd", "*.cpp"))
    )
    include_dirs = [os.path.join(ROOT, csrc, "include")]
    version = f"{BASE_VERSION}+{local_tag(cuda)}"
    defines = [
        f'-DFTK_VERSION="{version}"',
        f'-DFTK_TORCH_VERSION="{torch.__version__}"',
    ]
    cxx = cpu_flags() + defines
    if not cuda:
        ext = cpp_extension.CppExtension(
            "ftkernels._C",
            sources,
            include_dirs=include_dirs,
            extra_compile_args={"cxx": cxx},
            extra_link_args=["-fopenmp"],
        )
        return ext, version
    archs = os.environ.setdefault("TORCH_CUDA_ARCH_LIST", DEFAULT_ARCHS)
    sources += sorted(glob.glob(os.path.join(csrc, "cuda", "*.cu")))
    cuda_defines = defines + ["-DFTK_WITH_CUDA", f'-DFTK_CUDA_ARCHS="{archs}"']
    nvcc = ["-O3", "-lineinfo", "--expt-relaxed-constexpr"] + cuda_defines
    ext = cpp_extension.CUDAExtension(
        "ftkernels._C",
        sources,
        include_dirs=include_dirs + pip_cuda_includes(),
        extra_compile_args={"cxx": cpu_flags() + cuda_defines, "nvcc": nvcc},
        library_dirs=cudart_dirs(),
        extra_link_args=["-fopenmp"],
    )
    return ext, version


ext, version = build_extension()

setup(
    version=version,
    packages=find_packages(include=["ftkernels", "ftkernels.*"]),
    ext_modules=[ext],
    cmdclass={"build_ext": cpp_extension.BuildExtension.with_options(use_ninja=True)},
)
