"""A contract test of `edgemoe serve` against its own OpenAPI schema.

schemathesis generates requests for every operation of the served schema, valid ones and ones that break
it, and sends them to a real server (`edgemoe serve MODEL --memory-budget 50% --api-key KEY`) on a copy of
the fixture, so that no other test's use of the file shares its page cache. Every answer must be below 500
and show no file path or traceback; every 4xx must have OpenAI's error shape (what the openai client reads);
the server must stay up; and the expert pages of its model file, as the kernel reports them (mincore, from
this process's own mapping: the page cache is shared), must stay within the budget after every request. Then a streamed completion must run to its max_tokens while /edgemoe/stats
is polled and other clients send requests.

Bounded for 2 cores: EDGEMOE_CONTRACT_EXAMPLES (default 25) examples per operation and mode, max_tokens
capped at 16, a context of 256 tokens. The examples are the same every run; EDGEMOE_CONTRACT_RANDOM=1 draws new
ones (with EDGEMOE_CONTRACT_EXAMPLES=200, say, for a longer hunt).
"""
import json
import mmap
import os
import shutil
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from test_server import (
    LEAKS,
    REPO,
    content_chunks,
    get_json,
    openai_error,
    request,
    start_server,
    stop_server,
    stream_completion,
)

from edgemoe_llamacpp import pages
from edgemoe_llamacpp.cache.residency import tensor_span
from edgemoe_llamacpp.gguf.layout import read_layout

schemathesis = pytest.importorskip("schemathesis")
from hypothesis import HealthCheck, Phase, given, settings
from schemathesis import GenerationMode

KEY = "contract-key"
AUTH = {"Authorization": f"Bearer {KEY}"}
EXAMPLES = int(os.environ.get("EDGEMOE_CONTRACT_EXAMPLES", "25"))
SAME_EXAMPLES = os.environ.get("EDGEMOE_CONTRACT_RANDOM") is None
MAX_TOKENS = 16
GENERATING = ("/v1/completions", "/v1/chat/completions")


class ExpertPages:
    """Bytes of the model file's expert tensor pages in memory, by mincore on a read-only mapping of our own."""

    def __init__(self, path: Path):
        layout = read_layout(path)
        fd = os.open(path, os.O_RDONLY)
        try:
            self._map = mmap.mmap(fd, 0, access=mmap.ACCESS_READ)
        finally:
            os.close(fd)
        self._view = np.frombuffer(self._map, dtype=np.uint8)      # never read: only its address is used
        self._base = self._view.ctypes.data
        self._spans = [s for s in (tensor_span(t.offset, t.nbytes) for t in layout.expert_tensors) if s[1] > s[0]]

    def resident(self) -> int:
        return sum(pages.resident_bytes(self._base + a, b - a) for a, b in self._spans)

    def close(self) -> None:
        del self._view
        self._map.close()


class Served:
    def __init__(self, proc, base: str, model: Path):
        self.proc, self.base, self.model = proc, base, model
        self.pages = ExpertPages(model)
        self.budget = get_json(base, "/edgemoe/stats", KEY)["stats"]["budget_bytes"]
        self.most_resident = 0

    def measure(self) -> int:
        resident = self.pages.resident()
        self.most_resident = max(self.most_resident, resident)
        return resident


@pytest.fixture(scope="module")
def served(fixture_path, tmp_path_factory):
    where = tmp_path_factory.mktemp("contract")
    model = where / "tiny-moe.gguf"
    shutil.copyfile(fixture_path, model)
    proc, base = start_server([str(model), "--memory-budget", "50%", "--api-key", KEY, "--n_ctx", "256"],
                              where / "server.log", key=KEY)
    s = Served(proc, base, model)
    yield s
    s.pages.close()
    stop_server(proc)


def bounded(case) -> None:
    """Generation asks for at most MAX_TOKENS tokens (0, negative or missing would run to the context), a
    completion without a prompt gets one, a chat without messages one message, and an integer n or best_of
    is 1: the schema allows what the server refuses (an empty prompt or messages list, more than one
    choice; test_server checks that), and most generated requests would never reach the model."""
    if case.operation.path in GENERATING and isinstance(case.body, dict):
        n = case.body.get("max_tokens")
        if n is None or (isinstance(n, int) and not isinstance(n, bool) and not 0 < n <= MAX_TOKENS):
            case.body["max_tokens"] = MAX_TOKENS
        if case.operation.path == "/v1/completions" and case.body.get("prompt", "") in ("", []):
            case.body["prompt"] = "import os\n"
        if case.operation.path == "/v1/chat/completions" and case.body.get("messages", []) == []:
            case.body["messages"] = [{"role": "user", "content": "import os\n"}]
        for name in ("n", "best_of"):
            if isinstance(case.body.get(name), int) and not isinstance(case.body[name], bool):
                case.body[name] = 1


