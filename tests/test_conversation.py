"""A conversation keeps its expert cache: five turns at a 50% budget through `Llama.create_chat_completion` and
through `edgemoe serve`'s /v1/chat/completions. llama-cpp-python evaluates only what each turn adds (it reuses the
prefix it holds); nothing between turns resets the cache or drops its experts, experts kept from earlier turns are
hit again, and mincore shows the budget held after every turn. The server's /metrics counters grow with the turns
and say what /edgemoe/stats says. tools/chat_turns.py reports the same per turn."""
import json
import os
import subprocess
import sys
from pathlib import Path

import test_metrics
import test_server
from test_metrics import KEY, scrape, value
from test_server import get_json, request

from edgemoe_llamacpp import Llama, pages, read_layout
from edgemoe_llamacpp.cache.residency import tensor_span

model_copy = test_server.model_copy         # the server's model: a copy of the fixture
server = test_metrics.server                # `edgemoe serve` on it at a 50% budget, its /metrics behind KEY
USER = ("Write a function that reads a configuration file.", "Make it skip comments.", "Add a test for it.",
        "What if a line has no equals sign?", "Now write it as a class.")
MAX_TOKENS = 16
# /metrics family -> where edgemoe_stats() keeps the same figure
COUNTERS = {"edgemoe_expert_hits": ("total", "hits"), "edgemoe_expert_misses": ("total", "misses"),
            "edgemoe_expert_fetched_bytes": ("total", "bytes_fetched"),
            "edgemoe_prompt_tokens": ("tokens", "prompt"), "edgemoe_generated_tokens": ("tokens", "generated")}


def figure(stats: dict, path: tuple[str, str]):
    return stats[path[0]][path[1]]


def layer_hits(stats: dict) -> dict[int, int]:
    return {x["layer"]: x["hits"] for x in stats["layers"]}


def check_turn(before: dict, after: dict, usage: dict, turn: int) -> None:
    """What every turn must show in edgemoe_stats(): counters that only grow, the tokens of this turn alone
    evaluated (from the second turn on, fewer than the conversation holds), experts still resident."""
    for path in COUNTERS.values():
        assert figure(after, path) >= figure(before, path), (turn, path)
    evaluated = after["tokens"]["prompt"] - before["tokens"]["prompt"]
    assert 0 < evaluated <= usage["prompt_tokens"]
    if turn > 1:
        assert evaluated < usage["prompt_tokens"], "the conversation's prefix was evaluated again"
        assert after["total"]["hits"] > before["total"]["hits"], "no expert kept from earlier turns was hit"
    assert after["resident_expert_bytes"] > 0, "the cache was emptied"


def test_a_chat_through_create_chat_completion_keeps_its_expert_cache(fixture_path):
    llm = Llama(str(fixture_path), memory_budget="50%", n_ctx=512, record_routing=True, verbose=False)
    try:
        cache, first = llm.edgemoe.cache, read_layout(str(fixture_path)).moe_layers[0]
        messages, stats = [], llm.edgemoe_stats()
        for turn, text in enumerate(USER, 1):
            kept, start = set(cache.resident), len(llm.edgemoe_trace())
            messages.append({"role": "user", "content": text})
            out = llm.create_chat_completion(messages=messages, max_tokens=MAX_TOKENS, temperature=0.0, seed=0)
            messages.append(out["choices"][0]["message"])
            after = llm.edgemoe_stats()
            check_turn(stats, after, out["usage"], turn)
            # the turn's first evaluation, first MoE layer: the experts it chose that earlier turns left resident
            # are hits (nothing has been evicted yet in this turn)
            layer, ids = llm.edgemoe_trace()[start]
            assert layer == first and len(ids) > 1
            again = {e for row in ids for e in row} & {u.expert for u in kept if u.layer == first}
            assert layer_hits(after)[first] - layer_hits(stats)[first] >= len(again)
            if turn > 1:
                assert again, f"turn {turn} chose none of the experts the earlier turns kept"
            assert 0 < llm.edgemoe_measured_resident_bytes() <= after["budget_bytes"]
            stats = after
    finally:
        llm.close()


def expert_spans(path) -> list[tuple[int, int]]:
    return [tensor_span(t.offset, t.nbytes) for t in read_layout(str(path)).expert_tensors]


def test_a_chat_through_the_server_keeps_its_expert_cache_and_metrics_say_so(server, model_copy):
    spans, messages = expert_spans(model_copy), []
    stats = get_json(server, "/edgemoe/stats", KEY)["stats"]
    for turn, text in enumerate(USER, 1):
        messages.append({"role": "user", "content": text})
        status, _, body = request(server, "/v1/chat/completions", KEY, {"messages": messages, "max_tokens": MAX_TOKENS,
                                                                         "temperature": 0.0, "seed": 0}, timeout=120)
        assert status == 200, body
        out = json.loads(body)
        messages.append({"role": "assistant", "content": out["choices"][0]["message"]["content"]})
        after = get_json(server, "/edgemoe/stats", KEY)["stats"]
        check_turn(stats, after, out["usage"], turn)
        families = scrape(server)           # nothing runs between the two reads: the same figures
        for name, path in COUNTERS.items():
            assert value(families, name, model="edgemoe") == figure(after, path), (turn, name)
        assert value(families, "edgemoe_resident_expert_bytes", model="edgemoe") == after["resident_expert_bytes"]
        # the server's expert pages, as the kernel's page cache holds them (the file's only user is the server)
        assert 0 < pages.file_cached_bytes(model_copy, spans) <= after["budget_bytes"]
        stats = after


def test_chat_turns_tool_reports_each_turn_within_the_budget(fixture_path, tmp_path):
    root = Path(__file__).resolve().parent.parent
    out = tmp_path / "chat.json"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(root), os.environ.get("PYTHONPATH")]))}
    proc = subprocess.run([sys.executable, str(root / "tools/chat_turns.py"), str(fixture_path), "--budget", "50%",
                           "--turns", "5", "--max-tokens", str(MAX_TOKENS), "--n-ctx", "512", "--json", str(out)],
                          capture_output=True, text=True, env=env, timeout=300, check=False)
    assert proc.returncode == 0, proc.stderr[-2000:]
    r = json.loads(out.read_text())
    assert r["kind"] == "chat_turns" and [t["turn"] for t in r["turns"]] == [1, 2, 3, 4, 5]
    for t in r["turns"]:
        assert 0 < t["measured_resident_bytes"] <= t["budget_bytes"] and t["resident_expert_bytes"] > 0
        assert 0 <= t["hit_rate"] <= 1 and t["fetched_mb_per_token"] >= 0
    later = r["turns"][1:]
    assert all(t["prompt_tokens_evaluated"] < t["conversation_tokens"] for t in later)
    assert all(t["hits"] > 0 for t in later)
    assert "| turn | conversation tokens |" in proc.stdout
