"""Print the installed torch's build facts as CMake `set()` lines (read by CMakeLists.txt)."""
import torch
import torch.utils.cpp_extension as ext


def cmake_list(items):
    return ";".join(str(p).replace("\\", "/") for p in items)


print(f'set(TORCH_INCLUDE_DIRS "{cmake_list(ext.include_paths())}")')
print(f'set(TORCH_LIBRARY_DIRS "{cmake_list(ext.library_paths())}")')
print(f"set(TORCH_CXX11_ABI {int(torch._C._GLIBCXX_USE_CXX11_ABI)})")
print(f'set(TORCH_CUDA_VERSION "{torch.version.cuda or ""}")')
print(f'set(TORCH_VERSION "{torch.__version__}")')
