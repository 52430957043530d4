"""Micro-benchmark of on-demand expert fetches: which way of reading a miss set reaches the disk's speed.

The model file is mapped read-only the way llama.cpp maps it (MAP_SHARED, PROT_READ) and an ExpertStorage is
attached to that mapping and set up as a budgeted cache sets it up (`drop_all`: expert pages dropped,
MADV_RANDOM over the expert tensors). A trial starts from a cold page cache and fetches a run of miss sets, each
the experts one token chooses in one layer (k random experts of a layer, layers in decode order, no expert twice
in a trial). Before each fetch the previous set is dropped, as a budgeted cache evicts as much as it fetches.
A variant's figures are fetched bytes / fetch seconds over the trial, and fetched bytes / stall seconds (drop + fetch, what the bench's fetch_efficiency divides by); the
table gives the median over trials and the least and most. Variants take turns in every round, and
each round measures `bench.disk_bandwidth()` (cold 1 MiB preads from 4 threads, the bench's yardstick) too.

    python tools/fetch_microbench.py bench/models/io-moe.gguf --json bench/results/fetch-microbench.json
"""
from __future__ import annotations

import argparse
import json
import mmap
import os
import platform
import random
import statistics
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from edgemoe_bench.bench import disk_bandwidth
from edgemoe_llamacpp import files, limits, pages
from edgemoe_llamacpp.cache import storage
from edgemoe_llamacpp.gguf.layout import ExpertUID, read_layout

MIB = 1 << 20
MADV_WILLNEED = 3                  # asm-generic/mman-common.h
SETS = 24                          # miss sets per trial: 24 x 2 experts x 16.7 MB = 800 MB on io-moe


# ---------------------------------------------------------------- ways to read a miss set
# Each takes (storage, chunks, pool) and returns the bytes read; chunks are (file offset, size) pieces of the
# merged expert spans. The mapping is storage.base + offset.

def ra_populate(st, chunks, pool):
    """The shipped path: readahead(2) of every chunk from the caller, then MADV_POPULATE_READ from the pool."""
    for off, size in chunks:
        pages.readahead(st.fd, off, size)
    return sum(pool.map(st.populate_chunk, chunks))


def ra_populate_pipelined(st, chunks, pool, evict=None):
    """readahead of each chunk, its populate queued on the pool at once: mapping starts while later reads are
    still being queued. With `evict`, the victims are dropped after the reads are queued, while they are in flight."""
    futures = []
    for off, size in chunks:
        pages.readahead(st.fd, off, size)
        futures.append(pool.submit(st.populate_chunk, (off, size)))
    if evict is not None:
        evict()
    return sum(f.result() for f in futures)


def populate_only(st, chunks, pool):
    """MADV_POPULATE_READ alone: the faults read (one page each under MADV_RANDOM)."""
    return sum(pool.map(st.populate_chunk, chunks))


def madv_willneed_populate(st, chunks, pool):
    """MADV_WILLNEED on the mapping (the kernel's fadvise WILLNEED on the mapping's file), then populate."""
    for off, size in chunks:
        pages.madvise(st.base + off, size, MADV_WILLNEED)
    return sum(pool.map(st.populate_chunk, chunks))


def fadvise_populate(st, chunks, pool):
    """posix_fadvise(WILLNEED) on storage's fd, then populate."""
    for off, size in chunks:
        os.posix_fadvise(st.fd, off, size, os.POSIX_FADV_WILLNEED)
    return sum(pool.map(st.populate_chunk, chunks))


def ra_in_task(st, chunks, pool):
    """Each pool task reads ahead its own chunk and populates it: submission spread over the threads."""
    def one(chunk):
        pages.readahead(st.fd, *chunk)
        return st.populate_chunk(chunk)
    return sum(pool.map(one, chunks))


def pread_only(st, chunks, pool):
    """pread into a per-thread reused buffer: fills the page cache, maps nothing (llama.cpp then faults)."""
    return sum(pool.map(lambda c: _pread(st, c), chunks))


def pread_populate(st, chunks, pool):
    """pread into a reused buffer, then MADV_POPULATE_READ of the same chunk (pages now cached: mapping only)."""
    def one(chunk):
        _pread(st, chunk)
        return st.populate_chunk(chunk)
    return sum(pool.map(one, chunks))


def ra_populate_whole(st, chunks, pool):
    """readahead of every chunk, then one MADV_POPULATE_READ per merged span from the caller (no pool)."""
    for off, size in chunks:
        pages.readahead(st.fd, off, size)
    for a, b in pages.merge_spans((off, off + size) for off, size in chunks):
        pages.madvise(st.base + a, b - a, pages.MADV_POPULATE_READ)
    return sum(size for _, size in chunks)


_tls = threading.local()


def _pread(st, chunk) -> int:
    tls = _tls
    off, size = chunk
    buf = getattr(tls, "buf", None)
    if buf is None or len(buf) < size:
        buf = tls.buf = bytearray(size)
    done = 0
    while done < size:
        n = os.preadv(st.fd, [memoryview(buf)[done:size]], off + done)
        if n <= 0:
            break
        done += n
    return done


