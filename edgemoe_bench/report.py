"""`edgemoe bench` results as text: the table `edgemoe bench` prints, and BENCHMARKS.md's sections for them
(tools/bench_report.py assembles the file and draws the plots)."""
from __future__ import annotations

import re
import statistics
from pathlib import Path

from edgemoe_bench.bench import paired_ratio


def format_table(result: dict) -> str:
    """The table `edgemoe bench` prints: per budget, stock and edgemoe (medians, min-max) and the Belady floor;
    load times."""
    def fmt(x, spec="{:.1f}"):
        return "-" if x is None else spec.format(x)

    rows = [*header(result), "",
            ("| budget | limit | engine | decode tok/s (median, min-max) | prefill tok/s | storage MB/token | "
            "major faults/token computing (all) | hit rate | peak MiB | edgemoe/stock decode | edgemoe/stock prefill |"),
            "|---|---|---|---|---|---|---|---|---|---|---|"]
    for b in result["budgets"]:
        limit = "none" if b["limit_bytes"] is None else f"{b['limit_bytes'] / 2**20:.0f} MiB"
        for eng in [e for e in ("stock", "stock_repack_off", "edgemoe") if e in b]:
            s = b[eng]
            d = s["decode_tok_s"]
            hit = s.get("hit_rate", {}).get("median")
            ratio = fmt(b["decode_ratio"]["median"], "{:.2f}x") + \
                f" ({fmt(b['decode_ratio']['min'], '{:.2f}')}-{fmt(b['decode_ratio']['max'], '{:.2f}')})" \
                if eng == "edgemoe" else ""
            if eng == "edgemoe" and "decode_ratio_vs_repack_off" in b:
                ratio += f"; {fmt(b['decode_ratio_vs_repack_off']['median'], '{:.2f}x')} vs stock, repack off"
            if eng == "edgemoe" and b["decode_ratio"].get("absent"):
                ratio = f"absent ({b['decode_ratio']['absent']})" if b["decode_ratio"]["median"] is None else \
                    f"{ratio}, without the pairs whose stock died ({b['decode_ratio']['absent']})"
            died = ", ".join(f"{n} died with {sig}" for sig, n in s.get("died", {}).items())
            failed = f" ({s['failed']} failed{': ' + died if died else ''})" if s["failed"] else ""
            rows.append(f"| {b['budget']} | {limit} | {eng}{failed} | {fmt(d['median'])} "
                        f"({fmt(d['min'])}-{fmt(d['max'])}) | {fmt(s['prefill_tok_s']['median'])} | "
                        f"{fmt(_mb(s['decode_read_bytes_per_token']['median']), '{:.2f}')} | "
                        f"{_faults(s)} | {fmt(hit, '{:.1%}')} | "
                        f"{fmt(_mib(s['peak_bytes']['median']), '{:.0f}')} | {ratio} | "
                        f"{spread_ratio(prefill_ratio(b)) if eng == 'edgemoe' else ''} |")
        if b.get("same_text") is False:          # on edgemoe's compute path (repack off)
            rows.append(f"| {b['budget']} | | **output differs between runs or engines on the same kernels** | | | | | | | | |")
        if "floor_bytes_per_token" in b:
            rows.append(f"| {b['budget']} | | Belady floor | {fmt(b.get('floor_tok_s'))} | "
                        f"{fmt(b.get('prefill_floor_tok_s'))} | {_mb(b['floor_bytes_per_token']):.2f} | | | | " +
                        (f"edgemoe reads {b['edgemoe_bytes_vs_floor']:.2f}x the floor | |"
                         if b["edgemoe_bytes_vs_floor"] else "edgemoe read nothing: the load kept every expert | |"))
    loads = [(b["budget"], eng, b[eng]) for b in result["budgets"] for eng in ("stock", "stock_repack_off", "edgemoe")
             if eng in b and b[eng].get("load_s", {}).get("median") is not None]
    if loads:
        rows += ["", "| budget | engine | load s (median) | bytes read at load (median) | fetch efficiency |",
                 "|---|---|---|---|---|"]
        for spec, eng, s in loads:
            eff = next((b.get("fetch_efficiency") for b in result["budgets"] if b["budget"] == spec), None) \
                if eng == "edgemoe" else None
            rows.append(f"| {spec} | {eng} | {s['load_s']['median']:.2f} | "
                        f"{fmt(_mb(s['load_read_bytes']['median']), '{:,.0f}')} MB | {fmt(eff, '{:.0%}')} |")
    return "\n".join(rows + bound_table(result))


