"""`edgemoe bench`: stock llama-cpp-python vs edgemoe on one file, under one memory limit, in one run.

Each run is a child process (what `edgemoe run --json` runs, given the cache's options) in a cgroup whose limit is
dense bytes + budget + KV cache + an allowance for the interpreter, started with a cold page cache.
Engines alternate run by run so drift on a shared machine hits both. The Belady floor replays the
recorded routing with perfect knowledge of the future: the fewest expert bytes any cache could read. Compute
alone, what reads are judged against, is one more edgemoe run with no budget and no limit from a warm page cache
(the file read whole first): a run faster than it is flagged, never reported as a bound.
"""
from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import platform
import signal
import statistics
import subprocess
import sys
import time
from collections import defaultdict, deque
from dataclasses import replace
from pathlib import Path

import psutil

from edgemoe_bench import cgroup, warm
from edgemoe_llamacpp import limits, pages
from edgemoe_llamacpp.cache.config import CacheConfig
from edgemoe_llamacpp.cache.residency import parse_budget
from edgemoe_llamacpp.engine.generate import kv_cache_bytes
from edgemoe_llamacpp.errors import EXIT_INTERRUPTED, EdgeMoEError
from edgemoe_llamacpp.gguf.layout import MoELayout, read_layout

log = logging.getLogger(__name__)

# Besides dense + budget + KV, a limit must leave room for everything else the process holds: its heap and
# llama.cpp's buffers, and the page cache of its libraries and Python files. Measured per model: each
# engine runs once at 100% in a cgroup without a limit; its peak usage less the model file and the KV
# cache is what it needs besides the model. That run does not see everything: pages of its libraries and
# Python files already cached elsewhere are not charged to it, but are once pressure makes them re-read.
# Measured on the I/O-scale model at 50%: with 16 MiB on top, edgemoe's fetched experts were reclaimed
# before use (2,400 major faults/token); with 64 MiB more, 40. Both engines get the same limit.
ALLOWANCE_MARGIN = 96 << 20
PROMPT = ('"""Utilities for reading and writing configuration files."""\n\nimport os\nimport re\nimport sys\n'
          'from collections import OrderedDict\n\n\nclass ConfigParser:\n    """Parse a configuration file."""\n\n'
          '    def __init__(self, path, defaults=None):\n        self.path = path\n')


def belady(trace: list[tuple[int, list[list[int]]]], capacity: int) -> tuple[int, int]:
    """(misses over the whole trace, misses in one-token steps) of the optimal cache holding `capacity`
    experts. Each step's chosen experts must be resident together; the evicted one is the expert whose
    next use lies farthest ahead (Belady's MIN, optimal for equal-size items)."""
    steps = [(len(ids) == 1, {(layer, e) for row in ids for e in row}) for layer, ids in trace]
    uses: dict[tuple[int, int], deque[int]] = defaultdict(deque)
    for i, (_, need) in enumerate(steps):
        for u in need:
            uses[u].append(i)
    cache: set[tuple[int, int]] = set()
    misses = decode_misses = 0
    for decode, need in steps:
        for u in need:
            uses[u].popleft()
        missing = need - cache
        misses += len(missing)
        decode_misses += len(missing) * decode
        over = len(cache) + len(missing) - capacity
        if over > 0:
            victims = sorted(cache - need, key=lambda u: uses[u][0] if uses[u] else math.inf, reverse=True)
            cache.difference_update(victims[:over])
        cache |= missing
    return misses, decode_misses


PROBE_PIECE = 8 << 20          # the disk probe reads pieces of this size, about one expert's span of a tensor