METHODS = {"ra+populate": ra_populate, "populate": populate_only, "madv_willneed+populate": madv_willneed_populate,
           "fadvise_willneed+populate": fadvise_populate, "ra+populate per task": ra_in_task,
           "pread": pread_only,
           "pread+populate": pread_populate, "ra+populate pipelined": ra_populate_pipelined, "ra+populate whole span, 1 thread": ra_populate_whole}


def variants() -> list[dict]:
    """(name, method, threads, chunk MiB): the shipped path, then one factor changed at a time."""
    out = [{"name": "current (storage.fetch)", "method": "current", "threads": 4, "chunk_mib": storage.READ_CHUNK / MIB}]
    out += [{"name": f"ra+populate, {t} threads", "method": "ra+populate", "threads": t, "chunk_mib": 1}
            for t in (1, 2, 4, 8)]
    out += [{"name": f"ra+populate, {c} MiB chunks", "method": "ra+populate", "threads": 4, "chunk_mib": c}
            for c in (0.25, 2, 4, 8, 16)]
    out += [{"name": m, "method": m, "threads": 4, "chunk_mib": 1} for m in METHODS
            if m not in ("ra+populate",)]
    out += [{"name": f"ra+populate pipelined, {c} MiB chunks", "method": "ra+populate pipelined", "threads": 4,
             "chunk_mib": c} for c in (0.5, 2)]
    out += [{"name": "pipelined, evict while reads fly", "method": "ra+populate pipelined", "threads": 4,
             "chunk_mib": 1, "overlap_evict": True}]
    return out


# ---------------------------------------------------------------- set-up and one trial
def chunked(st, uids, chunk: int) -> list[tuple[int, int]]:
    merged = pages.merge_spans(s for u in uids for s in st.spans[u])
    return [(off, min(chunk, b - off)) for a, b in merged for off in range(a, b, chunk)]


def miss_sets(layout, k: int, n: int, rng: random.Random) -> list[list[ExpertUID]]:
    """n sets of k experts of one layer, layers in decode order, no expert twice."""
    free = {layer: rng.sample(range(layout.n_expert), layout.n_expert) for layer in layout.moe_layers}
    out = []
    for i in range(n):
        layer = layout.moe_layers[i % len(layout.moe_layers)]
        out.append([ExpertUID(layer, free[layer].pop()) for _ in range(k)])
    return out


def cold(st, path: str) -> None:
    st.drop_spans(list(st.tensor_spans.values()))
    limits.drop_file_cache(path)


def trial(st, path: str, v: dict, sets, pools) -> dict:
    """One cold run of `sets`. Before each fetch the previous set is dropped, as a budgeted cache evicts as
    much as it fetches; the stall (drop + fetch) and the fetch alone are timed."""
    cold(st, path)
    assert st.measured_resident_bytes() == 0, "expert pages still resident after the cold drop"
    pool = pools[v["threads"]]
    chunk = int(v["chunk_mib"] * MIB)
    fetch_s = evict_s = stall_s = cpu_s = 0.0
    nbytes = 0
    resident_ok = True
    prev: list[ExpertUID] = []

    def evict():
        for u in prev:
            st.drop(u)
    for uids in sets:
        c0, t0 = time.process_time(), time.perf_counter()
        if v.get("overlap_evict"):
            got = METHODS[v["method"]](st, chunked(st, uids, chunk), pool, evict)
            t1 = t0
        else:
            evict()
            t1 = time.perf_counter()
            got = st.fetch(uids) if v["method"] == "current" else \
                METHODS[v["method"]](st, chunked(st, uids, chunk), pool)
        t2 = time.perf_counter()
        cpu_s += time.process_time() - c0
        evict_s += t1 - t0
        fetch_s += t2 - t1
        stall_s += t2 - t0
        nbytes += got
        resident_ok &= all(st.in_memory(u) for u in uids) and not any(st.in_memory(u) for u in prev)
        prev = uids
    evict()
    n = len(sets)
    return {"bytes": nbytes, "fetch_s": fetch_s, "evict_s": evict_s, "stall_s": stall_s, "cpu_s": cpu_s,
            "gbps": nbytes / fetch_s / 1e9, "gbps_stall": nbytes / stall_s / 1e9, "ms_per_set": 1e3 * fetch_s / n,
            "evict_ms_per_set": 1e3 * evict_s / n, "cpu_ms_per_set": 1e3 * cpu_s / n, "resident_ok": resident_ok}


def spread(xs: list[float]) -> dict:
    return {"median": statistics.median(xs), "min": min(xs), "max": max(xs)}


