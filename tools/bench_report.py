"""BENCHMARKS.md and its plots, regenerated from the JSON results under bench/results/.

    python tools/bench_report.py                      # every bench/results/*.json -> BENCHMARKS.md
    python tools/bench_report.py bench/results/io-moe.json
"""
from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

import numpy as np

from edgemoe_bench import report as bench_report
from edgemoe_llamacpp import files

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results"
SHAPES_EXTRA = ("trace-stats", "policy-replay-presets")    # rendered within "Real-model shapes"


def plot(result: dict, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    budgets = result["budgets"]
    x = [100 * b["budget_bytes"] / result["expert_bytes"] for b in budgets]
    fig, ax = plt.subplots(figsize=(7, 4.2), dpi=110)
    for engine, color in (("stock", "tab:red"), ("edgemoe", "tab:blue")):
        med = [b[engine]["decode_tok_s"]["median"] or 0 for b in budgets]
        lo = [m - (b[engine]["decode_tok_s"]["min"] or 0) for m, b in zip(med, budgets)]
        hi = [(b[engine]["decode_tok_s"]["max"] or 0) - m for m, b in zip(med, budgets)]
        ax.errorbar(x, med, yerr=[lo, hi], marker="o", capsize=4, color=color,
                    label=f"{engine} (median, min-max)")
    floor = [b.get("floor_tok_s") for b in budgets]
    if all(f is not None for f in floor):
        ax.plot(x, floor, "k--", marker="x", label="Belady floor (reads at measured disk speed)")
    ax.set_xlabel("memory budget (% of expert bytes)")
    ax.set_ylabel("decode tokens/s")
    ax.set_yscale("log")
    save(fig, ax, out, f"{Path(result['model']).name}: {result['expert_bytes'] / 1e9:.2f} GB experts, "
                       f"{budgets[0]['stock']['runs']} runs per engine and budget")


def save(fig, ax, out: Path, title: str) -> None:
    import matplotlib.pyplot as plt

    ax.set_title(title, fontsize=10)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    with files.atomic_output(files.tool_output(out, "figure")) as tmp:
        fig.savefig(tmp, format=out.suffix[1:])
    plt.close(fig)


def policy_section(path: Path, r: dict) -> str:
    budgets = r["budgets"]
    plain = [run for run in budgets[0]["runs"] if run["predictor"] is None]
    rows = ["| budget | cache holds | Belady | " + " | ".join(run["policy"] for run in plain) + " |",
            "|---|---|---|" + "---|" * len(plain)]
    for b in budgets:
        runs = [run for run in b["runs"] if run["predictor"] is None]
        rows.append(f"| {b['budget']} | {b['capacity_experts']} experts | {b['belady']:.2f} | " +
                    " | ".join(f"{run['misses']:.2f} ({run['misses'] / b['belady']:.2f}x)" for run in runs) + " |")
    pre = [("| budget | policy | predictor | depth | misses/token (x Belady) | prefetched/token | "
            "wasted/token | reads/token (x Belady) |"), "|---|---|---|---|---|---|---|---|"]
    for b in budgets:
        for run in b["runs"]:
            pre.append(f"| {b['budget']} | {run['policy']} | {run['predictor'] or '-'} | {run['depth'] or '-'} | "
                       f"{run['misses']:.2f} ({run['misses'] / b['belady']:.2f}x) | {run['prefetches']:.2f} | "
                       f"{run['prefetch_wasted']:.2f} | {run['reads']:.2f} ({run['reads'] / b['belady']:.2f}x) |")
    ahead = []
    if "foresight" in budgets[0] or "decays" in budgets[0]:
        decays = list(budgets[0].get("decays", {}))
        hs = list(budgets[0].get("foresight", {}))
        ahead = ["| budget | Belady | " + " | ".join(f"decay {d}" for d in decays) + " | " +
                 " | ".join(f"foresight {h} token{'s' * (h != '1')}" for h in hs) + " |",
                 "|---|---|" + "---|" * (len(decays) + len(hs))]
        for b in budgets:
            cells = [b["decays"][d] for d in decays] + [b["foresight"][h] for h in hs]
            ahead.append(f"| {b['budget']} | {b['belady']:.2f} | " +
                         " | ".join(f"{m:.2f} ({m / b['belady']:.2f}x)" for m in cells) + " |")
        ahead = [("The then default policy (`distance`) at other use decays (its default is "
                  f"{r.get('use_decay', '?')}), and told the exact routing of the next H tokens (Belady within H "
                  "tokens, its own order beyond): how far ahead a predictor would have to see to come near the floor. "
                  "Misses per token (x Belady)."), "", *ahead, ""]
    source = (f"Routing of {r['validation']} windows x {r['tokens']} tokens of held-out text (the fixture's "
              "validation split, teacher-forced, every token counted as a decode step)" if r.get("validation") else
              f"Routing of {r['prompts']} prompts x {r['tokens']} greedy tokens")
    return "\n".join([
        f"## {path.stem}: cache policies and prefetch replayed on recorded routing", "",
        (f"{source} on `{r['model']}` "
        f"({r['moe_layers']} MoE layers, {r['n_expert']} experts, top-{r['n_expert_used']}), replayed through "
        "the cache's and the predictors' own code with I/O stubbed (`tools/policy_replay.py`). Decode misses per "
        "token (experts llama.cpp waits for), and the ratio to Belady's MIN, the floor no cache can beat. The "
        "I/O-scale model routes exactly as the fixture does. `hobbit` is recency + frequency + layer distance "
        "with equal weights, reset per sequence; `distance` was the default policy when this was measured "
        "(`nextuse`, the default now, came later: see \"Real-model shapes\")."), "", *rows, "",
        ("With prediction: after each layer's router, the predictor's k best guesses for each of the next "
        "`depth` layers are read ahead (counted in the budget; never evicting the current layer's experts). A "
        "prefetch turns a miss into a hit but is a read too: reads/token = misses + prefetches, to compare "
        "with Belady's reads. Wasted = prefetched experts evicted before any use."), "", *pre, "", *ahead,
        "```sh", r["command"], "```", ""])


def presets_section(path: Path, r: dict) -> str:
    """Every policy (alone, with the table predictor, at other decays) on each workload and budget, as misses per
    decoded token over Belady's; the geometric mean over all of them picks the default."""
    names = [f"{x['policy']}{'+' + x['predictor'] if x['predictor'] else ''}{' d' + str(x['decay']) if x['decay'] else ''}"
             for x in r["rows"][0]["runs"]]
    head = ["| workload | budget | Belady misses/token | " + " | ".join(names) + " |",
            "|---|---|---|" + "---|" * len(names)]
    rows = [f"| {row['workload']} | {row['budget']} | {row['belady']:.2f} | " +
            " | ".join("-" if x["vs_belady"] is None else f"{x['vs_belady']:.2f}x" for x in row["runs"]) + " |"
            for row in r["rows"]]
    mean = r["geomean_vs_belady"]
    png = path.with_suffix(".png")
    presets_plot(r, png)
    shapes = ", ".join(f"{k}: {v['prompt']}-token prompt + {v['decoded']} decoded, {v['seeds']} seed(s)"
                       for k, v in r["shapes"].items())
    return "\n".join([
        "### Cache policies on every workload: the default chosen by all of them", "",
        ("Each policy replayed (`tools/policy_replay.py --presets`: the cache's own code, I/O stubbed) on generated "
         f"traces of each preset ({shapes}) and on the fixture's own routing (held-out windows, teacher-forced; and "
         "greedy completions). Decode misses per token over Belady's MIN. `+table`: the table predictor at depth 1, "
         "fitted on another seed's trace (on the fixture: on the other routing source); its prefetches are reads "
         "too. Gate lookahead is not replayed here: under generated routing its hidden states mean nothing (its "
         "recall table stays on the fixture)."), "", *head, *rows, "",
        "Geometric mean over every workload and budget (policies alone, default decays): " +
        ", ".join(f"`{k}` {v:.3f}x" for k, v in sorted(mean.items(), key=lambda kv: kv[1])) +
        f". Fewest: `{r['best']}`; the default policy is `{r['default']}`.", "",
        f"![policies across workloads]({png.name})", "", "```sh", r["command"], "```", ""])


def presets_plot(r: dict, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    policies = list(r["geomean_vs_belady"])
    rows = r["rows"]
    fig, ax = plt.subplots(figsize=(9, 4.2), dpi=110)
    width = 0.8 / len(policies)
    for i, policy in enumerate(policies):
        y = [next(x["vs_belady"] for x in row["runs"] if (x["policy"], x["predictor"], x["decay"]) ==
                  (policy, None, None)) for row in rows]
        ax.bar([j + i * width for j in range(len(rows))], y, width, label=policy)
    ax.set_xticks([j + 0.4 - width / 2 for j in range(len(rows))])
    ax.set_xticklabels([f"{row['workload']}\n{row['budget']}" for row in rows], fontsize=6, rotation=90)
    ax.set_ylabel("decode misses / Belady's")
    ax.set_yscale("log")
    save(fig, ax, out, "Cache policies replayed on every workload and budget")


def trace_stats_section(path: Path, r: dict) -> str:
    """Each preset's generated trace: its statistics beside the published figures they are calibrated to."""
    def pct(v):
        return "" if v is None else f"{v:+.1%}"

    out = ["### Generated routing: statistics beside their published targets", "",
           (f"Each preset's trace ({r['tokens']} tokens, seed {r['seed']}; `tools/make_trace.py`) measured by "
            "`trace_stats.py`, beside the figure published for the model (blank: measured, not targeted). "
            f"Tolerance {r['tolerance']:.0%} relative. The range is over seeds "
            f"{'-'.join(map(str, next(iter(r['presets'].values()))['seeds']))}. Seed {r['seed']} within tolerance on every preset: "
            f"{'yes' if r['all_within_tolerance'] else 'NO'}; every seed: "
            f"{'yes' if r['all_within_tolerance_over_seeds'] else 'no'}."), ""]
    for name, p in r["presets"].items():
        g = p["geometry"]
        out += [f"**{name}** ({g['moe_layers']} MoE layers x {g['n_expert']} experts, top-{g['k']}). Sources: "
                + " ".join(p["sources"]), "",
                "| statistic | target | measured | error | range over seeds | worst error over seeds |",
                "|---|---|---|---|---|---|"]
        for row in p["rows"]:
            lo, hi = row["range"]
            out.append(f"| {row['statistic']} | {'' if row['target'] is None else format(row['target'], '.4g')} | "
                       f"{row['measured']:.4g} | {pct(row['rel_error'])} | {lo:.4g}-{hi:.4g} | "
                       f"{pct(row['worst_rel_error_over_seeds'])} |")
        out.append("")
    return "\n".join(out + ["```sh", r["command"], "```", ""])


def recall_section(path: Path, r: dict) -> str:
    fixture = r["models"][0]
    names = list(fixture["recall"])
    head = ["| model | predictor | depth 1 | depth 2 | depth 3 |", "|---|---|---|---|---|"]
    rows = []
    for m in r["models"]:
        for name in names:
            d = m["recall"][name]
            rows.append(f"| {Path(m['model']).name} | {name} | " +
                        " | ".join(f"{d[str(k)]['mean']:.3f}" for k in (1, 2, 3)) + " |")
    gate = fixture["recall"]["gate (own ffn_norm)"]
    same = "".join(f" `{Path(m['model']).name}` ({m['tokens']:,} of the same held-out tokens) chose the same "
                   f"top-{r['k']} set as the fixture for {m['same_routing_as_fixture']:.2%} of (token, layer) "
                   "pairs: its routing is the fixture's; its rows differ from the fixture's only because they score the first "
                   f"{m['tokens']:,} tokens, not all of them." for m in r["models"][1:])
    return "\n".join([
        f"## {path.stem}: which experts the next layers will choose", "",
        (f"recall@k (k = {r['k']}, the model's top-k): the fraction of the experts a layer really chose that the "
        f"predictor ranked in its first k, at 1-3 MoE layers ahead, averaged over the source layers "
        f"({r['moe_layers']} MoE layers, {r['n_expert']} experts: chance is {r['chance']:.3f}). Held-out text: "
        f"the fixture's validation files ({r['split']}), {fixture['tokens']:,} tokens in windows of 512 through "
        f"llama.cpp; the table and frequency predictors learned from {r['train_tokens']:,} tokens of the training "
        "files. Gate lookahead applies layer N+d's router to layer N's FFN input: normed with layer N+d's own "
        "`ffn_norm` weight, or reusing `ffn_norm-N` as is. At depth 0 it re-derives each layer's own choice "
        f"from the routers read from the file: {gate['0']['mean']:.3f}.{same}"), "",
        (f"The issue's target for gate lookahead at depth 1 is 0.85; measured here: {gate['1']['mean']:.3f}."),
        "", *head, *rows, "", "```sh", r["command"], "```", ""])


def hook_section(path: Path, r: dict) -> str:
    return "\n".join([
        f"## {path.stem}: what the hook costs with nothing to fetch", "",
        (f"`{r['model']}`, no memory budget, {r['pairs']} alternating pairs of {r['tokens']} greedy decode tokens, "
        "both engines with the CPU repack off, llama.cpp's own timers. A small model is the worst case: "
        "the cost per token is fixed (a graph split at each layer's `ffn_moe_topk` node, the runtime's check of "
        "the chosen experts against the residency table, and Python once per evaluation to count them), so its "
        "share shrinks as the model's compute per token grows."
        + (f" {r['note']}" if r.get("note") else "")), "",
        "| stock decode tok/s | edgemoe decode tok/s | edgemoe/stock (median of pairs, min-max) |",
        "|---|---|---|",
        f"| {r['stock']:.0f} | {r['edgemoe']:.0f} | {r['ratio']:.3f} ({r['min_ratio']:.3f}-{r['max_ratio']:.3f}) |",
        "", "```sh", (f"python tools/hook_overhead.py {r['model']} --pairs {r['pairs']} --tokens {r['tokens']} "
        f"--json {path.relative_to(ROOT)}"), "```", ""])


def microbench_section(path: Path, r: dict) -> str:
    rows = ["| layout | experts held | policy | before: median us | after: median us | before/after |",
            "|---|---|---|---|---|---|"]
    for x in r["rows"]:
        before, after = x.get("before", {}).get("median_us"), x["after"]["median_us"]
        rows.append(f"| {x['layers']} x {x['experts_per_layer']} | {x['held']:,} ({x['budget_fraction']:.0%}) | "
                    f"{x['policy']} | {'-' if before is None else f'{before:,.0f}'} | {after:,.0f} | "
                    f"{'-' if before is None else f'{before / after:.1f}x'} |")
    load = ", ".join(f"{v:.1f}" for v in r["load_average"])
    return "\n".join([
        f"## {path.stem}: the cache's bookkeeping per layer", "",
        ("One `ExpertCache.ensure()` with 8 misses, the cache full, no I/O (`tools/cache_microbench.py`: synthetic "
        "layouts of one-page experts, each layer asking for 8 experts it does not hold). Before: the cache at "
        f"{r['before_revision']}, which sorted every resident expert on each miss; after: incremental "
        f"orders, victims chosen once per call. The least median of a few runs, {r['rows'][0]['after']['samples']} "
        f"layers each; load average {load} on {r['cpus']} CPUs (shared)."), "", *rows, "",
        "```sh", r["command"], "```", ""])


def fetch_section(path: Path, r: dict) -> str:
    bw = r["disk_bandwidth_gbps"]
    rows = ["| variant | fetch GB/s | of the disk | stall GB/s (with eviction) | of the disk | CPU ms per miss set |",
            "|---|---|---|---|---|---|"]
    for v in r["variants"]:
        rows.append(f"| {v['name']} | {v['gbps']['median']:.2f} | {v['efficiency']:.0%} | "
                    f"{v['gbps_stall']['median']:.2f} | {v['efficiency_stall']:.0%} | {v['cpu_ms_per_set']['median']:.1f} |")
    load = ", ".join(f"{x:.1f}" for x in r["loadavg_end"])
    return "\n".join([
        f"## {path.stem}: how fast a miss is read", "",
        (f"`tools/fetch_microbench.py` on {r['model']}: miss sets of {r['k']} random experts of one layer "
         f"({r['miss_set_bytes'] / 1e6:.1f} MB), {r['sets_per_trial']} per trial from a cold page cache, variants "
         f"in turn, {r['rounds']} rounds; medians. Disk: {bw['median']:.2f} GB/s cold 1 MiB reads "
         f"({bw['min']:.2f}-{bw['max']:.2f}) in the same rounds. Load average {load} on {r['cpus']} CPUs: the "
         "machine was shared, absolute speeds are low; the ratios to the same rounds' disk bandwidth are the "
         "figures to compare."), "", *rows, ""])


def prefill(b: dict) -> str:
    """The engines' median prefill tok/s (results from before they were recorded: -)."""
    speeds = [b[eng].get("prefill_tok_s") for eng in ("stock", "baseline", "head")]
    return "-" if None in speeds else ", ".join(f"{v:.1f}" for v in speeds)


def baseline_section(path: Path, r: dict) -> str:
    rows = [("| budget | disk GB/s | stock tok/s | baseline tok/s (MB/token) | this tree tok/s (MB/token) | "
             "tree/baseline (median, runs) | tree/stock | baseline/stock | prefill tok/s (stock, baseline, tree) | "
             "same text |"), "|---|---|---|---|---|---|---|---|---|---|"]

    def eng(b, name):
        x = b[name]
        return f"{x['decode_tok_s']:.2f} ({x['decode_read_bytes_per_token'] / 1e6:.1f})"

    for b in r["budgets"]:
        runs = ", ".join(f"{v:.2f}" for v in b["head_vs_baseline"]["runs"])
        rows.append(f"| {b['budget']} | {b['disk_bandwidth_bps'] / 1e9:.2f} | {b['stock']['decode_tok_s']:.2f} | "
                    f"{eng(b, 'baseline')} | {eng(b, 'head')} | {b['head_vs_baseline']['median']:.2f}x ({runs}) | "
                    f"{b['head_vs_stock']['median']:.2f}x | {b['baseline_vs_stock']['median']:.2f}x | "
                    f"{prefill(b)} | {'yes' if b['same_text'] else 'no'} |")
    return "\n".join([
        f"## {path.stem}: decode against an earlier commit", "",
        (f"`tools/bench_baseline.py` on `{r['model']}`: stock, edgemoe at {r['baseline']} (its own defaults) and "
         f"edgemoe at {r['head']} take turns, {r['runs']} runs of {r['tokens']} tokens per budget, each under the "
         "same cgroup limit from a cold page cache; medians, ratios run by run." + (f" {r['note']}" if r.get("note") else "")),
        "", *rows, "", "```sh", r["command"], "```", ""])


def server_section(path: Path, r: dict) -> str:
    st = r["stats"]
    return "\n".join([
        f"## {path.stem}: the server under a bounded load", "",
        (f"`edgemoe serve tests/fixtures/tiny-moe.gguf --memory-budget 50%` on loopback; {r['clients']} concurrent "
        f"clients x {r['requests_per_client']} completions of {r['max_tokens']} tokens with the openai client "
        "(`tools/server_load.py`). Requests are served one at a time, as llama-cpp-python's server does, so "
        "latency is mostly queueing."), "",
        "| sent | answered | requests/s | p50 latency | p95 latency | resident expert bytes / budget |",
        "|---|---|---|---|---|---|",
        (f"| {r['sent']} | {r['answered']} | {r['requests_per_s']:.2f} | {r['p50_s']:.2f} s | {r['p95_s']:.2f} s | "
        f"{st['resident_expert_bytes']:,} / {st['budget_bytes']:,} |"), ""])


QUALITY_KINDS = (("uniform", "o-", "uniform type per file (imatrix)"),
                 ("uniform-no-imatrix", "x:", "uniform, no imatrix"),
                 ("mix", "^", "llama.cpp-style mix: gate/up, down"),
                 ("plan-one-type", "D--", "edgemoe, one type per expert"),
                 ("plan-calibrated", "v-", "edgemoe, layer-calibrated cost"),
                 ("plan", "s-", "edgemoe per-expert plan"))


def quality_plot(r: dict, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2), dpi=110)
    for ax, key, ylabel in ((axes[0], "ppl_vs_source", "perplexity over the source"),
                            (axes[1], "kld", "KL from the source (nats/token)")):
        for kind, style, label in QUALITY_KINDS:
            rows = sorted((x for x in r["rows"] if x["kind"] == kind and x["bits_per_weight"] <= 5),
                          key=lambda x: x["bits_per_weight"])
            if rows:
                ax.plot([x["bits_per_weight"] for x in rows], [x.get(key, np.nan) for x in rows], style, label=label,
                        ms=5)
        ax.set_xlabel("bits per expert weight")
        ax.set_ylabel(ylabel)
        ax.set_yscale("log")
    axes[0].yaxis.set_major_formatter(matplotlib.ticker.PercentFormatter(1.0))
    axes[0].set_title(f"{Path(r['model']).name}: perplexity ({r['eval']['tokens']:,} held-out tokens)", fontsize=10)
    axes[0].grid(True, which="both", alpha=0.3)
    save(fig, axes[1], out, "KL from the F16 source")


def _paired(x: dict, key: str) -> str:
    v = x.get(key)
    if not v or "kld_standard_error" not in v:         # results written before KL was paired
        return "-"
    ll, kl = -v["delta_nll_per_token"] / v["nll_standard_error"], -v["delta_kld_per_token"] / v["kld_standard_error"]
    return (f"{v['label']} ({v['bytes_ratio']:.2f}x bytes): log-lik. {-v['delta_nll_per_token']:+.4f} "
            f"({ll:+.1f} s.e.), KL {v['delta_kld_per_token']:+.5f} ({kl:+.1f} s.e.)"
            + (" **wins both**" if v["wins_both_by_2se"] else ""))


def quality_section(path: Path, r: dict) -> str:
    png = path.with_suffix(".png")
    quality_plot(r, png)
    predicted = any(x.get("predicted_kld") is not None for x in r["rows"])     # sweeps since the column came
    table = [("| file | bits/weight | perplexity | vs source | KL (nats/token) | "
              + ("planner's KL | " if predicted else "") + "same top-1 | vs uniform rival | vs mix rival | "
              "schemes (plans) |"), "|---|---|---|---|---|---|---|---|---|" + "---|" * predicted]
    for x in sorted(r["rows"], key=lambda x: (x["bits_per_weight"], x["kind"])):
        schemes = ", ".join(f"{k} {v}" for k, v in list((x.get("schemes") or {}).items())[:4])
        vs = f"{x['ppl_vs_source']:+.2%}" if "ppl_vs_source" in x else "-"
        guess = ("-" if x.get("predicted_kld") is None else f"{x['predicted_kld']:.5f}") + " | " if predicted else ""
        table.append(f"| {x['label']} | {x['bits_per_weight']:.3f} | {x['perplexity']:.3f} | {vs} | {x['kld']:.5f} | "
                     f"{guess}{x['same_top1']:.2%} | {_paired(x, 'vs_uniform')} | {_paired(x, 'vs_mix')} | {schemes} |")
    q2 = {x["kind"]: x["ppl_vs_source"] for x in r["rows"]
          if x["label"].startswith("uniform Q2_K") and "ppl_vs_source" in x}
    bar = ("" if not q2 else
           f"Uniform Q2_K raises perplexity over the source by "
           f"{', '.join(f'{v:+.2%} ' + ('without' if k == 'uniform-no-imatrix' else 'with') + ' importance matrices' for k, v in q2.items())}"
           f"; the fixture's bar is +3% ({'met' if max(q2.values()) >= 0.03 else 'not met'}).")
    plans = [x for x in r["rows"] if x["kind"] == "plan"]
    wins = [f"{x['label']}: uniform {'won' if x.get('vs_uniform', {}).get('wins_both_by_2se') else 'NOT won'}"
            f", mix {'won' if x.get('vs_mix', {}).get('wins_both_by_2se') else 'NOT won'}" for x in plans]
    return "\n".join([
        f"## {path.stem}: per-expert plans against uniform files and llama.cpp-style mixes", "",
        (f"`{r['model']}` (F16 source), profiled on {r['profile']['tokens']:,} tokens of the {r['profile']['text']} "
         f"(up to {r['profile']['samples_per_expert']} FFN inputs sampled per expert, which also give each "
         f"expert's importance matrices); every expert's cost measured at every pair of {', '.join(r['types'])} "
         f"(gate/up, down). Perplexity and KL from the source on {r['eval']['tokens']:,} tokens of the "
         f"{r['eval']['text']} in windows of {r['eval']['n_ctx']}, every file on the same windows, through "
         f"llama-cpp-python {r['runtime']['llama_cpp_python']}. A plan's rivals are the smallest uniform file and "
         "the smallest mix at least as large, compared window by window: log-likelihood and KL per token "
         "(positive log-likelihood and negative KL: the plan is better), in paired standard errors. "
         f"{r['date']}."), "",
        *table, "", bar, "", "Plans beating both rivals on both measures by more than 2 s.e.: " + "; ".join(wins) + ".", "",
        f"![quality at equal size]({png.relative_to(ROOT).as_posix()})", "",
        "Command:", "", "```sh", r["command"], "```", ""])


def substitution_section(path: Path, r: dict) -> str:
    rows = r["rows"]
    base = next((x["perplexity"] for x in rows if x["threshold"] is None), None)
    table = [("| threshold | perplexity | vs none | KL from source (nats/token) | same top-1 | chosen experts run "
              "from copies | expert MB read/token |"), "|---|---|---|---|---|---|---|"]
    for x in rows:
        rel = f"{100 * (x['perplexity'] / base - 1):+.3f}%" if base else "-"
        table.append(f"| {'none' if x['threshold'] is None else x['threshold']} | {x['perplexity']:.3f} | {rel} | "
                     f"{x['kld']:.5f} | {x['same_top1']:.2%} | {x['substituted_share']:.1%} | "
                     f"{x['fetched_bytes_per_token'] / 1e6:.2f} |")
    return "\n".join([
        f"## {path.stem}: low-bit substitution on a miss, quality as decoding runs", "",
        (f"{Path(r['model']).name} ({r['lowbit']} copies of every expert) under a {r['budget']} expert budget, "
         f"scored one token per evaluation (`edgemoe ppl --batch 1`, {rows[0]['tokens']:,} validation tokens), "
         f"against {Path(r['reference']).name}. A missed expert runs from its copy when the experts ranked above "
         "it carry more than the threshold of the gate weight; with top-2 routing every threshold below 0.5 "
         f"substitutes every missed second expert. {r['date']}."), "", *table, "",
        "```sh", r.get("command", "python tools/substitution_sweep.py"), "```", ""])


def configs_section(path: Path, r: dict) -> str:
    table = [("| budget | configuration | decode tok/s | edgemoe/stock | prefill tok/s | MB/token | x Belady floor | "
              "hit rate | prefetched/token | wasted/token |"), "|---|---|---|---|---|---|---|---|---|---|"]

    def med(entry, key, spec="{:.2f}"):
        v = entry.get(key, {}).get("median")
        return "-" if v is None else spec.format(v)
    for b in r["budgets"]:
        st = b["stock"]
        mb = st["decode_read_bytes_per_token"]["median"]
        table.append(f"| {b['budget']} | stock | {med(st, 'decode_tok_s')} | 1.00x | {med(st, 'prefill_tok_s', '{:.1f}')} | "
                     f"{'-' if mb is None else f'{mb / 1e6:.1f}'} | - | - | - | - |")
        for c in b["configs"]:
            ed = c["edgemoe"]
            mb = ed["decode_read_bytes_per_token"]["median"]
            table.append(f"| {b['budget']} | {c['label']} | {med(ed, 'decode_tok_s')} | "
                         f"{c['decode_ratio']['median'] or 0:.2f}x | {med(ed, 'prefill_tok_s', '{:.1f}')} | "
                         f"{'-' if mb is None else f'{mb / 1e6:.1f}'} | "
                         f"{c.get('edgemoe_bytes_vs_floor') or 0:.2f}x | {med(ed, 'hit_rate', '{:.1%}')} | "
                         f"{med(ed, 'prefetches_per_token')} | {med(ed, 'prefetch_wasted_per_token')} |")
    return "\n".join([
        f"## {path.stem}: every cache configuration against the same stock runs", "",
        (f"{Path(r['model']).name}, {r['expert_bytes'] / 1e9:.2f} GB of experts; {r['runs']} runs per engine and "
         f"budget, {r['tokens']} tokens each, every run a child in the budget's cgroup memory limit with a cold page "
         f"cache; stock and each configuration (POLICY+PREDICTOR:DEPTH) take turns in a rotating order. Ratios "
         f"are medians of per-run ratios to that run's stock. Disk {r['disk_bandwidth_bps'] / 1e9:.2f} GB/s cold. "
         f"{r['date']}."), "", *table, "", "```sh", r["command"], "```", ""])


def quality_fixture_section(path: Path, r: dict) -> str:
    """tools/quality_fixture.py: the F16 quality fixture against uniform files made from it."""
    t = r["training"]
    rows = [("| file | bits/weight | perplexity | vs source | log-likelihood vs source (nats/token) | "
            "KL vs source (nats/token) | same top-1 |"), "|---|---|---|---|---|---|---|"]
    for x in r["rows"]:
        paired = x.get("vs_source")
        ll = f"{-paired['delta_nll_per_token']:+.5f} ± {paired['standard_error']:.5f}" if paired else "-"
        rows.append(f"| {x['label']} | {x['bits_per_weight']:.3f} | {x['perplexity']:.3f} | "
                    f"{x['ppl_ratio'] - 1:+.2%} | {ll} | {x['kld']:.5f} | {x['same_top1']:.2%} |")
    bar = r.get("bar")
    verdict = (f" Uniform Q2_K raises perplexity by {bar['q2_k_increase']:.2%}: the bar of {bar['required']:.0%} "
               f"is {'met' if bar['met'] else 'not met'}." if bar else "")
    changed = ", ".join(f"{k} {v}" for k, v in t.get("config", {}).items())
    return "\n".join([
        f"## {path.stem}: the quality fixture, F16, against uniform files made from it", "",
        (f"`{r['model']}` ({r['model_bytes'] / 1e6:.1f} MB), trained by `{t.get('tool', '?')}` for "
         f"{t.get('steps', '?')} steps ({changed or 'the default configuration'})"
         + (f" in {t['train_seconds'] / 60:.0f} minutes" if "train_seconds" in t else "") + "; perplexity on"
         f" {r['rows'][0]['tokens']:,} tokens of the "
         f"{r['eval']['text']} in windows of {r['eval']['n_ctx']}, every file on the same windows, through "
         f"llama-cpp-python {r['runtime']['llama_cpp_python']}.{verdict} {r['date']}."), "",
        *rows, "", "Command:", "", "```sh", r["command"], "```", ""])


def prefill_section(path: Path, r: dict) -> str:
    def fmt(x, spec="{:.1f}"):
        return "-" if x is None else spec.format(x)

    about = (f"{r['date']}. `tools/prefill_bench.py`: `edgemoe bench --prompt-tokens N` per model and prompt length "
             "(stock and edgemoe alternating under one cgroup limit, cold page cache, the prompt cut from held-out "
             "text to exactly N tokens, routing injected from a generated trace). Ratios are medians of per-pair "
             "ratios; the bound is max(the warm reference's prefill, the prompt's expert bytes at the measured disk "
             "speed).")
    head = ("| model | prompt tokens | budget | limit | stock prefill tok/s | edgemoe prefill tok/s | edgemoe/stock "
            "(min-max) | x bound | compute alone tok/s | major faults stock / edgemoe | decode after, edgemoe/stock "
            "| budget given up to pressure | runs |")
    lines = [f"## Prefill under a memory limit ({path.name})", "", about, "", head, "|---|" * 1 + "---|" * 12]
    faults = {(b["prompt_tokens"], e["budget"]): [statistics.median(p[k]["major_faults"] for p in e["pairs"])
                                                 for k in ("stock", "edgemoe")]
              for b in r["benches"] for e in b["budgets"]}
    for row in r["rows"]:
        lo, hi = row["prefill_ratio_range"]
        fs, fe = faults.get((row["prompt_tokens"], row["budget"]), (None, None))
        gave = row.get("capacity_given_up_bytes")
        lines.append(f"| {row['model']} | {row['prompt_tokens']} | {row['budget']} | "
                     f"{fmt(row['limit_bytes'] and row['limit_bytes'] / 2**20, '{:,.0f}')} MiB | "
                     f"{fmt(row['stock_prefill_tok_s'])} | {fmt(row['edgemoe_prefill_tok_s'])} | "
                     f"{fmt(row['prefill_ratio'], '{:.2f}x')} ({fmt(lo, '{:.2f}')}-{fmt(hi, '{:.2f}')}) | "
                     f"{fmt(row['prefill_vs_bound'], '{:.2f}x')} | {fmt(row['compute_alone_prefill_tok_s'])} | "
                     f"{fmt(fs, '{:,.0f}')} / {fmt(fe, '{:,.0f}')} | {fmt(row.get('decode_ratio'), '{:.2f}x')} | "
                     f"{fmt(gave and gave / 2**20, '{:,.0f} MiB')} | {row['runs']} |")
    return "\n".join(lines + ([""] + [r["note"]] if r.get("note") else [])) + "\n"


def sweep_plot(r: dict, out: Path) -> None:
    """Decode against no prediction by oracle recall, per budget and depth (oracle configurations only)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.2), dpi=110)
    for b in r["budgets"]:
        for depth in sorted({c["depth"] for c in b["configs"] if c["predictor"] == "oracle"}):
            pts = sorted((c["recall"], c["vs_no_prediction"]["median"]) for c in b["configs"]
                         if c["predictor"] == "oracle" and c["depth"] == depth and c["vs_no_prediction"]["median"])
            if pts:
                ax.plot(*zip(*pts), marker="o", label=f"{b['budget']}, depth {depth}")
    ax.axhline(1.0, color="k", linestyle="--", linewidth=1, label="no prediction")
    ax.set_xlabel("oracle recall (share of the next layers' experts named)")
    ax.set_ylabel("decode speed / no prediction's")
    save(fig, ax, out, f"{Path(r['model']).name}: what prefetch gains by predictor recall")


def sweep_section(path: Path, r: dict) -> str:
    def fmt(x, spec="{:.2f}"):
        return "-" if x is None else spec.format(x)

    only = r["compute_only"]
    lines = [f"## Prefetch by predictor ({path.name})", "",
             (f"{r['date']}. `tools/prefetch_sweep.py`: edgemoe with each predictor configuration and without "
              f"prediction, alternating under one cgroup limit per budget, cold page cache, {r['runs']} runs each, "
              f"{r['tokens']} decoded tokens, routing {r['routing']}. The oracle names the trace's true experts of "
              "the next layers, each kept with probability r, the rest by chance (edgemoe_bench.oracle). x none: "
              "median of per-round ratios to the run without prediction; x bound: decode time over max(compute "
              f"alone, {fmt(only.get('ms_per_token'), '{:.1f}')} ms, the run's reads at the disk speed measured "
              "beside it); bytes: decode reads per token against the run's Belady floor and against no prediction's."),
             "", ("| budget | configuration | tok/s | x none (min-max) | x bound | read wait ms/token | MB/token | "
                  "x floor | x none's bytes | prefetched / used / wasted per decoded token (prompt's included) |"), "|---|---|" + "---|" * 8]
    for b in r["budgets"]:
        for c in b["configs"]:
            e, v = c["edgemoe"], c["vs_no_prediction"]
            lines.append(
                f"| {b['budget']} | {c['label']} | {fmt(e['decode_tok_s']['median'])} | {fmt(v['median'])} "
                f"({fmt(v['min'])}-{fmt(v['max'])}) | {fmt(c['decode_vs_bound'])} | "
                f"{fmt(c['read_wait_ms_per_token']['median'], '{:.1f}')} | "
                f"{fmt(e['decode_read_bytes_per_token']['median'] and e['decode_read_bytes_per_token']['median'] / 1e6, '{:.1f}')} | "
                f"{fmt(c.get('edgemoe_bytes_vs_floor'))} | {fmt(c['bytes_vs_no_prediction'])} | "
                f"{fmt(e.get('prefetches_per_token', {}).get('median'), '{:.1f}')} / "
                f"{fmt(e.get('prefetch_used_per_token', {}).get('median'), '{:.1f}')} / "
                f"{fmt(e.get('prefetch_wasted_per_token', {}).get('median'), '{:.1f}')} |")
    for b in r["budgets"]:
        for c in b["configs"]:
            decisions = [d for d in c.get("auto_decisions") or [] if d]
            if decisions:
                lines += ["", f"{b['budget']}, `{c['label']}` decided: " + "; ".join(
                    f"prefetch {'on' if d['prefetch'] else 'off'} (" + (
                        f"gate recall {d['recall']:.2f} against {d['crossover_recall']}, reads waited "
                        f"{d['read_wait_ms']:.1f} of {d['token_ms']:.1f} ms a token" if "recall" in d else d["why"])
                    + ")" for d in decisions) + "."]
    cross = [f"{b['budget']}: " + ", ".join(f"depth {d}: {fmt(x)}" for d, x in b["crossover_recall"].items())
             for b in r["budgets"] if b["crossover_recall"]]
    if cross:
        png = path.with_suffix(".png")
        sweep_plot(r, png)
        lines += ["", "Recall above which prefetch pays (interpolated; - where the highest recall measured does "
                  "not): " + "; ".join(cross) + ".", "", f"![{path.stem}]({png.relative_to(ROOT)})"]
    return "\n".join(lines + (["", r["note"]] if r.get("note") else []) + ["", "```sh", r["command"], "```", ""])


def _training_line(t: dict | None) -> list[str]:
    if not t:
        return []
    c = t["config"]
    return [(f"The model: {t['parameters'] / 1e6:.1f}M parameters, trained {c['steps']} steps of {c['batch_size']} x "
             f"{c['seq_len']} tokens in {t['train_seconds'] / 60:.0f} minutes on this machine; held-out perplexity "
             f"{t['llama_cpp_val_ppl']:.2f} through llama.cpp (a unigram model of the training text: "
             f"{t['unigram_val_ppl']:.1f})."), ""]


def routing_fixture_section(path: Path, r: dict) -> str:
    g = r["geometry"]
    return "\n".join([
        f"## The routing fixture's routing beside Qwen3-30B-A3B's ({path.name})", "",
        (f"{r['date']}. `tools/routing_fixture.py`: a model trained by `tools/make_tiny_moe.py` with Qwen3's routing "
         f"shape ({g['moe_layers']} MoE layers, {g['n_expert']} experts, top-{g['k']}), its routing recorded through "
         f"llama.cpp on held-out text. Prefill: {r['prefill']['tokens']:,} tokens in batches of "
         f"{r['prefill']['window']}; decode: {r['decode']['tokens']:,} tokens generated greedily "
         f"({r['decode']['per_prompt']} after each of several held-out prompts of {r['decode']['prompt_tokens']} "
         "tokens). Statistics as the trace presets report them (coverage over 1,024-token spans, an LRU cache of "
         "40% of each layer's experts); Qwen3's published figures (sources below), the qwen3 preset's generated "
         "trace, and routing without locality at the fixture's geometry beside them."), "",
        r["table"], "", *_training_line(r.get("training")),
        "Sources of the published figures: " + "; ".join(r["qwen3_sources"]) + ".",
        *(["", r["note"]] if r.get("note") else []), "", "```sh", r["command"], "```", ""])


def section(path: Path) -> str:
    r = json.loads(path.read_text())
    if r.get("kind") == "quality":
        return quality_section(path, r)
    if r.get("kind") == "quality_fixture":
        return quality_fixture_section(path, r)
    if r.get("kind") == "server_load":
        return server_section(path, r)
    if r.get("kind") == "policy_replay":
        return policy_section(path, r)
    if "presets" in r and "tolerance" in r:
        return trace_stats_section(path, r)
    if r.get("kind") == "policy_replay_presets":
        return presets_section(path, r)
    if r.get("kind") == "predictor_recall":
        return recall_section(path, r)
    if r.get("kind") == "hook_overhead":
        return hook_section(path, r)
    if "variants" in r and "miss_set_bytes" in r:
        return fetch_section(path, r)
    if r.get("kind") == "cache_microbench":
        return microbench_section(path, r)
    if r.get("kind") == "substitution":
        return substitution_section(path, r)
    if r.get("kind") == "bench_configs":
        return configs_section(path, r)
    if r.get("kind") == "bench_baseline":
        return baseline_section(path, r)
    if r.get("kind") == "prefill":
        return prefill_section(path, r)
    if r.get("kind") == "prefetch_sweep":
        return sweep_section(path, r)
    if r.get("kind") == "routing_fixture":
        return routing_fixture_section(path, r)
    png = path.with_suffix(".png")
    plot(r, png)
    return bench_report.section(path, r, root=ROOT, image=png)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("results", nargs="*", type=Path)
    ap.add_argument("--out", type=Path, default=ROOT / "BENCHMARKS.md")
    args = ap.parse_args()
    files.tool_output(args.out)
    sources = [f.resolve() for f in args.results] or sorted(RESULTS.glob("*.json"),
                                                      key=lambda f: (f.stem != "io-moe", f.stem))
    head = ["# Benchmarks", "",
            ("Generated by `python tools/bench_report.py` from the JSON under `bench/results/`. "
            "Every figure is measured on this project's machines (shared, noisy: medians of several runs)."), ""]
    results = {f: json.loads(f.read_text()) for f in sources}
    # `edgemoe bench` results (tools write a "kind" of their own)
    benches = {f: r for f, r in results.items() if "kind" not in r}
    shapes = {f: r for f, r in benches.items() if str(r.get("routing", "")).startswith("injected")}
    configured = {f: r for f, r in benches.items() if r.get("policy") and f not in shapes}
    extra = [bench_report.configurations_section(configured)] if configured else []
    if shapes:
        # with them: the traces' statistics and the policies replayed on them, when measured
        beside = [f for f in sources if f.stem in SHAPES_EXTRA]
        extra.append(bench_report.shapes_section(shapes, [section(f) for f in beside]))
        sources = [f for f in sources if f not in beside]
    body = [section(f) for f in sources]
    titles = {f.stem: next((line[3:] for line in text.splitlines() if line.startswith("## ")), "")
              for f, text in zip(sources, body, strict=True)}
    quality = results.get(RESULTS / "quality.json")
    prefill = results.get(RESULTS / "prefill.json")
    sweeps = {f: r for f, r in results.items() if r.get("kind") == "prefetch_sweep"}
    summary = bench_report.summary_section(shapes, quality, prefill, titles, sweeps)
    files.write_text(args.out, "\n".join(head + [summary] + extra + body))
    print(f"wrote {args.out} from {len(sources)} result file(s)")


if __name__ == "__main__":
    main()