def disk_bandwidth(path: str, nbytes: int = 256 << 20, region: tuple[int, int] | None = None) -> float:
    """Cold read bandwidth of `path` (bytes/s): `nbytes` in 1 MiB preads from 4 threads, like expert fetches,
    over pieces of PROBE_PIECE spread evenly across `region` (start, end; default the whole file), so the probe
    reads where the fetches do and not only the file's head."""
    from concurrent.futures import ThreadPoolExecutor

    start, end = region or (0, os.path.getsize(path))
    size = min(nbytes, end - start)
    n = max(1, size // PROBE_PIECE)
    step = max(PROBE_PIECE, (end - start) // n)
    chunks = [off for k in range(n) for off in range(start + k * step, min(start + k * step + PROBE_PIECE, end),
                                                      1 << 20)]
    limits.drop_file_cache(path)
    fd = os.open(path, os.O_RDONLY)
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_RANDOM)
        t0 = time.perf_counter()
        with ThreadPoolExecutor(4) as pool:
            done = sum(pool.map(lambda off: len(os.pread(fd, 1 << 20, off)), chunks))
        dt = time.perf_counter() - t0
    finally:
        os.close(fd)
    limits.drop_file_cache(path)
    return done / dt


def expert_file(layout: MoELayout) -> int:
    """The model's file that holds the most expert bytes (0 for a single file): where the disk probe reads."""
    held = [sum(t.nbytes for t in layout.expert_tensors if t.file == i) for i in range(len(layout.files))]
    return held.index(max(held))


def expert_region(layout: MoELayout, file: int | None = None) -> tuple[int, int]:
    """The bytes of file `file` (default: expert_file) from its first expert tensor's start to its last one's end:
    where fetches read."""
    file = expert_file(layout) if file is None else file
    tensors = [t for t in layout.expert_tensors if t.file == file]
    return min(t.offset for t in tensors), max(t.offset + t.nbytes for t in tensors)


def probe_bandwidth(layout: MoELayout) -> float:
    """disk_bandwidth where the model's fetches read: its file holding the most expert bytes, over their region."""
    return disk_bandwidth(layout.files[expert_file(layout)], region=expert_region(layout))


STOCK_RUNTIME_ENV = "EDGEMOE_STOCK_RUNTIME"
# One run: generate() as `edgemoe run --json` calls it, its arguments as JSON (edgemoe's cache options as a
# CacheConfig's fields); for a stock run, what llama.cpp was given (use_extra_bufts) read back from the Llama it built.
CHILD = """
import json, sys
import edgemoe_llamacpp.engine.llama as L
from edgemoe_llamacpp.cache.config import CacheConfig
from edgemoe_llamacpp.errors import EdgeMoEError
from edgemoe_llamacpp.engine.generate import generate
from edgemoe_bench.inject import trace_injector
args = json.loads(sys.argv[1])
seen = {}
stock_llama = L.stock_llama
def spy(*a, **k):
    llm = stock_llama(*a, **k)
    seen["use_extra_bufts"] = bool(llm.model_params.use_extra_bufts)
    return llm
L.stock_llama = spy
try:
    if "cache" in args:
        args["cache"] = CacheConfig(**args["cache"])
    trace, oracle = args.pop("route_trace", None), args.pop("oracle", None)
    if trace is not None:
        args["route_injector"] = trace_injector(trace, args["model"])
    if oracle is not None:
        from edgemoe_bench.oracle import OraclePredictor
        from edgemoe_llamacpp.gguf.layout import read_layout
        args["prefetch_predictor"] = OraclePredictor(read_layout(args["model"]), args["route_injector"], **oracle)
    out = generate(**args)
except EdgeMoEError as e:
    sys.exit(f"edgemoe: error: {e}")
print(json.dumps({**out, **seen}))
"""


def stock_env() -> dict | None:
    """The environment of a stock run: with EDGEMOE_STOCK_RUNTIME set (a directory holding another
    llama_cpp package, e.g. an unpatched build from `edgemoe build-runtime --stock --target DIR`), that
    package comes first on PYTHONPATH; otherwise None (this interpreter's llama_cpp)."""
    where = os.environ.get(STOCK_RUNTIME_ENV)
    if not where:
        return None
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(Path(where).resolve()), env.get("PYTHONPATH")) if p)
    return env


def signal_name(returncode: int) -> str | None:
    """"SIGSEGV" for a process the signal killed (a negative return code), else None."""
    if returncode >= 0:
        return None
    try:
        return signal.Signals(-returncode).name
    except ValueError:
        return f"signal {-returncode}"


def run_child(model: str, *, stock: bool, tokens: int, prompt: str, n_ctx: int, limit: int | None,
           n_threads: int | None = None, cache: CacheConfig | None = None, stock_repack: bool = True,
           controller: cgroup.Controller | None = None, route_trace: str | None = None, cold: bool = True,
           oracle: dict | None = None) -> dict:
    """One run of `model` in a child process under `limit` bytes (None: no limit), with a cold page cache (or,
    `cold` False, the page cache as it is): stock llama-cpp-python (`stock_repack`: its CPU repack on), or
    edgemoe keeping experts as `cache` says (routing recorded, for the Belady floor). `oracle`: edgemoe prefetches
    with edgemoe_bench.oracle's predictor over the injected `route_trace`, these its keywords ({"recall": 0.9})."""
    if oracle is not None and (stock or route_trace is None):
        raise ValueError("the oracle predictor reads an injected trace: edgemoe runs with route_trace only")
    args = {"model": model, "prompt": prompt, "max_tokens": tokens, "n_ctx": n_ctx, "n_threads": n_threads,
            "route_trace": route_trace}
    if oracle is not None:
        args["oracle"] = oracle
    if stock:
        args.update(stock=True, use_extra_bufts=stock_repack)
    else:
        args.update(record_routing=True, cache=(cache or CacheConfig()).to_dict())
    cmd = [sys.executable, "-c", CHILD, json.dumps(args)]
    env = stock_env() if stock else None
    if cold:
        limits.drop_file_cache(*read_layout(model).files)
    if limit is None:
        t0 = time.perf_counter()
        proc = subprocess.run(cmd, capture_output=True, text=True, check=False, env=env,
                              preexec_fn=cgroup.die_with_parent)
        run = cgroup.LimitedRun(proc.returncode, proc.stdout, proc.stderr, 0, 0, 0, 0, time.perf_counter() - t0)
    else:
        run = cgroup.run_limited(cmd, limit, env=env, controller=controller)
    if run.returncode in (EXIT_INTERRUPTED, -signal.SIGINT):
        raise KeyboardInterrupt       # Ctrl-C reached the run (the terminal signals the whole process group)
    out = {"ok": run.returncode == 0, "returncode": run.returncode, "peak_bytes": run.peak_bytes,
           "oom_kills": run.oom_kills, "wall_s": run.wall_s}
    if stock:
        out["stock_repack"] = stock_repack
    if run.returncode == 0:
        out.update(json.loads(run.stdout))
    elif (sig := signal_name(run.returncode)) is not None:
        engine = "stock llama.cpp" if stock else "edgemoe"
        out["signal"] = sig
        out["error"] = [f"{engine} died with {sig}" + (" (the cgroup's OOM killer)" if run.oom_kills else "")]
    else:
        out["error"] = run.stderr.strip().splitlines()[-1:] or [f"exit {run.returncode}"]
    return out


