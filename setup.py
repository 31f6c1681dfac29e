"""Builds dtk._C by running CMakeLists.txt (the single build description)."""
import os
import shutil
import subprocess
import sys
from pathlib import Path

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

ROOT = Path(__file__).resolve().parent


class CMakeExtension(Extension):
    def __init__(self, name):
        super().__init__(name, sources=[])


def _cuda_home():
    """The toolkit root holding lib64/libcudart.so (nvcc may be a wrapper outside it)."""
    for cand in (os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda"):
        if cand and (Path(cand) / "bin" / "nvcc").exists():
            return cand
    return None


def _cmake() -> str:
    """The CMake to run: the build requirement `cmake` installed for this Python (pip puts it in
    the build environment or the venv), whatever PATH says, since an older system CMake may not
    know the flags of a newer nvcc (C++20 for CUDA 13); else the first cmake on PATH."""
    try:
        import cmake
        exe = os.path.join(cmake.CMAKE_BIN_DIR, "cmake")
        if os.path.exists(exe):
            return exe
    except ImportError:
        pass
    return shutil.which("cmake") or "cmake"


class CMakeBuild(build_ext):
    def build_extension(self, ext):
        out_dir = Path(self.get_ext_fullpath(ext.name)).resolve().parent
        build_dir = Path(self.build_temp).resolve() / ext.name
        build_dir.mkdir(parents=True, exist_ok=True)
        cfg = [
            f"-DCMAKE_LIBRARY_OUTPUT_DIRECTORY={out_dir}",
            f"-DPython_EXECUTABLE={sys.executable}",
            "-DCMAKE_BUILD_TYPE=Release",
            "-G", "Ninja",
        ]
        # Always pass the option: the CMake cache would otherwise keep an earlier DTK_WITH_CUDA=0.
        cfg.append("-DDTK_WITH_CUDA=" + ("OFF" if os.environ.get("DTK_WITH_CUDA", "1") == "0" else "ON"))
        cuda_home = _cuda_home()
        if cuda_home:
            cfg.append(f"-DCMAKE_CUDA_COMPILER={cuda_home}/bin/nvcc")
            cfg.append(f"-DCUDAToolkit_ROOT={cuda_home}")
        archs = os.environ.get("TORCH_CUDA_ARCH_LIST")
        if archs:  # "8.0;9.0a" -> "80;90a"
            cfg.append("-DCMAKE_CUDA_ARCHITECTURES=" + ";".join(
                a.replace(".", "").replace("+PTX", "") for a in archs.replace(" ", ";").split(";") if a))
        else:      # CMakeLists.txt's default, not an earlier build's cached TORCH_CUDA_ARCH_LIST
            cfg.append("-UCMAKE_CUDA_ARCHITECTURES")
        cmake = _cmake()
        subprocess.run([cmake, str(ROOT), *cfg], cwd=build_dir, check=True)
        jobs = os.environ.get("MAX_JOBS", str(os.cpu_count() or 2))
        subprocess.run([cmake, "--build", ".", "--parallel", jobs], cwd=build_dir, check=True)


setup(ext_modules=[CMakeExtension("dtk._C")], cmdclass={"build_ext": CMakeBuild})