def check_answer(served: Served, case, response) -> None:
    text = response.content.decode("utf-8", "replace")
    what = f"{case.method} {case.operation.path} {json.dumps(case.body, default=str)[:300]} -> " \
           f"{response.status_code} {text[:300]}"
    assert response.status_code < 500, what
    assert "internal_server_error" not in text, what          # a stream reports a failure in an event
    if response.status_code >= 400:
        try:
            openai_error(response.content)
        except (AssertionError, ValueError) as e:
            raise AssertionError(f"not OpenAI's error shape: {what}") from e
    # model output is Python code and may well print "/usr/" or a traceback: only answers that are not
    # generated text are held to every pattern
    leaks = LEAKS if response.status_code >= 400 else (str(REPO), str(served.model.parent), "site-packages")
    assert not [leak for leak in leaks if leak in text], what
    assert served.proc.poll() is None, what
    resident = served.measure()
    assert resident <= served.budget, (what, resident, served.budget)


def test_every_operation_of_the_schema(served):
    schema = schemathesis.openapi.from_url(f"{served.base}/openapi.json", headers=AUTH, timeout=30)
    operations = [result.ok() for result in schema.get_all_operations()]
    paths = {op.path for op in operations}
    assert {"/v1/completions", "/v1/chat/completions", "/v1/models", "/extras/detokenize",
            "/edgemoe/stats"} <= paths
    calls = {}
    for op in operations:
        modes = [GenerationMode.POSITIVE] + ([GenerationMode.NEGATIVE] if op.method.upper() == "POST" else [])
        for mode in modes:
            @settings(max_examples=EXAMPLES, deadline=None, database=None, derandomize=SAME_EXAMPLES,
                      phases=[Phase.explicit, Phase.generate], suppress_health_check=list(HealthCheck))
            @given(case=op.as_strategy(generation_mode=mode))
            def exchange(case):
                bounded(case)
                response = case.call(base_url=served.base, headers=AUTH, timeout=120)
                key = (case.operation.path, response.status_code)
                calls[key] = calls.get(key, 0) + 1
                check_answer(served, case, response)

            exchange()
    assert served.proc.poll() is None
    status, _, body = request(served.base, "/v1/completions", KEY, {"prompt": "import os\n", "max_tokens": 4})
    assert status == 200, body
    print("answers (path, status): count", sorted(calls.items()), "most expert bytes resident", served.most_resident,
          "budget", served.budget)
    per_path = {path: sum(n for (p, _), n in calls.items() if p == path) for path in paths}
    assert min(per_path.values()) >= 1 and per_path["/v1/completions"] >= EXAMPLES, per_path
    assert calls.get(("/v1/completions", 200)) and calls.get(("/v1/chat/completions", 200)), calls
    assert 0 < served.most_resident <= served.budget       # the measurement saw the experts the server held


def test_a_stream_runs_to_max_tokens_while_stats_are_polled_and_others_ask(served):
    n = 48
    chunks, errors, polls, done = [], [], [], threading.Event()

    def poll():
        while not done.is_set():
            stats = get_json(served.base, "/edgemoe/stats", KEY)
            polls.append((len(chunks), stats["stats"]["resident_expert_bytes"]))
            time.sleep(0.02)

    def other(i: int):
        asks = [("/v1/completions", {"prompt": "def f(x):", "max_tokens": 4}),
                ("/extras/tokenize", {"input": "import sys"}),
                ("/extras/detokenize", {"tokens": [5, 6, 7]}),
                ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}], "max_tokens": 3})]
        while not done.is_set():
            path, body = asks[i % len(asks)]
            status, _, raw = request(served.base, path, KEY, body, timeout=120)
            if status != 200:
                errors.append((path, status, raw[:200]))
            i += 1

    threads = [threading.Thread(target=poll)] + [threading.Thread(target=other, args=(i,)) for i in range(3)]
    for t in threads:
        t.start()
    try:
        stream_completion(served.base, {"prompt": "import os\n", "max_tokens": n, "temperature": 0,
                                        "logit_bias": {"0": -100}}, KEY, chunks=chunks)
    finally:
        done.set()
        for t in threads:
            t.join()
    assert len(content_chunks(chunks)) == n and chunks[-1]["choices"][0]["finish_reason"] == "length"
    assert not errors
    assert any(0 < seen < n for seen, _ in polls)          # polled while the stream ran
    assert max(r for _, r in polls) <= served.budget
    assert served.measure() <= served.budget
    assert served.proc.poll() is None