def spread(values: list[float]) -> dict:
    values = [v for v in values if v is not None]
    if not values:
        return {"median": None, "min": None, "max": None, "n": 0}
    return {"median": statistics.median(values), "min": min(values), "max": max(values), "n": len(values)}


def engine_summary(runs: list[dict]) -> dict:
    ok = [r for r in runs if r["ok"]]

    def per_token(r, key):
        return r[key] / r["decode_evals"] if r.get("decode_evals") else None

    died: dict[str, int] = {}
    for r in runs:
        if r.get("signal"):
            died[r["signal"]] = died.get(r["signal"], 0) + 1
    out = {
        "runs": len(runs), "failed": len(runs) - len(ok), "died": died,
        "decode_tok_s": spread([r["decode_tok_s"] for r in ok]),
        "prefill_tok_s": spread([r["prefill_tok_s"] for r in ok]),
        "decode_read_bytes_per_token": spread([per_token(r, "decode_read_bytes") for r in ok]),
        "decode_major_faults_per_token": spread([per_token(r, "decode_major_faults") for r in ok]),
        # outside edgemoe's reader threads: pages computing found missing (stock: every fault)
        "decode_compute_major_faults_per_token": spread([per_token(r, "decode_compute_major_faults") for r in ok
                                                          if "decode_compute_major_faults" in r]),
        "peak_bytes": spread([r["peak_bytes"] for r in ok]),
        "load_s": spread([r.get("load_s") for r in ok]),
        "load_read_bytes": spread([r.get("load_read_bytes") for r in ok]),
    }
    stats = [r["stats"] for r in ok if "stats" in r]
    if stats:
        out["hit_rate"] = spread([s["total"]["hit_rate"] for s in stats])
        out["stall_s"] = spread([s["total"]["stall_s"] for s in stats])
        out["hook_us_per_layer"] = spread([s.get("hook_us_per_layer") for s in stats])
        parts = [r["decode_ms_per_token"] for r in ok if r.get("decode_ms_per_token")]
        if parts:       # where a decoded token's time goes: waiting for reads, the hook's Python, the rest
            out["decode_ms_per_token"] = {k: spread([p[k] for p in parts]) for k in parts[0]}
        for key in ("prefetches", "prefetch_used", "prefetch_wasted", "substituted"):
            out[f"{key}_per_token"] = spread([s["total"][key] / r["decode_evals"] for s, r in
                                               zip(stats, [r for r in ok if "stats" in r]) if r["decode_evals"]])
    return out


def calibrate(model: str, *, prompt: str = PROMPT, n_ctx: int = 512, use_cgroup: bool = True,
              n_threads: int | None = None, stock_model: str | None = None, engines=("stock", "edgemoe"),
              stock_repack: bool = True, controller: cgroup.Controller | None = None,
              route_trace: str | None = None) -> tuple[int, dict]:
    """Memory a process running `model` needs besides the model's pages and the KV cache (see
    ALLOWANCE_MARGIN): the most any of `engines` needed, and each engine's calibration run. A stock run that
    dies (a crashing llama.cpp build) is recorded and left out; a failed edgemoe run is an error."""
    files = {True: stock_model or model, False: model}
    unlimited = psutil.virtual_memory().total if use_cgroup else None
    calib = {stock: run_child(files[stock], stock=stock, tokens=4, prompt=prompt, n_ctx=n_ctx, limit=unlimited,
                           n_threads=n_threads, cache=CacheConfig(memory_budget="100%"), stock_repack=stock_repack,
                           controller=controller, route_trace=route_trace)
             for stock in (True, False) if ("stock" if stock else "edgemoe") in engines}
    summary = {("stock" if stock else "edgemoe"): {k: c.get(k) for k in ("ok", "returncode", "signal", "error",
                                                                          "peak_bytes", "rss_anon_bytes")}
               for stock, c in calib.items()}
    failed = [c for stock, c in calib.items() if not c["ok"] and not (stock and c.get("signal"))]
    if failed:
        raise EdgeMoEError(f"calibration run failed: {failed[0]['error']}")
    used = {stock: c for stock, c in calib.items() if c["ok"]}
    if not used:
        raise EdgeMoEError(f"calibration run failed: {calib[True]['error']}")
    if not use_cgroup:
        return max(c["rss_anon_bytes"] for c in used.values()) + ALLOWANCE_MARGIN, summary
    return max(c["peak_bytes"] - read_layout(files[stock]).file_size for stock, c in used.items()) \
        - kv_cache_bytes(model, n_ctx) + ALLOWANCE_MARGIN, summary


