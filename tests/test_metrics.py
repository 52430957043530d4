"""`edgemoe serve`'s GET /health (llama-server's readiness answer, no key) and GET /metrics (Prometheus text,
behind the key): a real server on a copy of the fixture, the real openai client, prometheus_client's parser."""
import json
import shutil
import threading
import time

import pytest
import test_server
from test_server import (
    client,
    free_port,
    get_json,
    request,
    start_server,
    stop_server,
    stream_completion,
)

parser = pytest.importorskip("prometheus_client.parser")
model_copy = test_server.model_copy         # the fixture: the servers' copy of the model

KEY = "metrics-key"
CONTENT_TYPE = "text/plain; version=0.0.4"
LOADING = {"error": {"code": 503, "message": "Loading model", "type": "unavailable_error", "param": None}}  # llama-server's, and OpenAI's param


@pytest.fixture(scope="module")
def server(model_copy, tmp_path_factory):
    proc, base = start_server([str(model_copy), "--memory-budget", "50%", "--api-key", KEY, "--n-ctx", "512",
                               "--model-alias", "edgemoe"], tmp_path_factory.mktemp("server") / "server.log", key=KEY)
    yield base
    stop_server(proc)


def parse_strict(text: str) -> dict:
    """Every family of an exposition, by name; fails unless each sample line parses into a sample of a family
    with a type and a help text, and no family is given twice."""
    families = list(parser.text_string_to_metric_families(text))
    names = [f.name for f in families]
    assert len(names) == len(set(names)), names
    sample_lines = [line for line in text.splitlines() if line.strip() and not line.startswith("#")]
    assert sum(len(f.samples) for f in families) == len(sample_lines)
    for f in families:
        assert f.type in ("counter", "gauge") and f.documentation, f
    return {f.name: f for f in families}


def scrape(base: str) -> dict:
    status, headers, body = request(base, "/metrics", KEY)
    assert status == 200, body
    assert headers["content-type"].startswith(CONTENT_TYPE), headers["content-type"]
    return parse_strict(body.decode("utf-8"))


def value(families: dict, name: str, **labels) -> float:
    """The sum of the samples of family `name` whose labels include `labels` (a counter's `_total` ones)."""
    family = families[name]
    suffix = "_total" if family.type == "counter" else ""
    return sum(s.value for s in family.samples
               if s.name == name + suffix and all(s.labels.get(k) == v for k, v in labels.items()))


def test_health_is_ok_without_the_key(server):
    for key in (None, "wrong", KEY):
        status, headers, body = request(server, "/health", key)
        assert status == 200, body
        assert headers["content-type"] == "application/json" and json.loads(body) == {"status": "ok"}


def test_metrics_want_the_key(server):
    for key in (None, "wrong", KEY[:-1]):
        assert request(server, "/metrics", key)[0] == 401, key
    status, headers, _ = request(server, "/metrics", KEY)
    assert status == 200 and headers["content-type"].startswith(CONTENT_TYPE)


def test_counters_move_after_a_completion(server):
    before = scrape(server)
    completions = value(before, "edgemoe_http_requests", route="/v1/completions", method="POST", status="200")
    out = client(server, KEY).completions.create(model="edgemoe", prompt="def main(argv):\n", max_tokens=12,
                                                 temperature=0)
    after = scrape(server)
    assert value(after, "edgemoe_http_requests", route="/v1/completions", method="POST",
                 status="200") == completions + 1
    assert value(after, "edgemoe_http_requests", route="/metrics", method="GET", status="200") >= 1
    model = {"model": "edgemoe"}
    for name in ("edgemoe_expert_misses", "edgemoe_expert_fetched_bytes", "edgemoe_moe_routings"):
        assert value(after, name, **model) > value(before, name, **model), name
    assert value(after, "edgemoe_expert_misses", **model) > 0 and value(after, "edgemoe_expert_fetched_bytes", **model) > 0
    assert value(after, "edgemoe_expert_hits", **model) + value(after, "edgemoe_expert_misses", **model) > 0
    # tokens: what llama.cpp evaluated of the prompt, and what it sampled (the usage counts them too)
    generated = value(after, "edgemoe_generated_tokens", **model) - value(before, "edgemoe_generated_tokens", **model)
    assert generated >= out.usage.completion_tokens > 0
    prompt = value(after, "edgemoe_prompt_tokens", **model) - value(before, "edgemoe_prompt_tokens", **model)
    assert 0 < prompt <= out.usage.prompt_tokens
    budget, resident = value(after, "edgemoe_budget_bytes", **model), value(after, "edgemoe_resident_expert_bytes",
                                                                              **model)
    assert 0 < resident <= budget < value(after, "edgemoe_expert_bytes", **model)
    stats = get_json(server, "/edgemoe/stats", KEY)["stats"]
    assert budget == stats["budget_bytes"]
    assert value(after, "edgemoe_stall_seconds", **model) >= 0
    for name in ("edgemoe_prefetches", "edgemoe_substituted_experts", "edgemoe_substituted_bytes"):
        assert value(after, name, **model) == 0, name          # no predictor, no low-bit copies
    assert value(after, "edgemoe_requests_running") == 0 and value(after, "edgemoe_requests_waiting") == 0
    assert value(after, "edgemoe_queue_size") == 16
    assert value(after, "edgemoe_http_requests_in_flight") == 1        # the scrape itself
    assert value(after, "process_resident_memory_bytes") > 0