def _faults(s: dict) -> str:
    """Major faults per token while computing (outside edgemoe's reader threads) and, in brackets, all of them;
    results from before the two were told apart give all of them alone."""
    every = s["decode_major_faults_per_token"]["median"]
    computing = (s.get("decode_compute_major_faults_per_token") or {}).get("median")
    if every is None:
        return "-"
    return f"{every:.1f}" if computing is None else f"{computing:.1f} ({every:.1f})"


def bound_table(result: dict) -> list[str]:
    """Where a decoded token's time goes against compute alone, each phase against its bound, and the warnings."""
    def fmt(x, spec="{:.1f}"):
        return "-" if x is None else spec.format(x)

    rows = []
    parts = [b for b in result["budgets"] if b["edgemoe"].get("decode_ms_per_token")]
    only = (result.get("compute_only") or {}).get("ms_per_token")
    if parts:
        rows += ["", ("| budget | edgemoe ms/token | compute alone | waiting for reads | of which in the hook | "
                 "hook CPU | x max(compute alone, reads at disk speed) | prefill x max(prefill alone, the prompt's "
                 "experts at disk speed) |"), "|---|---|---|---|---|---|---|---|"]
        for b in parts:
            d, tok_s = b["edgemoe"]["decode_ms_per_token"], b["edgemoe"]["decode_tok_s"]["median"]
            # results from before overlapped reads waited for every read in the hook: the stall is the wait
            wait = (b.get("read_wait_ms_per_token") or {}).get("median") if "compute_only" in result \
                else d["stall"]["median"]
            rows.append(f"| {b['budget']} | {fmt(1e3 / tok_s if tok_s else None, '{:.1f}')} | "
                        f"{fmt(only if only is not None else d['compute']['median'])} | {fmt(wait)} | "
                        f"{d['stall']['median']:.1f} | {d['hook_cpu']['median']:.2f} | "
                        f"{vs_bound(b, 'decode')} | {vs_bound(b, 'prefill')} |")
    if only is None and "compute_only" in result:
        rows.append("\nCompute alone: no run with every expert in memory; each run's time outside the hook "
                    "stands in (reads waited for in page faults then count as compute).")
    return rows + ([""] + [f"**Warning:** {w}." for w in result["warnings"]] if result.get("warnings") else [])


def vs_bound(b: dict, phase: str) -> str:
    """A budget's time over its bound, or, where some run was faster than compute alone, that instead: no bound."""
    below = b.get(f"{phase}_below_compute")
    if below and below["runs"]:
        return f"no bound: faster than compute alone in {below['runs']} of {below['of']} runs"
    v = b.get(f"{phase}_vs_bound")
    if v is None:
        return "-"
    return f"{v:.2f}x" if v >= 1 else f"{v:.2f}x (below 1: faster than the bound allows, so no bound)"


def prefill_ratio(b: dict) -> dict | None:
    """A budget's edgemoe/stock prefill speed, pair by pair: as the bench recorded it, or from the runs of a result
    written before it did (None without them)."""
    if "prefill_ratio" in b:
        return b["prefill_ratio"]
    pairs = b.get("pairs")
    return paired_ratio([p["edgemoe"] for p in pairs], [p["stock"] for p in pairs], "prefill") if pairs else None


def spread_ratio(d: dict | None) -> str:
    """A ratio's median (min-max), or why it is missing."""
    if d is None:
        return "-"
    if d["median"] is None:
        return ratio(d)
    return f"{d['median']:.2f}x ({d['min']:.2f}-{d['max']:.2f})"