def measure_allowance(model: str, *, prompt: str = PROMPT, n_ctx: int = 512, use_cgroup: bool = True,
                      n_threads: int | None = None, stock_model: str | None = None,
                      engines=("stock", "edgemoe")) -> int:
    """Memory a process running `model` needs besides the model's pages and the KV cache (see ALLOWANCE_MARGIN)."""
    return calibrate(model, prompt=prompt, n_ctx=n_ctx, use_cgroup=use_cgroup, n_threads=n_threads,
                     stock_model=stock_model, engines=engines)[0]


DEFAULT_N_CTX = 512


def bench_prompt(model: str, n_tokens: int) -> str:
    """A prompt of exactly `n_tokens` of `model`'s tokens (BOS included, as a completion counts them): held-out
    text, the standard library's validation split (corpus.py), cut by llama.cpp's vocabulary alone."""
    import llama_cpp

    from edgemoe_llamacpp.corpus import prompt_of, split_texts
    from edgemoe_llamacpp.engine.llama import llama_params

    with llama_params():                # a Ctrl-C during the load is raised, not swallowed in a callback
        llm = llama_cpp.Llama(model_path=str(model), vocab_only=True, verbose=False)
    try:
        return prompt_of(llm, n_tokens, split_texts("validation"))
    finally:
        llm.close()


def context_for(n_ctx: int | None, prompt_tokens: int | None, tokens: int) -> int:
    """The context of every run: `n_ctx` as given (refused if it cannot hold a prompt of `prompt_tokens` and the
    `tokens` generated), or by default DEFAULT_N_CTX, more where the prompt and the tokens need it."""
    if prompt_tokens is None:
        return n_ctx or DEFAULT_N_CTX
    need = prompt_tokens + tokens
    if n_ctx is None:
        return max(DEFAULT_N_CTX, need)
    if n_ctx < need:
        raise EdgeMoEError(f"--n-ctx {n_ctx} cannot hold a prompt of {prompt_tokens} tokens and {tokens} generated: "
                           f"give at least {need}, or leave --n-ctx out")
    return n_ctx


# The reference is warm when nearly all the file stayed cached and it read next to nothing: a few header pages
# (dropped again by every layout read) or a page the kernel let go are no cold read of the model.
WARM_SHARE = 0.99


def compute_alone(model: str, **run) -> dict:
    """The reference each budget's reads are judged against: the same edgemoe run with every expert in memory (no
    budget, no memory limit), with every byte it reads in the page cache first so that nothing waits for a read:
    the file read whole, or where memory cannot hold it whole (a model near or past RAM), what the run touches
    (edgemoe_bench.warm: the run is made twice, the first's routing says which experts to read in). `warm` says
    whether it was: what it needs all cached before the run, and nothing read while it ran (`not_warm` says why
    not, and a bound built on it is no bound)."""
    layout = read_layout(model)
    size, available = sum(layout.file_sizes), psutil.virtual_memory().available
    whole = size <= available
    cached = sum(cgroup.warm_file_cache(p) if whole else pages.file_cached_bytes(p) for p in layout.files)
    # a budget of every expert computes the same, but loads without llama.cpp's whole-file read (which would push
    # out what was read in) and keeps what is cached
    held = {**run, "cache": replace(run.get("cache") or CacheConfig(), memory_budget="100%")}
    ref = run_child(model, stock=False, limit=None, cold=False, **(run if whole else held))
    need, warmed = size, "file"
    if cached < WARM_SHARE * size and ref["ok"] and ref.get("trace"):
        spans = warm.touched_spans(layout, ref["trace"])
        touched = warm.span_bytes(spans)
        if touched < WARM_SHARE * psutil.virtual_memory().available:
            limits.drop_file_cache(*layout.files)        # what is cached is then what the run touches
            need, cached, warmed = touched, warm.warm_spans(layout, spans), "touched"
            ref = run_child(model, stock=False, limit=None, cold=False, **held)
    evals, read = ref.get("decode_evals"), (ref.get("prefill_read_bytes") or 0) + (ref.get("decode_read_bytes") or 0)
    not_warm = []
    if need > available and warmed == "file":
        not_warm.append(f"the file ({size:,} bytes) is larger than the memory available ({available:,} bytes), "
                        "and so is what the run touches: it cannot be held")
    elif cached < WARM_SHARE * need:
        what = "the file's" if warmed == "file" else "the bytes the run touches,"
        not_warm.append(f"{cached:,} of {what} {need:,} bytes stayed in the page cache after reading them")
    if read > (1 - WARM_SHARE) * need:
        not_warm.append(f"the run read {read:,} bytes from storage while it evaluated")
    if not ref["ok"]:
        not_warm.append(f"the run failed ({ref.get('error')})")
    return {"ms_per_token": (ref.get("decode_ms_per_token") or {}).get("compute"),
            "decode_tok_s": ref.get("decode_tok_s"), "decode_ms_per_token": ref.get("decode_ms_per_token"),
            "prefill_s": ref.get("prefill_s"), "prefill_tok_s": ref.get("prefill_tok_s"),
            "prompt_tokens": ref.get("prompt_tokens"), "ok": ref["ok"], "error": ref.get("error"),
            "warm": not not_warm, "not_warm": not_warm, "warmed": warmed, "file_bytes": size,
            "warmed_bytes": need, "cached_bytes_before": cached,
            "prefill_read_bytes": ref.get("prefill_read_bytes"), "decode_read_bytes": ref.get("decode_read_bytes"),
            "decode_read_bytes_per_token": ref["decode_read_bytes"] / evals if evals else None}