def block_queue(path: str) -> dict:
    """The request-queue settings of the block device holding `path`."""
    dev = os.stat(path).st_dev
    sysdev = Path(f"/sys/dev/block/{os.major(dev)}:{os.minor(dev)}").resolve()
    queue = sysdev / "queue" if (sysdev / "queue").exists() else sysdev.parent / "queue"
    keys = ("max_sectors_kb", "max_hw_sectors_kb", "read_ahead_kb", "nr_requests", "scheduler", "rotational",
            "max_segments")
    return {"device": queue.parent.name, **{k: (queue / k).read_text().strip() for k in keys if (queue / k).exists()}}


# ---------------------------------------------------------------- main
def setup_arg_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("model", help="a MoE GGUF (bench/models/io-moe.gguf)")
    p.add_argument("--rounds", type=int, default=5, help="trials per variant (variants take turns in each)")
    p.add_argument("--sets", type=int, default=SETS, help="miss sets per trial")
    p.add_argument("--only", nargs="*", help="run only the variants whose name contains one of these")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", help="write the results here")
    return p


def main(argv=None) -> None:
    args = setup_arg_parser().parse_args(argv)
    if args.json:
        files.tool_output(args.json, "--json")
    path = os.path.realpath(args.model)
    layout = read_layout(path)
    k = layout.n_expert_used
    vs = [v for v in variants() if not args.only or any(s in v["name"] for s in args.only)]
    fd = os.open(path, os.O_RDONLY)
    mm = mmap.mmap(fd, 0, access=mmap.ACCESS_READ)          # MAP_SHARED, PROT_READ: as llama.cpp maps it
    os.close(fd)
    base = next(start for start, end, off, _ in pages.file_mappings(path) if off == 0 and end - start >= layout.file_size)
    st = storage.ExpertStorage(layout)
    st.attach([base], [(0, layout.file_size)])
    st.drop_all()
    pools = {t: ThreadPoolExecutor(t, thread_name_prefix=f"bench{t}") for t in sorted({v["threads"] for v in vs})}
    rng = random.Random(args.seed)
    per_set = sum(st.cost[u] for u in miss_sets(layout, k, 1, random.Random(0))[0])
    print(f"{Path(path).name}: {len(layout.moe_layers)} MoE layers x {layout.n_expert} experts, top-{k}; "
          f"miss set {per_set / 1e6:.1f} MB, {args.sets} sets a trial; queue {block_queue(path)}")
    results = {v["name"]: [] for v in vs}
    disk = []
    for r in range(args.rounds):
        disk.append(disk_bandwidth(path) / 1e9)
        print(f"round {r + 1}: disk_bandwidth {disk[-1]:.2f} GB/s")
        order = vs[r % len(vs):] + vs[:r % len(vs)]        # rotate who goes first
        for v in order:
            t = trial(st, path, v, miss_sets(layout, k, args.sets, rng), pools)
            results[v["name"]].append(t)
            print(f"  {v['name']:<40} {t['gbps']:.2f} GB/s fetch, {t['gbps_stall']:.2f} with eviction; per set: "
                  f"fetch {t['ms_per_set']:.1f} ms, evict {t['evict_ms_per_set']:.1f} ms, cpu {t['cpu_ms_per_set']:.1f} ms"
                  f"{'' if t['resident_ok'] else '  NOT RESIDENT'}")
    disk.append(disk_bandwidth(path) / 1e9)
    bw = statistics.median(disk)
    rows = []
    for v in vs:
        ts = results[v["name"]]
        row = {**v, **{key: spread([t[key] for t in ts]) for key in
                       ("gbps", "gbps_stall", "ms_per_set", "evict_ms_per_set", "cpu_ms_per_set")},
               "resident_ok": all(t["resident_ok"] for t in ts)}
        row["efficiency"] = row["gbps"]["median"] / bw
        row["efficiency_stall"] = row["gbps_stall"]["median"] / bw
        rows.append(row)
    print(f"\ndisk_bandwidth median {bw:.2f} GB/s ({min(disk):.2f}-{max(disk):.2f}, {len(disk)} measurements)")
    print(f"{'variant':<40} {'fetch GB/s':>10} {'(min-max)':>11} {'of disk':>8} {'stall GB/s':>11} {'of disk':>8}"
          f" {'cpu ms/set':>10}")
    for row in rows:
        g = row["gbps"]
        print(f"{row['name']:<40} {g['median']:10.2f} {g['min']:5.2f}-{g['max']:<5.2f} {row['efficiency']:8.0%} "
              f"{row['gbps_stall']['median']:11.2f} {row['efficiency_stall']:8.0%} {row['cpu_ms_per_set']['median']:10.1f}")
    if args.json:
        out = {"model": Path(path).name, "miss_set_bytes": per_set, "k": k, "sets_per_trial": args.sets,
               "rounds": args.rounds, "disk_bandwidth_gbps": spread(disk), "disk_bandwidth_all": disk,
               "queue": block_queue(path), "kernel": platform.release(), "cpus": os.cpu_count(),
               "loadavg_end": os.getloadavg(), "variants": rows,
               "time": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime())}
        files.write_text(args.json, json.dumps(out, indent=1) + "\n")
    st.close()
    mm.close()


if __name__ == "__main__":
    main()