def test_a_scrape_during_a_stream_does_not_wait_and_counts_it(server):
    chunks, scrapes, done = [], [], threading.Event()

    def poll():
        while not done.is_set():
            t0 = time.perf_counter()
            families = scrape(server)
            scrapes.append((len(chunks), time.perf_counter() - t0, families))
            time.sleep(0.02)

    t = threading.Thread(target=poll)
    t.start()
    try:
        stream_completion(server, {"prompt": "import os\n", "max_tokens": 48, "temperature": 0,
                                   "logit_bias": {"0": -100}}, KEY, chunks=chunks)
    finally:
        done.set()
        t.join()
    during = [families for n, _, families in scrapes if 0 < n < 48]
    assert during, [n for n, _, _ in scrapes]
    assert any(value(f, "edgemoe_requests_running") == 1 for f in during)
    assert any(value(f, "edgemoe_http_requests_in_flight") >= 2 for f in during)    # the stream and the scrape
    assert max(seconds for _, seconds, _ in scrapes) < 5
    after = scrape(server)
    assert value(after, "edgemoe_generated_tokens", model="edgemoe") >= 48
    assert value(after, "edgemoe_requests_running") == 0


def test_unknown_paths_share_one_label(server):
    for path in ("/nowhere", "/nowhere/else", "/v2/x"):
        assert request(server, path, KEY)[0] == 404
    families = scrape(server)
    routes = {s.labels["route"] for s in families["edgemoe_http_requests"].samples}
    assert "unmatched" in routes and not {"/nowhere", "/nowhere/else", "/v2/x"} & routes
    assert value(families, "edgemoe_http_requests", route="unmatched", status="404") >= 3


def test_health_is_503_loading_model_while_another_model_loads(model_copy, tmp_path):
    """Two models in a config file: a request for the second closes the first and loads the second, and
    /health answers llama-server's 503 meanwhile."""
    other = tmp_path / "other.gguf"
    shutil.copyfile(model_copy, other)
    config = tmp_path / "models.json"
    port = free_port()
    config.write_text(json.dumps({"api_key": KEY, "port": port, "models": [
        {"model": str(model_copy), "model_alias": "first", "memory_budget": "50%", "n_ctx": 256},
        {"model": str(other), "model_alias": "second", "memory_budget": "50%", "n_ctx": 256}]}))
    proc, base = start_server(["--config_file", str(config)], tmp_path / "server.log", key=KEY, port=port)
    try:
        seen, done = [], threading.Event()

        def poll():
            while not done.is_set():
                status, _, body = request(base, "/health", None)
                seen.append((status, json.loads(body)))

        t = threading.Thread(target=poll)
        t.start()
        try:
            time.sleep(0.2)
            out = client(base, KEY).completions.create(model="second", prompt="import os\n", max_tokens=4)
            time.sleep(0.2)
        finally:
            done.set()
            t.join()
        assert out.model == "second"
        assert seen[0] == (200, {"status": "ok"}) and seen[-1] == (200, {"status": "ok"})
        assert (503, LOADING) in seen, sorted({s for s, _ in seen})
        assert {s for s, _ in seen} == {200, 503}
        families = scrape(base)
        assert value(families, "edgemoe_expert_misses", model="second") > 0
        assert not [s for s in families["edgemoe_expert_misses"].samples if s.labels["model"] == "first"]
    finally:
        stop_server(proc)