def _controller(use_cgroup: bool) -> cgroup.Controller:
    """Where the runs' memory limits go (kind "none", with the reason, where they cannot be imposed)."""
    if not use_cgroup:
        return cgroup.Controller("none", None, "not requested (--no-cgroup)")
    controller = cgroup.prepare(cgroup.memory_controller())
    if controller.kind == "none":
        log.warning("runs are not memory-limited: %s", controller.reason)
    return controller


def _check_stock_model(model: str, stock_model: str, layout: MoELayout) -> None:
    if stock_model != model:
        stock_layout = read_layout(stock_model)
        if stock_layout.expert_bytes != layout.expert_bytes or stock_layout.dense_bytes != layout.dense_bytes:
            raise EdgeMoEError(f"{stock_model} is not {model}'s model: expert/dense bytes differ")


def run_bench(model: str, budgets: list[str], *, runs: int = 3, tokens: int = 64, prompt: str = PROMPT,
              prompt_tokens: int | None = None, n_ctx: int | None = None, use_cgroup: bool = True,
              allowance: int | None = None, n_threads: int | None = None, progress: bool = True,
              cache: CacheConfig | None = None, stock_model: str | None = None, stock_repack: bool | str = True,
              route_trace: str | None = None) -> dict:
    """Stock and edgemoe alternately, cold cache, per budget; edgemoe keeps its experts as `cache` says, at
    each of `budgets` in turn (its own memory_budget is not used). `prompt_tokens`: a prompt of exactly that many
    tokens of held-out text instead of `prompt` (bench_prompt), the context sized to hold it (context_for).
    `stock_model`: the file stock runs when `model` is one only edgemoe loads (low-bit copies, per-expert types):
    the one it was converted from. `stock_repack`: stock with llama.cpp's CPU repack (its default) or without
    (edgemoe's compute path), or "both": two stock baselines per pair, the ratio taken against the repack-on one
    and also given against the other. A stock run that dies is recorded with its signal; edgemoe is still
    measured, and that budget's ratio is marked absent when no pair has both. `route_trace`: both engines compute
    that trace's routing (the results say `routing: injected`), for workloads shaped like models this machine
    does not hold."""
    layout: MoELayout = read_layout(model)
    cache = cache or CacheConfig()
    stock_model = stock_model or model
    _check_stock_model(model, stock_model, layout)
    n_ctx = context_for(n_ctx, prompt_tokens, tokens)
    if prompt_tokens is not None:
        prompt = bench_prompt(model, prompt_tokens)
    controller = _controller(use_cgroup)
    use_cgroup = controller.kind != "none"
    run = {"tokens": tokens, "prompt": prompt, "n_ctx": n_ctx, "n_threads": n_threads, "route_trace": route_trace}
    bandwidth = probe_bandwidth(layout)
    calibration = None
    if allowance is None:
        allowance, calibration = calibrate(model, prompt=prompt, n_ctx=n_ctx, use_cgroup=use_cgroup,
                                           n_threads=n_threads, stock_model=stock_model,
                                           # with both baselines, the compute path edgemoe uses: the
                                           # repack's anonymous copy of the experts is model memory, not the
                                           # process's own
                                           stock_repack=stock_repack is True,
                                           controller=controller if use_cgroup else None, route_trace=route_trace)
    # compute alone: each budget's reads are judged by the time they add to it
    only = compute_alone(model, cache=replace(cache, memory_budget=None), **run)
    if not only["warm"]:
        log.warning("compute alone is not compute alone: %s", "; ".join(only["not_warm"]))
    result = {
        "compute_only": only, "model": str(model), "arch": layout.arch, "n_layer": layout.n_layer,
        "n_expert": layout.n_expert, "n_expert_used": layout.n_expert_used, "dense_bytes": layout.dense_bytes,
        "expert_bytes": layout.expert_bytes, "file_bytes": layout.file_size, "kv_cache_bytes": kv_cache_bytes(model, n_ctx),
        "allowance_bytes": allowance, "calibration": calibration, "cgroup": use_cgroup,
        "memory_limit": controller.to_dict(), "disk_bandwidth_bps": bandwidth,
        "tokens": tokens, "n_ctx": n_ctx, "prompt": prompt, "prompt_tokens": only["prompt_tokens"] or prompt_tokens,
        "machine": machine_facts(), **cache.to_dict(budget=False),
        "stock_model": str(stock_model), "stock_repack": stock_repack,
        "stock_runtime": os.environ.get(STOCK_RUNTIME_ENV) or None, "lowbit_type": layout.lowbit_type,
        "routing": "router" if route_trace is None else f"injected: {_trace_source(route_trace)}",
        "route_trace": route_trace,
        "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "budgets": [],
    }
    bench = _Budgets(model, stock_model, layout, result, controller if use_cgroup else None, stock_repack, run)
    with bench.progress(len(budgets) * runs, progress):
        for spec in budgets:
            result["budgets"].append(bench.measure(spec, runs, replace(cache, memory_budget=spec)))
    floor_speeds(result)
    check_compute_floor(result)
    return result


