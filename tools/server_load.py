"""A bounded load test of a running `edgemoe serve` on loopback: C clients x R completions each.

    python tools/server_load.py --base-url http://127.0.0.1:8000 --api-key KEY --clients 8 --requests 5 \
        --json bench/results/server-load.json

Every request must be answered; reports requests/s and p50/p95 latency, then the server's /edgemoe/stats.
"""
from __future__ import annotations

import argparse
import json
import statistics
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor

from edgemoe_llamacpp import files

LOOPBACK = ("127.", "localhost", "[::1]")


def stats(base_url: str, api_key: str | None) -> dict:
    req = urllib.request.Request(f"{base_url}/edgemoe/stats",
                                 headers={"Authorization": f"Bearer {api_key}"} if api_key else {})
    with urllib.request.urlopen(req, timeout=30) as r:
        return json.loads(r.read())


def run_load(base_url: str, api_key: str | None, *, clients: int = 8, requests: int = 5,
             max_tokens: int = 8) -> dict:
    from openai import OpenAI

    host = base_url.split("://", 1)[-1]
    if not host.startswith(LOOPBACK):
        raise SystemExit(f"load tests target this machine only, not {base_url}")
    prompts = ["import os\n", "def parse(self, ", "class Config:\n    ", "for i in range("]

    def client_run(c: int) -> list[tuple[float, bool]]:
        client = OpenAI(base_url=f"{base_url}/v1", api_key=api_key or "none", timeout=120, max_retries=0)
        out = []
        for i in range(requests):
            t0 = time.perf_counter()
            r = client.completions.create(model="edgemoe", prompt=prompts[(c + i) % len(prompts)],
                                          max_tokens=max_tokens, temperature=0)
            out.append((time.perf_counter() - t0, bool(r.choices) and r.choices[0].text is not None))
        return out

    t0 = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        results = [x for rows in pool.map(client_run, range(clients)) for x in rows]
    wall = time.perf_counter() - t0
    lat = sorted(x[0] for x in results)
    return {"kind": "server_load", "clients": clients, "requests_per_client": requests, "max_tokens": max_tokens,
            "sent": clients * requests, "answered": sum(ok for _, ok in results), "wall_s": wall,
            "requests_per_s": len(results) / wall, "p50_s": statistics.median(lat),
            "p95_s": lat[min(len(lat) - 1, int(0.95 * len(lat)))], "stats": stats(base_url, api_key)["stats"]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--base-url", default="http://127.0.0.1:8000")
    ap.add_argument("--api-key")
    ap.add_argument("--clients", type=int, default=8)
    ap.add_argument("--requests", type=int, default=5)
    ap.add_argument("--max-tokens", type=int, default=8)
    ap.add_argument("--json")
    args = ap.parse_args()
    if args.json:
        files.tool_output(args.json, "--json")
    result = run_load(args.base_url, args.api_key, clients=args.clients, requests=args.requests,
                      max_tokens=args.max_tokens)
    print(json.dumps({k: v for k, v in result.items() if k != "stats"}))
    if args.json:
        files.write_text(args.json, json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
