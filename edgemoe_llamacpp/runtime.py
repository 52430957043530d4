"""llama.cpp's native side: ggml_tensor field offsets, the library llama.cpp computes with, and the patched
ggml-cpu's per-expert registry (libc calls on pages: edgemoe_llamacpp.pages).

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
import os

# struct ggml_tensor (ggml.h): type@0, buffer@8, ne[4]@16, nb[4]@48, op@80, src[10]@152, data@248, name[64]@256
T_TYPE, T_NE, T_NB, T_OP, T_SRC, T_DATA, T_NAME = 0, 16, 48, 80, 152, 248, 256
GGML_MAX_SRC = 10
GGML_MAX_NAME = 64

_libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)


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