def alternate(engines: dict, budgets: list[str], runs: int, *, probe: dict | None = None, bar=None,
              desc: str = "bench", show: bool = True) -> dict[str, list[dict]]:
    """Each engine `runs` times at each budget, in rounds whose order rotates (each engine takes each place in
    turn), so that drift on a shared machine hits them alike. `engines`: name -> run(budget spec) -> its result;
    `probe`: name -> a measurement taken at the start of every round (the disk's speed drifts too). Returns, per
    budget, its rounds: {engine name: its run, probe name: its value}. `bar`: a tqdm to advance (default: one of
    its own)."""
    from tqdm import tqdm

    names = list(engines)
    own = bar is None
    bar = tqdm(total=len(budgets) * runs * len(names), desc=desc, unit="run", disable=not show) if own else bar
    out: dict[str, list[dict]] = {}
    try:
        for spec in budgets:
            out[spec] = []
            for r in range(runs):
                shift = r % len(names)
                one = {name: measure() for name, measure in (probe or {}).items()}
                for name in names[shift:] + names[:shift]:
                    bar.set_postfix(budget=spec, engine=name)
                    one[name] = engines[name](spec)
                    bar.update()
                out[spec].append(one)
    finally:
        if own:
            bar.close()
    return out


class _Budgets:
    """One bench's runs at each budget: the pairs of runs (engines alternating), and the budget's entry."""

    def __init__(self, model: str, stock_model: str, layout: MoELayout, result: dict,
                 controller: cgroup.Controller | None, stock_repack: bool | str, run: dict):
        self.model, self.stock_model, self.layout, self.result = model, stock_model, layout, result
        self.controller, self.run = controller, run
        self.both = stock_repack == "both"
        self.engines = [("stock", True), ("stock_repack_off", False), ("edgemoe", None)] if self.both else \
            [("stock", bool(stock_repack)), ("edgemoe", None)]
        self.bar = None

    @contextlib.contextmanager
    def progress(self, runs: int, show: bool):
        from tqdm import tqdm

        with tqdm(total=runs * len(self.engines), desc="bench", unit="run", disable=not show) as self.bar:
            yield

    def pairs(self, spec: str, runs: int, limit: int | None, cache: CacheConfig) -> list[dict]:
        """`runs` pairs (or triples) of runs at one budget, the engines' order alternating; the disk's speed
        drifts on shared machines: measured again beside every pair, and each run's reads are judged by it."""
        def engine(name: str, repack: bool | None):
            stock = name != "edgemoe"
            return lambda _: run_child(self.stock_model if stock else self.model, stock=stock, limit=limit,
                                       cache=cache, stock_repack=repack, controller=self.controller, **self.run)

        return alternate({name: engine(name, repack) for name, repack in self.engines}, [spec], runs,
                         probe={"disk_bandwidth_bps": lambda: probe_bandwidth(self.layout)}, bar=self.bar)[spec]

    def measure(self, spec: str, runs: int, cache: CacheConfig) -> dict:
        """The budget's entry: each engine's summary, edgemoe against stock, the floors, and the runs."""
        r, layout = self.result, self.layout
        budget = parse_budget(spec, layout.expert_bytes)
        if budget is None:
            raise EdgeMoEError("bench needs a finite memory budget per entry (e.g. 25% 50% 100%)")
        limit = layout.dense_bytes + budget + r["kv_cache_bytes"] + r["allowance_bytes"] if r["cgroup"] else None
        pairs = self.pairs(spec, runs, limit, cache)
        entry = {"budget": spec, "budget_bytes": budget, "limit_bytes": limit,
                 "stock": engine_summary([p["stock"] for p in pairs]),
                 **compare([p["edgemoe"] for p in pairs], [p["stock"] for p in pairs], budget,
                           layout.expert_bytes / len(layout.experts))}
        self.compare_texts(entry, pairs)
        if self.both:        # the second baseline: stock without the CPU repack, the setting a careful user tries first
            entry["stock_repack_off"] = engine_summary([p["stock_repack_off"] for p in pairs])
            entry["decode_ratio_vs_repack_off"] = spread(
                [p["edgemoe"]["decode_tok_s"] / p["stock_repack_off"]["decode_tok_s"] for p in pairs
                 if p["edgemoe"]["ok"] and p["stock_repack_off"]["ok"] and p["stock_repack_off"]["decode_tok_s"]])
        bounds(entry, pairs, r["compute_only"])
        entry["pairs"] = pairs
        return entry

    def compare_texts(self, entry: dict, pairs: list[dict]) -> None:
        """Greedy text of every run on edgemoe's compute path (stock with the CPU repack computes some types with
        other kernels, whose rounding may flip a near tie: compared apart)."""
        texts = {p[name]["text"] for p in pairs for name, repack in self.engines if p[name]["ok"] and not repack}
        entry["same_text"] = len(texts) == 1 if texts else None
        repacked = {p[name]["text"] for p in pairs for name, repack in self.engines if p[name]["ok"] and repack}
        if repacked and texts:
            entry["same_text_with_repack"] = repacked == texts


