"""Native facts in one place: ggml_tensor field offsets, libc calls (madvise, fadvise, mincore), the mapping.

Offsets are those of `struct ggml_tensor` in the llama.cpp vendored by llama-cpp-python 0.3.36 on 64-bit
Linux (GGML_MAX_DIMS=4, GGML_MAX_SRC=10, GGML_MAX_NAME=64); `check_tensor_offsets` verifies them against
libggml-base's own accessors once, before the hook trusts them.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import functools
import mmap
import os
from pathlib import Path

# struct ggml_tensor (ggml.h): type@0, buffer@8, ne[4]@16, nb[4]@48, op@80, src[10]@152, data@248, name[64]@256
T_TYPE, T_NE, T_NB, T_OP, T_SRC, T_DATA, T_NAME = 0, 16, 48, 80, 152, 248, 256
GGML_MAX_SRC = 10
GGML_MAX_NAME = 64
PAGE = mmap.PAGESIZE
MAX_FOLIO_PAGES = (2 << 20) // PAGE   # the largest page-cache folio (PMD size on x86-64)

MADV_RANDOM = 1           # asm-generic/mman-common.h
MADV_DONTNEED = 4
MADV_POPULATE_READ = 22   # Linux 5.14+
POSIX_FADV_DONTNEED = 4   # linux/fadvise.h

_libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
_libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
_libc.mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_void_p]


_libc.readahead.argtypes = [ctypes.c_int, ctypes.c_int64, ctypes.c_size_t]


def readahead(fd: int, offset: int, length: int) -> None:
    """Queue reads of a file range into the page cache (readahead(2); ignores POSIX_FADV_RANDOM)."""
    if _libc.readahead(fd, offset, length) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"readahead: {os.strerror(err)}")


def madvise(addr: int, length: int, advice: int) -> None:
    if _libc.madvise(addr, length, advice) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"madvise({addr:#x}, {length}, {advice}): {os.strerror(err)}")


def fadvise_dontneed(fd: int, offset: int, length: int) -> None:
    os.posix_fadvise(fd, offset, length, POSIX_FADV_DONTNEED)


def flush(fd: int) -> None:
    """Write back a file's dirty pages so that POSIX_FADV_DONTNEED can drop them."""
    try:
        os.fdatasync(fd)
    except OSError:
        pass        # a read-only filesystem has no dirty pages


def mincore_pages(addr: int, length: int) -> bytes:
    """One byte per page of [addr, addr+length) (addr page-aligned): bit 0 set if the page is in memory."""
    n = (length + PAGE - 1) // PAGE
    vec = (ctypes.c_ubyte * n)()
    if _libc.mincore(addr, length, vec) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"mincore: {os.strerror(err)}")
    return bytes(vec)


def resident_bytes(addr: int, length: int) -> int:
    """Bytes of the pages in [addr, addr+length) that mincore reports in memory."""
    return sum(v & 1 for v in mincore_pages(addr, length)) * PAGE


def page_span(offset: int, size: int) -> tuple[int, int]:
    """The page-aligned [start, end) that covers a byte range."""
    return offset // PAGE * PAGE, (offset + size + PAGE - 1) // PAGE * PAGE


def file_mappings(path: str | os.PathLike) -> list[tuple[int, int, int, str]]:
    """(start, end, file offset, perms) of every mapping of `path` in this process (/proc/self/maps)."""
    real = os.path.realpath(path)
    st = os.stat(real)
    inode = f"{st.st_ino}"
    out = []
    for line in Path("/proc/self/maps").read_text().splitlines():
        parts = line.split(None, 5)
        if len(parts) == 6 and parts[4] == inode and parts[5] == real:
            start, end = (int(x, 16) for x in parts[0].split("-"))
            out.append((start, end, int(parts[2], 16), parts[1]))
    return out


def ggml_base():
    """libggml-base from the llama_cpp package (the same library llama.cpp runs with)."""
    lib = ctypes.CDLL(loaded_library("libggml-base.so"))
    lib.ggml_get_name.argtypes = [ctypes.c_void_p]
    lib.ggml_get_name.restype = ctypes.c_void_p
    lib.ggml_nbytes.argtypes = [ctypes.c_void_p]
    lib.ggml_nbytes.restype = ctypes.c_size_t
    return lib


