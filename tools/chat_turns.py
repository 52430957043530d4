"""A conversation through `edgemoe_llamacpp.Llama.create_chat_completion`, turn by turn: what the expert cache did
in each turn. One model and one cache for the whole conversation: llama-cpp-python evaluates only what a turn adds
to the conversation (it reuses the prefix it holds), and nothing between turns resets the cache or drops experts.

    python tools/chat_turns.py tests/fixtures/tiny-moe.gguf --budget 50% --turns 5 --json chat.json

Per turn: tokens evaluated (the new messages and the reply's re-read; not the reused prefix) and generated, the
expert hit rate, MB the cache read per token (on demand and ahead) and MB this process read from storage per token,
and the expert bytes in memory after the turn, as the cache counts them and as mincore sees them, against the
budget.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import psutil
from tqdm import tqdm

from edgemoe_llamacpp import Llama, files
from edgemoe_llamacpp.errors import EdgeMoEError

# the user's side of the conversation, taken in turn (and again from the first, past the last)
MESSAGES = (
    "Write a Python function that reads a configuration file into a dictionary.",
    "Now make it skip blank lines and comments.",
    "Add a test for it with unittest.",
    "How would you report a line that has no equals sign?",
    "Rewrite the function as a class with a load method.",
)


def counters(llm: Llama) -> dict:
    """The cache's and the process's running totals that a turn's figures are differences of."""
    s = llm.edgemoe_stats()
    t = s["total"]
    return {"hits": t["hits"], "misses": t["misses"], "fetched": t["bytes_fetched"] + t["prefetch_bytes"],
            "prompt": s["tokens"]["prompt"], "generated": s["tokens"]["generated"],
            "storage": psutil.Process().io_counters().read_bytes}


def turn(llm: Llama, messages: list[dict], max_tokens: int) -> dict:
    """One turn: the reply appended to `messages`, and what it cost the cache."""
    before, start = counters(llm), time.perf_counter()
    out = llm.create_chat_completion(messages=messages, max_tokens=max_tokens, temperature=0.0, seed=0)
    seconds, after = time.perf_counter() - start, counters(llm)
    messages.append({"role": "assistant", "content": out["choices"][0]["message"]["content"]})
    d = {k: after[k] - before[k] for k in after}
    tokens, lookups, stats = d["prompt"] + d["generated"], d["hits"] + d["misses"], llm.edgemoe_stats()
    return {"conversation_tokens": out["usage"]["prompt_tokens"], "prompt_tokens_evaluated": d["prompt"],
            "generated_tokens": d["generated"], "seconds": seconds, "hits": d["hits"], "misses": d["misses"],
            "hit_rate": d["hits"] / lookups if lookups else None,
            "fetched_mb_per_token": d["fetched"] / 1e6 / tokens if tokens else None,
            "storage_mb_per_token": d["storage"] / 1e6 / tokens if tokens else None,
            "resident_expert_bytes": stats["resident_expert_bytes"],
            "measured_resident_bytes": llm.edgemoe_measured_resident_bytes(), "budget_bytes": stats["budget_bytes"]}


def conversation(llm: Llama, turns: int, max_tokens: int) -> list[dict]:
    messages: list[dict] = []
    rows = []
    for k in tqdm(range(turns), desc="turns", unit="turn"):
        messages.append({"role": "user", "content": MESSAGES[k % len(MESSAGES)]})
        rows.append({"turn": k + 1, **turn(llm, messages, max_tokens)})
    return rows


def table(rows: list[dict]) -> str:
    def fmt(x, spec):
        return "-" if x is None else spec.format(x)

    out = [("| turn | conversation tokens | evaluated | generated | hit rate | cache MB/token | storage MB/token | "
           "resident MB (mincore) | budget MB |"), "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        budget = r["budget_bytes"]
        out.append(f"| {r['turn']} | {r['conversation_tokens']} | {r['prompt_tokens_evaluated']} | "
                   f"{r['generated_tokens']} | {fmt(r['hit_rate'], '{:.1%}')} | "
                   f"{fmt(r['fetched_mb_per_token'], '{:.2f}')} | {fmt(r['storage_mb_per_token'], '{:.2f}')} | "
                   f"{r['resident_expert_bytes'] / 1e6:.1f} ({r['measured_resident_bytes'] / 1e6:.1f}) | "
                   f"{'none' if budget is None else f'{budget / 1e6:.1f}'} |")
    return "\n".join(out)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model", help="a MoE GGUF file")
    ap.add_argument("--budget", default="50%", help="the experts' memory budget (default 50%%)")
    ap.add_argument("--turns", type=int, default=5, help="user turns (default 5)")
    ap.add_argument("--max-tokens", dest="max_tokens", type=int, default=32, help="tokens per reply (default 32)")
    ap.add_argument("--n-ctx", dest="n_ctx", type=int, default=2048)
    ap.add_argument("--json", type=Path, help="write the turns here")
    args = ap.parse_args()
    if args.json:
        files.tool_output(args.json, "--json")
    for flag, value in (("--turns", args.turns), ("--max-tokens", args.max_tokens), ("--n-ctx", args.n_ctx)):
        if value < 1:
            ap.error(f"{flag} must be at least 1, not {value}")
    try:
        llm = Llama(args.model, memory_budget=args.budget, n_ctx=args.n_ctx, verbose=False)
    except (EdgeMoEError, ValueError) as e:
        print(f"chat_turns.py: error: {e}", file=sys.stderr)
        return 2
    try:
        rows = conversation(llm, args.turns, args.max_tokens)
    finally:
        llm.close()
    print(table(rows))
    if args.json:
        result = {"kind": "chat_turns", "command": "python " + " ".join(sys.argv), "model": args.model,
                  "budget": args.budget, "max_tokens": args.max_tokens, "n_ctx": args.n_ctx,
                  "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "turns": rows}
        files.write_text(args.json, json.dumps(result, indent=1) + "\n")
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