def bounds(entry: dict, pairs: list[dict], only: dict) -> None:
    """A budget's runs against what reads must cost: each run's reads by the time they added to a token
    (decoding less compute alone and the hook's Python), over the disk's speed measured beside that run; its decode
    time over max(compute alone, its reads at disk speed); its prefill time over max(prefill alone, the prompt's
    experts at disk speed)."""
    probes = spread([p["disk_bandwidth_bps"] for p in pairs])
    entry["disk_bandwidth_bps"] = probes
    if "floor_bytes_per_token" in entry:
        entry["floor_io_s_per_token"] = entry["floor_bytes_per_token"] / probes["median"]
    ms = only.get("ms_per_token")
    entry["read_wait_ms_per_token"] = spread([read_wait_ms(p["edgemoe"], ms) for p in pairs])
    entry["fetch_efficiency"] = spread([_fetch_efficiency(p["edgemoe"], ms, p["disk_bandwidth_bps"])
                                         for p in pairs])["median"]
    entry["decode_vs_bound"] = spread([_vs_bound(p["edgemoe"], ms, p["disk_bandwidth_bps"]) for p in pairs])["median"]
    entry["prefill_vs_bound"] = spread([prefill_vs_bound(p["edgemoe"], only.get("prefill_s"), p["disk_bandwidth_bps"])
                                         for p in pairs])["median"]


def prefill_vs_bound(run: dict, prefill_alone: float | None, bandwidth: float) -> float | None:
    """One edgemoe run's prompt time over max(the prompt's time with every expert in memory, the bytes of the
    experts the prompt chose at the disk's cold bandwidth: what a cold cache must read for it)."""
    if not run.get("ok") or not run.get("prefill_s") or not prefill_alone or not bandwidth \
            or run.get("prompt_expert_bytes") is None:
        return None
    return run["prefill_s"] / max(prefill_alone, run["prompt_expert_bytes"] / bandwidth)


def check_compute_floor(result: dict) -> None:
    """Flag what compute alone says cannot happen: an edgemoe run decoding, or evaluating its prompt, faster than
    the reference with every expert in memory. The reference is then no floor (it waited for reads, or noise is
    larger than the difference), and neither is a bound built on it: each budget counts such runs
    (`decode_below_compute`, `prefill_below_compute`: runs, of), and `warnings` says so, as it says when the
    reference was not warm."""
    only = result["compute_only"]
    warnings = result.setdefault("warnings", [])
    if only.get("not_warm"):
        warnings.append("compute alone is not compute alone: " + "; ".join(only["not_warm"]))
    for b in result["budgets"]:
        ok = [p["edgemoe"] for p in b["pairs"] if p["edgemoe"].get("ok")]
        for phase, mine, ref in (("decode", lambda r: 1e3 / r["decode_tok_s"] if r.get("decode_tok_s") else None,
                                  only.get("ms_per_token")),
                                 ("prefill", lambda r: r.get("prefill_s"), only.get("prefill_s"))):
            times = [t for t in map(mine, ok) if t is not None]
            below = sum(t < ref for t in times) if ref else 0
            b[f"{phase}_below_compute"] = {"runs": below, "of": len(times)}
            if below:
                warnings.append(f"{b['budget']}: edgemoe's {phase} was faster than compute alone in {below} of "
                                f"{len(times)} runs: the compute-alone reference is no floor, nor the bound on it")


def floor_speeds(result: dict) -> None:
    """Each budget's `floor_tok_s`: compute alone plus the Belady floor's reads at the disk's speed, one after the
    other (without a compute-only run, edgemoe's fastest median decode stands in for compute); and its
    `prefill_floor_tok_s`: the prompt's tokens over max(the prompt alone, its experts' bytes at the disk's speed)."""
    best = max((b["edgemoe"]["decode_tok_s"]["median"] or 0) for b in result["budgets"])
    only = (result.get("compute_only") or {}).get("ms_per_token")
    compute_s = only / 1e3 if only else (1 / best if best else None)
    prefill_s, n_prompt = (result.get("compute_only") or {}).get("prefill_s"), result.get("prompt_tokens")
    for b in result["budgets"]:
        if compute_s and "floor_io_s_per_token" in b:
            b["floor_tok_s"] = 1 / (compute_s + b["floor_io_s_per_token"])
        prompt = [p["edgemoe"]["prompt_expert_bytes"] for p in b["pairs"] if "prompt_expert_bytes" in p["edgemoe"]]
        if prefill_s and n_prompt and prompt:
            b["prompt_expert_bytes"] = statistics.median(prompt)
            b["prefill_floor_tok_s"] = n_prompt / max(prefill_s, b["prompt_expert_bytes"] / b["disk_bandwidth_bps"]["median"])