def check_tensor_offsets(t: int) -> None:
    """Assert our field offsets agree with ggml's own accessors on a live tensor."""
    lib = ggml_base()
    if lib.ggml_get_name(t) != t + T_NAME:
        raise RuntimeError("ggml_tensor layout differs from the one edgemoe was built for (name offset)")
    ne = (ctypes.c_int64 * 4).from_address(t + T_NE)
    nb = (ctypes.c_size_t * 4).from_address(t + T_NB)
    # for a block size of 1 (the I32 ids we read), ggml_nbytes = ne0*nb0 + sum((ne_i - 1) * nb_i)
    if lib.ggml_nbytes(t) != nb[0] * ne[0] + sum((ne[i] - 1) * nb[i] for i in range(1, 4)):
        raise RuntimeError("ggml_tensor layout differs from the one edgemoe was built for (ne/nb offsets)")


def loaded_library(stem: str) -> str:
    """Path of the copy of `stem` (e.g. libggml-cpu.so) that llama.cpp itself runs with.

    A wheel cannot hold symlinks, so llama_cpp/lib has libggml-cpu.so, .so.0 and .so.0.x.y as separate
    files; dlopen of another name than the one libllama links would load a second copy with its own state.
    """
    import llama_cpp  # loads libllama and the ggml libraries it links

    lib_dir = str(Path(llama_cpp.__file__).parent / "lib")
    for line in Path("/proc/self/maps").read_text().splitlines():
        path = line.split(None, 5)[-1]
        if path.startswith(lib_dir + "/" + stem):
            return path
    return str(Path(lib_dir) / stem)


@functools.cache
def ggml_cpu():
    """libggml-cpu as llama.cpp loaded it; the patched build exports ggml_cpu_edgemoe_*."""
    return ctypes.CDLL(loaded_library("libggml-cpu.so"))


EDGEMOE_ABI = 1


def patched() -> bool:
    """Is llama-cpp-python built with edgemoe's patches (patches/, tools/build_runtime.py)?"""
    lib = ggml_cpu()
    if not hasattr(lib, "ggml_cpu_edgemoe_abi"):
        return False
    lib.ggml_cpu_edgemoe_abi.restype = ctypes.c_int
    return lib.ggml_cpu_edgemoe_abi() == EDGEMOE_ABI


def runtime_info() -> dict:
    import llama_cpp

    return {"llama_cpp_python": llama_cpp.__version__, "patched": patched()}


def register_expert_types(base: int, types: list[int], pointers: list[int]) -> None:
    """Tell the patched mul_mat_id that the stacked tensor at `base` holds expert e at types[e], pointers[e].

    The caller has checked every pointer against the file mapping (layout.read_layout checks each expert
    fits its slot inside the file).
    """
    lib = ggml_cpu()
    fn = lib.ggml_cpu_edgemoe_register
    fn.argtypes = [ctypes.c_void_p, ctypes.c_int64, ctypes.POINTER(ctypes.c_int32),
                   ctypes.POINTER(ctypes.c_void_p)]
    fn.restype = ctypes.c_int
    n = len(types)
    if fn(base, n, (ctypes.c_int32 * n)(*types), (ctypes.c_void_p * n)(*pointers)) != 0:
        raise RuntimeError(f"ggml_cpu_edgemoe_register refused the tensor at {base:#x} (types {set(types)})")


_generation = 0


def registry_generation() -> int:
    """Bumped whenever the registry is cleared: pointers set since are gone."""
    return _generation


def set_expert(base: int, expert: int, type_id: int, pointer: int) -> None:
    """Point expert `expert` of the registered tensor at `base` to `pointer`, read as `type_id`."""
    fn = ggml_cpu().ggml_cpu_edgemoe_set_expert
    if fn(ctypes.c_void_p(base), ctypes.c_int64(expert), ctypes.c_int32(type_id), ctypes.c_void_p(pointer)) != 0:
        raise RuntimeError(f"ggml_cpu_edgemoe_set_expert refused expert {expert} of the tensor at {base:#x}")


def clear_expert_types() -> None:
    global _generation
    _generation += 1
    ggml_cpu().ggml_cpu_edgemoe_clear()