def disk_note(r: dict) -> str:
    """The disk's cold read speed: once before the runs, and (newer results) again beside every pair."""
    probes = [p["disk_bandwidth_bps"] for b in r["budgets"] for p in b.get("pairs", []) if "disk_bandwidth_bps" in p]
    if not probes:
        return f"{r['disk_bandwidth_bps'] / 1e9:.2f} GB/s cold 1 MiB reads"
    return (f"{statistics.median(probes) / 1e9:.2f} GB/s cold 1 MiB reads (median of {len(probes)} measurements, "
            f"one beside every pair, {min(probes) / 1e9:.2f}-{max(probes) / 1e9:.2f}; each run's fetch efficiency "
            "and bound are taken against its pair's)")


def memory_limit_note(result: dict) -> dict:
    """The results' memory_limit (kind, path, reason); results written before it was recorded have only the
    "cgroup" flag, and every machine that wrote them had cgroup v1."""
    if "memory_limit" in result:
        return result["memory_limit"]
    if result.get("cgroup"):
        return {"kind": "cgroup-v1", "path": None, "reason": "cgroup v1 memory controller"}
    return {"kind": "none", "path": None, "reason": "no writable cgroup memory controller (its reason was not "
            "recorded then)"}


def header(result: dict) -> list[str]:
    """The lines above the table: how memory was limited (or why it was not) and how stock ran."""
    m = memory_limit_note(result)
    limit = (f"Memory limit: {m['kind']} ({m['reason']})." if m["kind"] != "none" else
             f"Memory limit: none, runs are NOT memory-limited ({m['reason']}).")
    repack = result.get("stock_repack", True)
    setting = "on (its default), and off (use_extra_bufts=False) as a second baseline" if repack == "both" else \
        "on (its default)" if repack else "off (use_extra_bufts=False)"
    stock = (f"Stock: llama.cpp's CPU repack {setting}"
             + (f", llama_cpp from {result['stock_runtime']}" if result.get("stock_runtime") else "") + ".")
    died = sorted({r["stock"]["signal"] for b in result["budgets"] for r in b.get("pairs", [])
                   if r.get("stock", {}).get("signal")})
    if died:
        stock += f" Stock llama.cpp died with {', '.join(died)}: its runs are recorded, ratios marked absent."
    lines = [limit, stock]
    if result.get("routing", "router") != "router":
        lines.append(f"Routing: {result['routing']} (both engines compute the trace's experts at every MoE layer, "
                     f"not the router's: a benchmark workload, not the model's own output).")
    return lines


def _mb(x):
    return None if x is None else x / 1e6


def _mib(x):
    return None if x is None else x / 2**20


def section(path: Path, r: dict, *, root: Path, image: Path | None = None) -> str:
    """BENCHMARKS.md's section for the result `r` read from `path` (paths shown relative to `root`), with the
    plot `image` if there is one."""
    m = r["machine"]
    ml = memory_limit_note(r)
    if r["cgroup"]:
        limited = (f"each run in its own {ml['kind']} memory limit = dense + budget + KV cache "
                   f"({r['kv_cache_bytes'] / 2**20:.1f} MiB) + allowance ({r['allowance_bytes'] / 2**20:.0f} MiB: "
                   "the process's own memory besides the model, measured by an unlimited run of each engine, "
                   "+ 96 MiB for the library and kernel pages that run does not show)")
    else:
        limited = f"NOT memory-limited: {ml['reason']} (both engines ran unlimited)"
    if r.get("stock_repack") is False:
        limited += "; stock ran with llama.cpp's CPU repack off (use_extra_bufts=False)"
    died = sorted({p["stock"]["signal"] for b in r["budgets"] for p in b.get("pairs", []) if p["stock"].get("signal")})
    if died:
        limited += (f"; stock llama.cpp died with {', '.join(died)} (runs recorded, edgemoe still measured, "
                    "ratios absent where no pair has both)")
    return "\n".join([
        f"## {path.stem}: {Path(r['model']).name}",
        "",
        (f"{r['arch']}, {r['n_layer']} layers, {r['n_expert']} experts top-{r['n_expert_used']}; "
        f"dense {r['dense_bytes'] / 1e6:.1f} MB, experts {r['expert_bytes'] / 1e9:.3f} GB "
        f"({r['expert_bytes'] / (r['n_layer'] * r['n_expert']) / 1e6:.2f} MB each). "
        f"{r['tokens']} tokens generated greedily after a {prompt_note(r)}; "
        f"{limited}; cold page cache before every run; engines alternate run by run. "
        f"Disk: {disk_note(r)}. "
        f"Machine: {m['cpu']}, {m['cpus']} cores, {m['memory_bytes'] / 2**30:.0f} GiB, Linux {m['kernel']}, "
        f"Python {m['python']}; {r['date']}." + config_note(r) + (f" {r['note']}" if r.get("note") else "")),
        "",
        ("Storage MB/token and major faults/token are for the decode phase, from `/proc/self/io` and "
        "`getrusage` of the engine's process; the ratio is the median of per-pair ratios; the Belady row is "
        "the fewest expert bytes any cache of that budget could read for the recorded routing, and the "
        "speed it implies (compute alone + those reads at the measured disk speed)."),
        "",
        format_table(r),
        "",
        *([f"![decode tok/s vs budget]({image.relative_to(root).as_posix()})", ""] if image else []),
        "Command:",
        "",
        "```sh",
        r.get("command", f"edgemoe bench {r['model']} --memory-budget "
                         f"{' '.join(b['budget'] for b in r['budgets'])}{config_flags(r)} --json "
                         f"{path.relative_to(root)}"),
        "```",
        "",
    ])


