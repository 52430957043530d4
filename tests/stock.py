"""Stock llama.cpp for the tests that compare against it, always in a child process.

Stock llama-cpp-python 0.3.36 dies with SIGSEGV/SIGILL in its AMX repack on some Intel Xeons: in-process, that
kills pytest. Here it is a failed test that names the signal ("stock llama.cpp died with SIGSEGV"), and the rest
of the suite runs. The child imports llama_cpp from EDGEMOE_STOCK_RUNTIME when it is set (an unpatched build,
or a stand-in: `write_crashing_standin`), else this interpreter's. Tests that use it carry
`@pytest.mark.stock`.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from edgemoe_bench.bench import STOCK_RUNTIME_ENV, signal_name, stock_env

CHILD = r"""
import json, sys
import numpy as np
import llama_cpp

a = json.loads(sys.argv[1])
if not a.get("repack", True):                   # llama.cpp's CPU repack off: the kernels edgemoe runs
    import llama_cpp.llama_cpp as lc
    _defaults = lc.llama_model_default_params

    def _no_repack():
        p = _defaults()
        p.use_extra_bufts = False
        return p

    lc.llama_model_default_params = _no_repack
if a.get("trace"):                              # the trace's routing (edgemoe's injecting hook, no cache)
    from edgemoe_bench.inject import trace_injector
    from edgemoe_llamacpp.engine.llama import stock_llama
    llm = stock_llama(a["path"], use_extra_bufts=a.get("repack", True),
                      route_injector=trace_injector(a["trace"], a["path"]), n_ctx=a["n_ctx"],
                      seed=a.get("seed", 0), verbose=False)
else:
    llm = llama_cpp.Llama(model_path=a["path"], n_ctx=a["n_ctx"], seed=a.get("seed", 0), verbose=False)


def logits():
    return np.ctypeslib.as_array(llm._ctx.get_logits_ith(-1), shape=(llm.n_vocab(),)).copy()


if a["op"] == "greedy":
    llm.eval(llm.tokenize(a["prompt"].encode()))
    tokens, rows = [], [logits()]
    for _ in range(a["n"]):
        tokens.append(int(rows[-1].argmax()))
        llm.eval([tokens[-1]])
        rows.append(logits())
    np.save(a["out"], np.stack(rows))
    injector = getattr(llm, "route_injector", None)
    print(json.dumps({"tokens": tokens, "llama_cpp": llama_cpp.__file__,
                      "injected": injector.injected if injector else None}))
else:
    texts = [llm.create_completion(p, max_tokens=a["max_tokens"], temperature=0.0,
                                   repeat_penalty=a["repeat_penalty"])["choices"][0]["text"] for p in a["prompts"]]
    print(json.dumps({"texts": texts, "llama_cpp": llama_cpp.__file__}))
llm.close()
"""


def check(proc: subprocess.CompletedProcess, what: str = "stock llama.cpp") -> None:
    """A child killed by a signal is a failed test that names it."""
    sig = signal_name(proc.returncode)
    if sig is not None:
        where = os.environ.get(STOCK_RUNTIME_ENV) or "this interpreter"
        pytest.fail(f"{what} died with {sig} (llama_cpp from {where})\n{(proc.stderr or '')[-2000:]}",
                    pytrace=False)


def _run(args: dict, timeout: float = 600) -> dict:
    proc = subprocess.run([sys.executable, "-c", CHILD, json.dumps(args)], capture_output=True, text=True,
                          env=stock_env(), timeout=timeout, check=False)
    check(proc)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def greedy(path, prompt: str, n: int, out: Path, *, n_ctx: int = 256,
           repack: bool = True) -> tuple[list[int], np.ndarray]:
    """Plain llama_cpp.Llama (llama.cpp's defaults, the CPU repack on unless `repack` is False): n argmax tokens
    after `prompt`, and the logits before each and after the last, (n + 1, vocab); `out` is where the child leaves
    them (.npy)."""
    info = _run({"op": "greedy", "path": str(path), "prompt": prompt, "n": n, "n_ctx": n_ctx, "out": str(out),
                 "repack": repack})
    return info["tokens"], np.load(out)


def greedy_injected(path, trace, prompt: str, n: int, out: Path, *,
                    n_ctx: int = 256) -> tuple[list[int], np.ndarray, int]:
    """greedy() with the repack off and every MoE layer computing `trace`'s experts (a routing trace file), and
    the number of topk nodes the injection overwrote."""
    info = _run({"op": "greedy", "path": str(path), "prompt": prompt, "n": n, "n_ctx": n_ctx, "out": str(out),
                 "repack": False, "trace": str(trace)})
    return info["tokens"], np.load(out), info["injected"]


def complete(path, prompts: list[str], *, max_tokens: int, n_ctx: int = 512, seed: int = 0,
             repeat_penalty: float = 1.0) -> list[str]:
    """Plain llama_cpp.Llama's greedy completion of each prompt."""
    return _run({"op": "complete", "path": str(path), "prompts": prompts, "max_tokens": max_tokens, "n_ctx": n_ctx,
                 "seed": seed, "repeat_penalty": repeat_penalty})["texts"]


def edgemoe(*args: str, timeout: float = 600) -> subprocess.CompletedProcess:
    """`edgemoe ARGS` where stock runs (`run --stock`): with the stock runtime; a signal fails the test."""
    proc = subprocess.run([sys.executable, "-m", "edgemoe_llamacpp", *args], capture_output=True, text=True,
                          env=stock_env(), timeout=timeout, check=False)
    check(proc)
    return proc


STANDIN = '''"""A llama_cpp stand-in for the tests: the real package, except that a Llama dies with {sig} as it loads with
llama.cpp's CPU repack on (use_extra_bufts, its default), as stock llama-cpp-python 0.3.36 does in its AMX
repack on some Intel Xeons. With the repack off it loads."""
import os
import resource
import signal
import sys

_here = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:] = [p for p in sys.path if os.path.abspath(p or os.curdir) != _here]
if {real!r}:
    sys.path.insert(0, {real!r})                             # the llama_cpp this one stands in for
del sys.modules[__name__]
import llama_cpp as _real  # noqa: E402  -- the real package, now under this name in sys.modules
import llama_cpp.llama_cpp as _lc  # noqa: E402

_init = _real.Llama.__init__


def _init_or_die(self, *args, **kwargs):
    if _lc.llama_model_default_params().use_extra_bufts:    # the params this Llama is about to load with
        resource.setrlimit(resource.RLIMIT_CORE, (0, 0))     # no core file
        os.kill(os.getpid(), signal.{sig})
    _init(self, *args, **kwargs)


_real.Llama.__init__ = _init_or_die
'''


def write_crashing_standin(where: Path, sig: str = "SIGSEGV", real: str | os.PathLike | None = None) -> Path:
    """A directory for EDGEMOE_STOCK_RUNTIME (or PYTHONPATH) whose llama_cpp is the real one, with a Llama that
    kills itself when it would repack (llama.cpp's default). The real one: the llama_cpp package in directory
    `real`, or else the next one on sys.path."""
    (where / "llama_cpp").mkdir(parents=True)
    real = str(Path(real).resolve()) if real else ""
    (where / "llama_cpp" / "__init__.py").write_text(STANDIN.format(sig=sig, real=real))
    return where
