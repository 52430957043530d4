"""Native facts in one place: ggml_tensor field offsets, libc calls (madvise, fadvise, mincore), the mapping,
and the patched ggml-cpu's per-expert registry.

Every ggml function is looked up through the handle llama-cpp-python holds on libllama, so it is the copy of
the library llama.cpp computes with, however the venv was reached (never a path guessed from llama_cpp's
package directory: a symlinked venv made that a second copy of libggml-cpu with its own, empty registry).

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
_libc.mmap.restype = ctypes.c_void_p
_libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_int64]
_libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
MAP_FAILED = ctypes.c_void_p(-1).value


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


_libc.mlock.argtypes = _libc.munlock.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
_libc.mremap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_size_t, ctypes.c_int, ctypes.c_void_p]
_libc.mremap.restype = ctypes.c_void_p
_libc.mprotect.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
MREMAP_MAYMOVE, MREMAP_FIXED = 1, 2


def _os_error(what: str) -> OSError:
    err = ctypes.get_errno()
    return OSError(err, f"{what}: {os.strerror(err)}")


def mlock(addr: int, length: int) -> None:
    """Lock [addr, addr+length) in memory (mlock(2)): its pages are read in and never reclaimed."""
    if _libc.mlock(addr, length) != 0:
        raise _os_error("mlock")


def munlock(addr: int, length: int) -> None:
    _libc.munlock(addr, length)


def replace_with_anonymous_copy(addr: int, length: int) -> None:
    """Replace the mapping over [addr, addr+length) (page-aligned) by an anonymous read-only copy of its bytes, in
    place: a private anonymous mapping is filled from it, made read-only and moved over it (mremap)."""
    new = _libc.mmap(None, length, mmap.PROT_READ | mmap.PROT_WRITE, mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS, -1, 0)
    if new in (None, MAP_FAILED):
        raise _os_error("mmap")
    try:
        ctypes.memmove(new, addr, length)
        if _libc.mprotect(new, length, mmap.PROT_READ) != 0:
            raise _os_error("mprotect")
        if _libc.mremap(new, length, length, MREMAP_MAYMOVE | MREMAP_FIXED, addr) in (None, MAP_FAILED):
            raise _os_error("mremap")
    except BaseException:
        _libc.munmap(new, length)
        raise


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


def file_cached_bytes(path: str | os.PathLike, spans=None) -> int:
    """Bytes of `path` in the page cache (of its page-aligned `spans`, [start, end) file offsets; default the whole
    file), seen from any process: mincore over a read-only shared mapping of it (mapping reads nothing)."""
    size = os.path.getsize(path)
    if not size:
        return 0
    fd = os.open(path, os.O_RDONLY)
    try:
        addr = _libc.mmap(None, size, mmap.PROT_READ, mmap.MAP_SHARED, fd, 0)
        if addr in (None, MAP_FAILED):
            err = ctypes.get_errno()
            raise OSError(err, f"mmap {path}: {os.strerror(err)}")
        try:
            return sum(resident_bytes(addr + a, b - a) for a, b in spans) if spans is not None else \
                min(size, resident_bytes(addr, size))
        finally:
            _libc.munmap(addr, size)
    finally:
        os.close(fd)


def page_span(offset: int, size: int) -> tuple[int, int]:
    """The page-aligned [start, end) that covers a byte range."""
    return offset // PAGE * PAGE, (offset + size + PAGE - 1) // PAGE * PAGE


def merge_spans(spans) -> list[tuple[int, int]]:
    """[start, end) ranges sorted, overlapping or touching ones joined."""
    merged: list[tuple[int, int]] = []
    for a, b in sorted(spans):
        if merged and a <= merged[-1][1]:
            merged[-1] = (merged[-1][0], max(merged[-1][1], b))
        else:
            merged.append((a, b))
    return merged


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
    """ggml's own functions (libggml-base) in the copy llama.cpp runs with: looked up through libllama's handle."""
    lib = _through_libllama()
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


def _through_libllama() -> ctypes.CDLL:
    """A fresh ctypes view of the libllama llama-cpp-python loaded (its own function cache, so argtypes set here
    touch none of llama_cpp's). dlsym on libllama's handle searches libllama, then the libraries it was linked
    with, in load order: the very copies of libggml, libggml-base and libggml-cpu that llama.cpp computes with,
    wherever they live and however their directory was reached (a symlinked venv, LLAMA_CPP_LIB_PATH)."""
    import llama_cpp.llama_cpp as lc  # loads libllama and the ggml libraries it links

    return ctypes.CDLL(lc._lib._name, handle=lc._lib._handle)


def eval_prefix_filter() -> int | None:
    """The address of llama_eval_prefix_filter (patches/0004) in the libllama llama-cpp-python loaded, or None."""
    return _libllama_function("llama_eval_prefix_filter")


def eval_expert_filter() -> int | None:
    """The address of llama_eval_expert_filter (patches/0005) in the libllama llama-cpp-python loaded, or None."""
    return _libllama_function("llama_eval_expert_filter")


def _libllama_function(name: str) -> int | None:
    try:
        fn = getattr(_through_libllama(), name)
    except AttributeError:
        return None
    return ctypes.cast(fn, ctypes.c_void_p).value


class _DlInfo(ctypes.Structure):
    _fields_ = [("dli_fname", ctypes.c_char_p), ("dli_fbase", ctypes.c_void_p),
                ("dli_sname", ctypes.c_char_p), ("dli_saddr", ctypes.c_void_p)]


# a function each library exports, to find the library's file from its address
_LIBRARY_SYMBOL = {"libllama": "llama_backend_init", "libggml": "ggml_backend_dev_by_type",
                   "libggml-base": "ggml_get_name", "libggml-cpu": "ggml_backend_cpu_reg"}


def loaded_library(stem: str) -> str:
    """The resolved path of the file of `stem` (libllama, libggml, libggml-base or libggml-cpu, with or without
    ".so") that llama.cpp runs with: the library holding the function libllama's handle resolves."""
    name = stem.split(".so", 1)[0]
    if name not in _LIBRARY_SYMBOL:
        raise ValueError(f"no known symbol of {stem!r}; one of {sorted(_LIBRARY_SYMBOL)}")
    addr = ctypes.cast(getattr(_through_libllama(), _LIBRARY_SYMBOL[name]), ctypes.c_void_p).value
    info = _DlInfo()
    dladdr = _libc.dladdr
    dladdr.argtypes = [ctypes.c_void_p, ctypes.POINTER(_DlInfo)]
    if not dladdr(addr, ctypes.byref(info)) or not info.dli_fname:
        raise RuntimeError(f"dladdr found no library holding {_LIBRARY_SYMBOL[name]}")
    return os.path.realpath(os.fsdecode(info.dli_fname))


# ggml-cpu's per-expert registry (patches/0001), reached as llama.cpp reaches it (patches/0002): through the CPU
# backend's ggml_backend_reg_get_proc_address, in the copy of ggml-cpu llama.cpp computes with.
EDGEMOE_ABI = 2
GGML_BACKEND_DEVICE_TYPE_CPU = 0
_STATUS = {-1: "invalid arguments (NULL pointer, expert out of range)",
           -2: "a type the CPU backend cannot compute, or whose blocks do not divide the rows",
           -3: "too many distinct types in one tensor", -4: "too many tensors registered", -5: "out of memory",
           -6: "no tensor registered at that address"}


class _Registry:
    def __init__(self, proc):
        i64, i32, vp = ctypes.c_int64, ctypes.c_int32, ctypes.c_void_p
        self.register = proc("register", ctypes.c_int, vp, i64, i64, ctypes.POINTER(i32), ctypes.POINTER(vp))
        self.set_expert = proc("set_expert", ctypes.c_int, vp, i64, i32, vp)
        self.lookup = proc("lookup", ctypes.c_int, vp, i64, ctypes.POINTER(i32), ctypes.POINTER(vp))
        self.unregister = proc("unregister", ctypes.c_int, vp)


@functools.cache
def _registry() -> _Registry | None:
    lib = _through_libllama()
    lib.ggml_backend_dev_by_type.argtypes = [ctypes.c_int]
    lib.ggml_backend_dev_by_type.restype = ctypes.c_void_p
    lib.ggml_backend_dev_backend_reg.argtypes = [ctypes.c_void_p]
    lib.ggml_backend_dev_backend_reg.restype = ctypes.c_void_p
    lib.ggml_backend_reg_get_proc_address.argtypes = [ctypes.c_void_p, ctypes.c_char_p]
    lib.ggml_backend_reg_get_proc_address.restype = ctypes.c_void_p
    dev = lib.ggml_backend_dev_by_type(GGML_BACKEND_DEVICE_TYPE_CPU)
    reg = lib.ggml_backend_dev_backend_reg(dev) if dev else None
    if not reg:
        return None
    keep = [lib]        # the CFUNCTYPE objects below point into it

    def proc(name, restype, *argtypes):
        addr = lib.ggml_backend_reg_get_proc_address(reg, f"ggml_cpu_edgemoe_{name}".encode())
        if not addr:
            raise LookupError(name)
        fn = ctypes.CFUNCTYPE(restype, *argtypes)(addr)
        fn.keep = keep
        return fn

    try:
        if proc("abi", ctypes.c_int)() != EDGEMOE_ABI:
            return None
        return _Registry(proc)
    except LookupError:
        return None


def patched() -> bool:
    """Is llama-cpp-python built with edgemoe's patches (`edgemoe build-runtime`)? Asked of the CPU backend
    llama.cpp computes with."""
    return _registry() is not None


def _require_registry() -> _Registry:
    reg = _registry()
    if reg is None:
        raise RuntimeError("this llama-cpp-python is not built with edgemoe's patches (ABI "
                           f"{EDGEMOE_ABI}); build it: edgemoe build-runtime")
    return reg


def runtime_info() -> dict:
    import llama_cpp

    return {"llama_cpp_python": llama_cpp.__version__, "patched": patched(),
            "libggml_cpu": loaded_library("libggml-cpu")}


def register_expert_types(base: int, n_per_row: int, types: list[int], pointers: list[int]) -> None:
    """Tell the patched mul_mat_id that the stacked tensor at `base` (rows of `n_per_row` values) holds expert e
    at types[e], pointers[e]. The patched loader does this itself for the files edgemoe writes (their
    `edgemoe.required_features`); this is for tests and other writers. The caller keeps every pointer valid
    until unregister_expert_types(base)."""
    n = len(types)
    status = _require_registry().register(base, n, n_per_row, (ctypes.c_int32 * n)(*types),
                                          (ctypes.c_void_p * n)(*pointers))
    if status != 0:
        raise RuntimeError(f"ggml_cpu_edgemoe_register refused the tensor at {base:#x}: {_STATUS.get(status, status)}")


def unregister_expert_types(base: int) -> bool:
    """Forget the tensor at `base`; False if nothing was registered there."""
    return _require_registry().unregister(base) == 0


def lookup_expert(base: int, expert: int) -> tuple[int, int] | None:
    """(type, pointer) the kernel llama.cpp computes with uses for `expert` of the tensor at `base`, or None if that
    tensor is not registered there."""
    t, p = ctypes.c_int32(), ctypes.c_void_p()
    status = _require_registry().lookup(base, expert, ctypes.byref(t), ctypes.byref(p))
    if status == -6:
        return None
    if status != 0:
        raise RuntimeError(f"ggml_cpu_edgemoe_lookup({base:#x}, {expert}): {_STATUS.get(status, status)}")
    return t.value, p.value


def check_registered(name: str, base: int, types: list[int], pointers: list[int]) -> None:
    """Raise unless the registry llama.cpp computes with holds exactly these experts for the tensor at `base`."""
    for e, (want_type, want_ptr) in enumerate(zip(types, pointers, strict=True)):
        got = lookup_expert(base, e)
        if got != (want_type, want_ptr):
            what = "nothing registered" if got is None else f"type {got[0]} at {got[1]:#x}"
            raise RuntimeError(f"{name}: llama.cpp's ggml-cpu ({loaded_library('libggml-cpu')}) has {what} for expert "
                               f"{e}, expected type {want_type} at {want_ptr:#x}: its computations would not see the "
                               f"file's per-expert types")


def registry_generation() -> int:
    """Registrations are made and dropped by llama.cpp's loader with each model, and a model's pointers are never
    reset behind its owner's back: this never changes (kept for substitute.ExpertPointers)."""
    return 0


def set_expert(base: int, expert: int, type_id: int, pointer: int) -> None:
    """Point expert `expert` of the registered tensor at `base` to `pointer`, read as `type_id`."""
    status = _require_registry().set_expert(base, expert, type_id, pointer)
    if status != 0:
        raise RuntimeError(f"ggml_cpu_edgemoe_set_expert refused expert {expert} of the tensor at {base:#x}: "
                           f"{_STATUS.get(status, status)}")