def prompt_note(r: dict) -> str:
    """The prompt: its tokens (results since they were counted) or characters; and how warm compute alone was."""
    size = f"{r['prompt_tokens']}-token" if r.get("prompt_tokens") else f"{len(r['prompt'])}-character"
    only = r.get("compute_only") or {}
    if "warm" not in only:
        return f"{size} prompt"
    warm = ("the file read whole into the page cache first, nothing read while it ran" if only["warm"] else
            "NOT warm: " + "; ".join(only["not_warm"]))
    return f"{size} prompt; compute alone is the same run with no budget and no limit ({warm})"


def config_note(r: dict) -> str:
    if not r.get("policy"):
        return ""
    ahead = f"predictor {r['predictor']}, prefetch depth {r['prefetch_depth']}" if r["predictor"] else "no predictor"
    sub = ""
    if r.get("substitute") is not None:
        sub = (f", low-bit substitution above {r['substitute']} ({r['lowbit_type']} copies; stock ran "
               f"{Path(r['stock_model']).name}, the file it was converted from)")
    return f" edgemoe: policy {r['policy']}, {ahead}{sub}."


def config_flags(r: dict) -> str:
    if not r.get("policy"):
        return ""
    return f" --runs {r['budgets'][0]['stock']['runs']} --policy {r['policy']} --predictor {r['predictor'] or 'none'}" + \
        (" --stock-repack off" if r.get("stock_repack") is False else "") + \
        (f" --prefetch-depth {r['prefetch_depth']}" if r["predictor"] else "") + \
        (f" --substitute {r['substitute']} --stock-model {r['stock_model']}" if r.get("substitute") is not None else "")


def ratio(d: dict | None) -> str:
    """A median ratio, or why it is missing (stock died in every pair; no runs recorded)."""
    if d is None:
        return "-"
    if d["median"] is None:
        return f"- ({d['absent']})" if d.get("absent") else "-"
    return f"{d['median']:.2f}x"