def _decoded_token(run: dict, compute_only: float | None) -> tuple[float, float, float, float] | None:
    """An edgemoe run's decoded token: (its time, compute alone, the hook's Python, all in ms; bytes read), or None
    for a run that failed or decoded nothing. Without a compute-only figure, the run's own compute (the time
    outside the hook) stands in."""
    parts, evals = run.get("decode_ms_per_token") or {}, run.get("decode_evals")
    if not run.get("ok") or not run.get("decode_tok_s") or "compute" not in parts or not evals:
        return None
    compute = parts["compute"] if compute_only is None else compute_only
    return 1e3 / run["decode_tok_s"], compute, parts["hook_cpu"], run["decode_read_bytes"] / evals


def read_wait_ms(run: dict, compute_only: float | None) -> float | None:
    """What waiting for reads added to an edgemoe run's decoded token (ms): its time less compute alone and the
    hook's Python. The wait is in the hook (queuing or waiting for reads) and in llama.cpp's page faults on pages
    still being read."""
    token = _decoded_token(run, compute_only)
    return None if token is None else token[0] - token[2] - token[1]


def _fetch_efficiency(run: dict, compute_only: float | None, bandwidth: float) -> float | None:
    """An edgemoe run's decode reads per second of the wait they added, over the disk's cold bandwidth."""
    token, wait = _decoded_token(run, compute_only), read_wait_ms(run, compute_only)
    return None if token is None or wait <= 0 else token[3] / (wait / 1e3) / bandwidth


def _vs_bound(run: dict, compute_only: float | None, bandwidth: float) -> float | None:
    """One edgemoe run's decode time per token over max(compute alone per token, its reads per token at the
    disk's cold bandwidth): 1.0 when reads overlap compute completely, or run at disk speed with nothing else to
    do."""
    token = _decoded_token(run, compute_only)
    if token is None or not bandwidth:
        return None
    ms, compute, _, read = token
    return ms / max(compute, 1e3 * read / bandwidth)


def _trace_source(path: str) -> str:
    from edgemoe_bench.routing_trace import RoutingTrace

    return RoutingTrace.load(path).source


def paired_ratio(runs: list[dict], stock_runs: list[dict], phase: str) -> dict:
    """edgemoe's `phase` ("decode" or "prefill") speed over stock's, pair by pair: the spread of the ratios; the
    pairs whose stock run died have none, and `absent` says so."""
    out = spread([e[f"{phase}_tok_s"] / s[f"{phase}_tok_s"] for e, s in zip(runs, stock_runs, strict=True)
                   if e["ok"] and s["ok"] and s[f"{phase}_tok_s"]])
    died = [s["signal"] for s in stock_runs if s.get("signal")]
    if died:
        out["absent"] = f"stock llama.cpp died with {', '.join(sorted(set(died)))} in {len(died)} of {len(stock_runs)} runs"
    return out


def compare(runs: list[dict], stock_runs: list[dict], budget: int, expert_size: float) -> dict:
    """One edgemoe configuration's runs against the stock runs they alternated with: its summary, the median
    of per-run decode and prefill ratios, and the Belady floor of each run's recorded routing, and the bytes of
    the experts its prompt chose (`prompt_expert_bytes`, on each run; the traces are consumed)."""
    out = {"edgemoe": engine_summary(runs), "decode_ratio": paired_ratio(runs, stock_runs, "decode"),
           "prefill_ratio": paired_ratio(runs, stock_runs, "prefill")}
    for r in runs:
        if r["ok"] and r.get("trace"):
            r["prompt_expert_bytes"] = prompt_experts(r["trace"], r["prompt_tokens"]) * expert_size
    floors = [belady(r.pop("trace"), int(budget // expert_size))[1] * expert_size / r["decode_evals"]
              for r in runs if r["ok"] and r.get("trace") and r["decode_evals"]]    # one token: no decode step
    for r in runs:
        r.pop("trace", None)
    if floors:
        floor = statistics.median(floors)
        measured = out["edgemoe"]["decode_read_bytes_per_token"]["median"]
        out["floor_bytes_per_token"] = floor
        out["edgemoe_bytes_vs_floor"] = measured / floor if floor and measured else None
    return out


def prompt_experts(trace: list[tuple[int, list[list[int]]]], n_prompt: int) -> int:
    """How many distinct (layer, expert) the prompt's `n_prompt` tokens chose, over all its batches: what a cold
    cache must read for the prompt at least, whatever its budget."""
    rows: dict[int, int] = defaultdict(int)
    chosen = set()
    for layer, ids in trace:
        if rows[layer] < n_prompt:
            rows[layer] += len(ids)
            chosen.update((layer, e) for row in ids for e in row)
    return len(chosen)


def machine_facts() -> dict:
    return {"cpus": os.cpu_count(), "memory_bytes": psutil.virtual_memory().total,
            "kernel": platform.release(), "python": platform.python_version(),
            "cpu": _cpu_name()}


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()