def configurations_section(results: dict[Path, dict]) -> str:
    """One row per (edgemoe configuration, budget) of the bench results that name their configuration."""
    rows = [("| result | policy | predictor | depth | substitution | budget | stock tok/s | edgemoe tok/s | "
            "edgemoe/stock | edgemoe/stock prefill | MB/token | x Belady floor | prefetched/token | wasted/token | "
            "ran low/token |"), "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for path, r in results.items():
        for b in r["budgets"]:
            ed = b["edgemoe"]

            def med(key, entry=ed):
                v = entry.get(key, {}).get("median")
                return "-" if v is None else f"{v:.2f}"
            mb = ed["decode_read_bytes_per_token"]["median"]
            sub = "-" if r.get("substitute") is None else f"{r['lowbit_type']} above {r['substitute']}"
            rows.append(f"| {path.stem} | {r['policy']} | {r['predictor'] or '-'} | "
                        f"{r['prefetch_depth'] if r['predictor'] else '-'} | {sub} | {b['budget']} | "
                        f"{med('decode_tok_s', b['stock'])} | {med('decode_tok_s')} | "
                        f"{ratio(b['decode_ratio'])} | {ratio(prefill_ratio(b))} | "
                        f"{'-' if mb is None else f'{mb / 1e6:.1f}'} | "
                        f"{b.get('edgemoe_bytes_vs_floor') or 0:.2f}x | {med('prefetches_per_token')} | "
                        f"{med('prefetch_wasted_per_token')} | {med('substituted_per_token')} |")
    return "\n".join([
        "## bench configurations: policy x predictor x substitution on the I/O-scale model", "",
        ("Medians of the `edgemoe bench` results below that record their cache configuration (each its own "
        "invocation: stock and edgemoe alternate within it, so compare the edgemoe/stock ratios across rows "
        "rather than raw speeds; the machine is shared and timing is noisy). MB/token is storage read per "
        "decoded token (`/proc/self/io`); the Belady floor is that run's own."), "", *rows, "",
        *[f"{path.stem}: {r['note']}" for path, r in results.items() if r.get("note")], ""])


def shapes_section(results: dict[Path, dict], extra: list[str] = ()) -> str:
    """"Real-model shapes": one row per (file, budget) of the bench results that ran under injected routing
    (files with a named model's geometry and quant mix, random weights, a generated trace), then `extra`
    sections (the traces' statistics, the policy replay across presets)."""
    rows = [("| result | geometry | file GB | budget | limit / file | stock tok/s (repack on) | stock tok/s "
             "(repack off) | edgemoe tok/s | edgemoe/stock | edgemoe/stock repack off | edgemoe/stock prefill | "
             "MB/token | x Belady floor | same tokens |"), "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for path, r in results.items():
        geometry = f"{r['n_layer']} layers x {r['n_expert']} experts top-{r['n_expert_used']}"
        for b in r["budgets"]:
            def med(entry, key="decode_tok_s"):
                v = (entry or {}).get(key, {}).get("median")
                return "-" if v is None else f"{v:.2f}"
            stock = b["stock"] if r.get("stock_repack") in (True, "both") else None
            off = b.get("stock_repack_off") or (b["stock"] if r.get("stock_repack") is False else None)
            vs_off = b.get("decode_ratio_vs_repack_off") or (b["decode_ratio"] if r.get("stock_repack") is False
                                                             else None)
            died = ", ".join(f"{n} of {stock['runs']} died with {sig}" for sig, n in stock["died"].items()) \
                if stock and stock.get("died") else ""
            mb = b["edgemoe"]["decode_read_bytes_per_token"]["median"]
            floor = b.get("edgemoe_bytes_vs_floor")
            same = {True: "yes", False: "NO"}.get(b.get("same_text"), "-")
            rows.append(f"| {path.stem} | {geometry} | {r['file_bytes'] / 1e9:.1f} | {b['budget']} | "
                        f"{b['limit_bytes'] / r['file_bytes']:.0%} | {med(stock)}{' (' + died + ')' if died else ''} | "
                        f"{med(off)} | {med(b['edgemoe'])} | {ratio(b['decode_ratio']) if stock else '-'} | "
                        f"{ratio(vs_off) if vs_off else '-'} | {ratio(prefill_ratio(b))} | "
                        f"{'-' if mb is None else f'{mb / 1e6:.1f}'} | "
                        f"{'-' if not floor else f'{floor:.2f}x'} | {same} |")
    return "\n".join([
        "## Real-model shapes", "",
        ("Files with the geometry and quant mix of models people run (`tools/make_scale_model.py`: random weights) "
         "under routing generated to match published statistics of those models (`tools/make_trace.py`), "
         "injected at every MoE layer so both engines compute the same experts (`--route-trace`): benchmark "
         "workloads, not the models' own output. Each bench alternates stock and edgemoe under one cgroup "
         "memory limit per budget; medians of paired runs. Stock with llama.cpp's CPU repack (its default) keeps "
         "an anonymous copy of the repacked experts, which the limit does not count as the process's own "
         "memory; stock with the repack off is the setting a careful user tries first."), "", *rows, "",
        *[f"{path.stem}: {r['note']}" for path, r in results.items() if r.get("note")], "", *extra])


def anchor(title: str) -> str:
    """GitHub's anchor of a Markdown heading."""
    return re.sub(r"[^a-z0-9 _-]", "", title.lower()).replace(" ", "-")


def summary_section(shapes: dict[Path, dict], quality: dict | None = None, prefill: dict | None = None,
                    titles: dict[str, str] | None = None, sweeps: dict[Path, dict] | None = None) -> str:
    """One screen at the top of BENCHMARKS.md: the headline per shape and budget (edgemoe against stock, repack off
    where stock with it died or was not run), the plans' quality per bit width, prefill, and what prefetch gained
    per predictor sweep (`sweeps`: tools/prefetch_sweep.py results); each row links to the section it comes from
    (`titles`: result stem -> its section's heading)."""
    titles = titles or {}
    shapes_link = f"[{{}}](#{anchor('Real-model shapes')})"
    rows = ["| what | budget | edgemoe / stock | MB/token (x floor) | section |", "|---|---|---|---|---|"]
    for path, r in shapes.items():
        for b in r["budgets"]:
            vs = b.get("decode_ratio_vs_repack_off") or (b["decode_ratio"] if r.get("stock_repack") is False
                                                         else b.get("decode_ratio"))
            mb = b["edgemoe"]["decode_read_bytes_per_token"]["median"]
            floor = b.get("edgemoe_bytes_vs_floor")
            budget = b["budget"] if not str(b["budget"]).isdigit() else \
                f"{int(b['budget']) / 2**30:.1f} GiB (limit {b['limit_bytes'] / r['file_bytes']:.0%} of the file)"
            rows.append(f"| {path.stem}: decode | {budget} | {ratio(vs) if vs else '-'} | "
                        f"{'-' if mb is None else f'{mb / 1e6:.1f}'}{'' if not floor else f' ({floor:.2f}x)'} | "
                        f"{shapes_link.format(path.stem)} |")
    if prefill:
        title = titles.get("prefill", "")
        for row in prefill.get("rows", []):
            vs = "-" if row["prefill_ratio"] is None else f"{row['prefill_ratio']:.2f}x"
            rows.append(f"| {row['model']}: prefill of {row['prompt_tokens']} tokens | {row['budget']} | {vs} | - | "
                        f"[prefill](#{anchor(title)}) |")
    out = ["## Summary", "",
           ("Decode and prefill speed against stock llama-cpp-python in the same run, under the same memory limit "
            "(stock with llama.cpp's CPU repack off, the compute path edgemoe uses, where both were measured), "
            "and bytes read per token against Belady's floor. Each row links to its section below."), "", *rows, ""]
    if quality:
        title = titles.get("quality", "")
        q = ["| file | bits/weight | perplexity vs source | KL (nats/token) |", "|---|---|---|---|"]
        for x in sorted(quality["rows"], key=lambda x: x["bits_per_weight"]):
            if x["kind"] == "plan" and "ppl_vs_source" in x:
                q.append(f"| {x['label']} | {x['bits_per_weight']:.2f} | {x['ppl_vs_source']:+.2%} | "
                         f"{x['kld']:.4f} |")
        out += [f"Quality of per-expert plans per bit width ([{quality.get('model', 'quality')}](#{anchor(title)})):",
                "", *q, ""]
    if sweeps:
        p = ["| sweep | budget | configuration | decode / no prediction | MB/token / no prediction's | x bound |",
             "|---|---|---|---|---|---|"]
        for path, r in sweeps.items():
            link = f"[{path.stem}](#{anchor(titles.get(path.stem, ''))})"
            for b in r["budgets"]:
                for c in b["configs"]:
                    if c["predictor"] is None:
                        continue
                    v, by, vb = c["vs_no_prediction"]["median"], c["bytes_vs_no_prediction"], c["decode_vs_bound"]
                    p.append(f"| {link} | {b['budget']} | {c['label']} | {'-' if v is None else f'{v:.2f}x'} | "
                             f"{'-' if by is None else f'{by:.2f}x'} | {'-' if vb is None else f'{vb:.2f}x'} |")
        out += [("Prefetch against no prediction, per predictor (the default `auto` turns it on only where its "
                 "recall passes the oracle's crossover):"), "", *p, ""]
    return "\n".join(out)
