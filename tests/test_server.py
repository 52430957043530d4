"""`edgemoe serve`: the real server on a free loopback port, the real openai client."""
import json
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

openai = pytest.importorskip("openai")

KEY = "test-key-123"
REPO = Path(__file__).resolve().parent.parent
# what no answer of the server may show: where it is installed, where its files are, a traceback
LEAKS = (str(REPO), "site-packages", "/usr/", "/root/", "/home/", '.py"', "Traceback")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def serve_command(*args: str) -> list[str]:
    return [sys.executable, "-m", "edgemoe_llamacpp", "serve", *args]


def start_server(args: list[str], log: Path, *, key: str | None = KEY, env: dict | None = None,
                 port: int | None = None):
    """`edgemoe serve ARGS --port P` in the background, its output in `log` (a full pipe would stall it);
    returns (process, base URL) once /edgemoe/stats answers. `port`: the one a config file in ARGS gives."""
    port = port or free_port()
    with open(log, "w") as out:
        proc = subprocess.Popen(serve_command(*args, "--port", str(port)), stdout=out, stderr=out,
                                env={**os.environ, **(env or {})})
    base = f"http://127.0.0.1:{port}"
    deadline = time.time() + 120
    while time.time() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"server exited: {log.read_text()[-2000:]}")
        try:
            get_json(base, "/edgemoe/stats", key)
            return proc, base
        except (urllib.error.URLError, ConnectionError):
            time.sleep(0.3)
    proc.kill()
    pytest.fail(f"server did not start: {log.read_text()[-2000:]}")


def stop_server(proc) -> None:
    proc.terminate()
    try:
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def request(base: str, path: str, key: str | None = KEY, body=None, *, raw: bytes | None = None,
            timeout: float = 60, method: str | None = None, headers: dict | None = None) -> tuple[int, dict, bytes]:
    """(status, headers in lower case, body) of one request; JSON `body` or `raw` bytes make it a POST (unless
    `method` says otherwise)."""
    data = raw if raw is not None else None if body is None else json.dumps(body).encode()
    headers = {**({"Content-Type": "application/json"} if data is not None else {}), **(headers or {})}
    if key:
        headers["Authorization"] = f"Bearer {key}"
    req = urllib.request.Request(base + path, data=data, headers=headers,
                                 method=method or ("POST" if data else "GET"))
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return r.status, {k.lower(): v for k, v in r.headers.items()}, r.read()
    except urllib.error.HTTPError as e:
        return e.code, {k.lower(): v for k, v in e.headers.items()}, e.read()


def openai_error(raw: bytes) -> dict:
    """The error object of an error answer, which must have OpenAI's shape: {"error": {"message": str,
    "type": str, "param": str | None, "code": str | int | None}}, what the openai client reads."""
    body = json.loads(raw)
    assert isinstance(body, dict) and isinstance(body.get("error"), dict), raw[:300]
    error = body["error"]
    assert set(error) == {"message", "type", "param", "code"}, raw[:300]
    assert isinstance(error["message"], str) and error["message"], raw[:300]
    assert isinstance(error["type"], str) and error["type"], raw[:300]
    assert error["param"] is None or isinstance(error["param"], str), raw[:300]
    assert error["code"] is None or isinstance(error["code"], (str, int)), raw[:300]
    return error


def get_json(base: str, path: str, key: str | None = KEY) -> dict:
    req = urllib.request.Request(base + path, headers={"Authorization": f"Bearer {key}"} if key else {})
    with urllib.request.urlopen(req, timeout=30) as r:
        return json.loads(r.read())


def stream_completion(base: str, body: dict, key: str = KEY, chunks: list | None = None) -> list[dict]:
    """The chunks of a streamed completion, read as they come (appended to `chunks` if given)."""
    chunks = [] if chunks is None else chunks
    req = urllib.request.Request(f"{base}/v1/completions", data=json.dumps({**body, "stream": True}).encode(),
                                 headers={"Authorization": f"Bearer {key}", "Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=120) as r:
        assert r.status == 200
        for line in r:
            line = line.strip()
            if line.startswith(b"data: ") and line != b"data: [DONE]":
                chunks.append(json.loads(line[len(b"data: "):]))
    return chunks


def content_chunks(chunks: list[dict]) -> list[str]:
    return [c["choices"][0]["text"] for c in chunks if c["choices"][0]["finish_reason"] is None]


def run_load(base: str, key: str, *, clients: int, requests: int, max_tokens: int) -> dict:
    """C clients x R completions each, every one waited for (what tools/server_load.py measures)."""
    prompts = ["import os\n", "def parse(self, ", "class Config:\n    ", "for i in range("]

    def client_run(c: int) -> list[tuple[float, bool]]:
        out = []
        for i in range(requests):
            t0 = time.perf_counter()
            r = client(base, key).completions.create(model="edgemoe", prompt=prompts[(c + i) % len(prompts)],
                                                     max_tokens=max_tokens, temperature=0)
            out.append((time.perf_counter() - t0, bool(r.choices) and r.choices[0].text is not None))
        return out

    with ThreadPoolExecutor(clients) as pool:
        results = [x for rows in pool.map(client_run, range(clients)) for x in rows]
    return {"sent": clients * requests, "answered": sum(ok for _, ok in results),
            "p50_s": statistics.median(t for t, _ in results), "stats": get_json(base, "/edgemoe/stats", key)["stats"]}


@pytest.fixture(scope="module")
def model_copy(fixture_path, tmp_path_factory) -> Path:
    """The servers' model: a copy, since another process mapping the shared fixture would pin its pages."""
    path = tmp_path_factory.mktemp("model") / "tiny-moe.gguf"
    shutil.copyfile(fixture_path, path)
    return path


@pytest.fixture(scope="module")
def server(model_copy, tmp_path_factory):
    proc, base = start_server([str(model_copy), "--memory-budget", "50%", "--api-key", KEY, "--n-ctx", "512",
                               "--model-alias", "edgemoe"], tmp_path_factory.mktemp("server") / "server.log")
    yield base
    stop_server(proc)


def client(base: str, key: str = KEY):
    return openai.OpenAI(base_url=f"{base}/v1", api_key=key, max_retries=0, timeout=60)


def test_models_completion_and_chat(server):
    c = client(server)
    assert [m.id for m in c.models.list().data] == ["edgemoe"]
    text = c.completions.create(model="edgemoe", prompt="import os\n", max_tokens=12, temperature=0).choices[0].text
    assert len(text) > 0
    chat = c.chat.completions.create(model="edgemoe", max_tokens=12, temperature=0,
                                     messages=[{"role": "user", "content": "def parse(self):"}])
    assert chat.choices[0].message.role == "assistant" and chat.choices[0].message.content


def test_streamed_chat(server):
    chunks = list(client(server).chat.completions.create(
        model="edgemoe", max_tokens=12, temperature=0, stream=True,
        messages=[{"role": "user", "content": "class Parser:"}]))
    pieces = [ch.choices[0].delta.content for ch in chunks if ch.choices and ch.choices[0].delta.content]
    assert len(pieces) >= 2


def test_wrong_api_key_is_401_everywhere(server):
    with pytest.raises(openai.AuthenticationError):
        client(server, "wrong").completions.create(model="edgemoe", prompt="x", max_tokens=1)
    for path in ("/edgemoe/stats", "/v1/models", "/openapi.json", "/docs", "/redoc"):
        for key in (None, "wrong", KEY[:-1], KEY + "4"):
            status, _, _ = request(server, path, key)
            assert status == 401, (path, key)
        status, _, _ = request(server, path)
        assert status == 200, path
    assert "/v1/completions" in json.loads(request(server, "/openapi.json")[2])["paths"]


def test_the_openai_client_shows_why_a_key_is_refused(server):
    with pytest.raises(openai.AuthenticationError) as refused:
        client(server, "wrong").models.list()
    assert "invalid API key" in str(refused.value), str(refused.value)
    assert refused.value.code == "invalid_api_key" and refused.value.type == "invalid_request_error"


@pytest.mark.parametrize(("call", "error", "param", "message"), [
    (lambda c: c.chat.completions.create(model="edgemoe", messages=[]), openai.BadRequestError, "messages",
     "messages is empty"),
    (lambda c: c.chat.completions.create(model="edgemoe", messages=[{"role": "user", "content": "x"}], n=3),
     openai.BadRequestError, "n", "n is 3: this server answers one choice per request"),
    (lambda c: c.completions.create(model="edgemoe", prompt="x", n=2, stream=True), openai.BadRequestError, "n",
     "n is 2"),
    (lambda c: c.completions.create(model="edgemoe", prompt="x = " * 600), openai.BadRequestError, "prompt",
     "exceed context window of 512"),
    (lambda c: c.completions.create(model="edgemoe", prompt="x", max_tokens="many"),
     openai.UnprocessableEntityError, "max_tokens", "max_tokens: Input should be a valid integer"),
    (lambda c: c.get("/nowhere", cast_to=object), openai.NotFoundError, None, "GET /v1/nowhere: no such route"),
], ids=["empty-messages", "n", "n-stream", "context", "validation", "no-route"])
def test_the_openai_client_shows_the_message_and_param_of_an_error(server, call, error, param, message):
    with pytest.raises(error) as refused:
        call(client(server))
    assert message in str(refused.value), str(refused.value)
    assert refused.value.param == param


@pytest.mark.parametrize(("method", "path", "key", "headers", "status", "message"), [
    ("GET", "/v1/models", None, {}, 401, "no API key"),
    ("GET", "/edgemoe/stats", "wrong", {}, 401, "invalid API key"),
    ("GET", "/openapi.json", "wrong", {}, 401, "invalid API key"),
    ("GET", "/docs", None, {}, 401, "no API key"),
    ("POST", "/v1/completions", "wrong", {}, 401, "invalid API key"),
    ("GET", "/nowhere", KEY, {}, 404, "GET /nowhere: no such route"),
    ("POST", "/v1/nowhere", KEY, {}, 404, "POST /v1/nowhere: no such route"),
    ("GET", "/v1/completions", KEY, {}, 405, "GET /v1/completions: the route takes POST"),
    ("DELETE", "/health", KEY, {}, 405, "DELETE /health: the route takes"),
    ("GET", "/v1/models", KEY, {"X-Request-ID": "not-a-uuid"}, 400, "X-Request-ID header is not a UUID"),
])
def test_every_4xx_has_openais_error_shape(server, method, path, key, headers, status, message):
    body = {"prompt": "x"} if method == "POST" else None
    got, answer_headers, raw = request(server, path, key, body, method=method, headers=headers)
    assert got == status, raw
    assert message in openai_error(raw)["message"], raw
    if status == 401:
        assert answer_headers["www-authenticate"] == "Bearer"
    if status == 405:
        assert answer_headers["allow"]


def test_head_answers_every_get_route(server):
    for path in ("/health", "/v1/models", "/edgemoe/stats", "/metrics", "/openapi.json", "/docs", "/redoc"):
        status, headers, raw = request(server, path, method="HEAD")
        assert (status, raw) == (200, b""), path
        assert headers["content-type"] == request(server, path)[1]["content-type"], path
        if path != "/health":           # public, like GET /health
            assert request(server, path, "wrong", method="HEAD")[0] == 401, path
    assert request(server, "/health", None, method="HEAD")[0] == 200
    schema = json.loads(request(server, "/openapi.json")[2])
    assert not [path for path, ops in schema["paths"].items() if "head" in ops]


def test_stats_show_misses_within_budget(server):
    client(server).completions.create(model="edgemoe", prompt="def main(argv):\n", max_tokens=16)
    s = get_json(server, "/edgemoe/stats")["stats"]
    assert s["total"]["misses"] > 0
    assert 0 < s["resident_expert_bytes"] <= s["budget_bytes"]


def test_disconnect_mid_stream_frees_the_server(server):
    req = urllib.request.Request(f"{server}/v1/completions", method="POST",
                                 data=json.dumps({"prompt": "import os\n", "max_tokens": 200,
                                                  "stream": True}).encode(),
                                 headers={"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=30) as r:
        assert r.readline()                 # the stream started; hang up mid-generation
    t0 = time.time()
    text = client(server).completions.create(model="edgemoe", prompt="x = ", max_tokens=4).choices[0].text
    assert text is not None and time.time() - t0 < 60


def test_bounded_load_every_request_answered_budget_held(server):
    result = run_load(server, KEY, clients=8, requests=5, max_tokens=8)
    assert result["answered"] == result["sent"] == 40
    s = result["stats"]
    assert s["resident_expert_bytes"] <= s["budget_bytes"]


@pytest.mark.parametrize("tokens", [[99999999], [-1], [4096]])
def test_detokenize_outside_the_vocabulary_is_400_and_the_server_lives(server, tokens):
    status, _, body = request(server, "/extras/detokenize", body={"tokens": tokens})
    assert status == 400
    assert "token ids are integers from 0 to 4095" in openai_error(body)["message"]
    status, _, body = request(server, "/extras/detokenize", body={"tokens": [5, 6]})
    assert status == 200 and json.loads(body)["text"]


@pytest.mark.parametrize(("path", "body", "status", "message"), [
    ("/v1/completions", b'{"prompt": "x", ', 400, "not valid JSON"),
    ("/v1/completions", {"prompt": 5}, 422, "prompt"),
    ("/v1/completions", {"prompt": "x", "max_tokens": "many"}, 422, "max_tokens"),
    ("/v1/chat/completions", {"messages": "hello"}, 422, "messages"),
    ("/v1/completions", {"prompt": ""}, 400, "the prompt is empty"),
    ("/v1/completions", {"prompt": ["a", "b"]}, 400, "one prompt per request"),
    ("/v1/completions", {"prompt": "x = " * 600, "stream": True}, 400, "exceed context window of 512"),
    ("/v1/completions", {"prompt": "x = " * 600}, 400, "exceed context window of 512"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x = " * 600}], "stream": True}, 400,
     "exceed context window"),
    ("/v1/completions", {"prompt": "x", "logit_bias": {"99999": 5}}, 400, "logit_bias: token ids"),
    ("/v1/completions", {"prompt": "x", "logit_bias": {"-1": 5}}, 400, "logit_bias: token ids"),
    ("/v1/completions", {"prompt": "x", "grammar": "root ::= ("}, 400, "grammar does not parse"),
    ("/v1/completions", {"prompt": "x", "temperature": float("nan")}, 400, "temperature must be a finite number"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}], "logprobs": True,
                              "top_logprobs": 10 ** 9}, 400, "top_logprobs"),
    ("/v1/embeddings", {"input": "x"}, 400, "embedding=True"),
    ("/v1/chat/completions", {"messages": []}, 400, "messages is empty"),
    ("/v1/chat/completions", {}, 400, "messages is empty"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}], "n": 3}, 400, "n is 3: this"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}], "n": 0, "stream": True}, 400,
     "n is 0"),
    ("/v1/completions", {"prompt": "x", "n": 2}, 400, "n is 2"),
    ("/v1/completions", {"prompt": "x", "best_of": 3}, 400, "best_of is 3"),
])
def test_bad_requests_are_4xx_with_a_message(server, path, body, status, message):
    got, _, raw = request(server, path, body=None if isinstance(body, bytes) else body,
                          raw=body if isinstance(body, bytes) else None)
    text = raw.decode()
    assert got == status, text
    assert message in openai_error(raw)["message"]
    assert not [leak for leak in LEAKS if leak in text], text


def test_a_grammar_no_token_can_follow_ends_the_text_and_the_server_lives(server):
    """No token's text holds a NUL: llama.cpp used to draw a token the grammar ruled out, and abort."""
    for stream in (False, True):
        status, _, raw = request(server, "/v1/completions",
                                 body={"prompt": "x = ", "max_tokens": 8, "grammar": 'root ::= "a" "\\x00"',
                                       "stream": stream})
        assert status == 200, raw
        assert b'"finish_reason": "stop"' in raw.replace(b'"finish_reason":"stop"', b'"finish_reason": "stop"')
    assert request(server, "/v1/models")[0] == 200


def test_no_answer_shows_a_path_or_a_traceback(server):
    answers = [request(server, "/nowhere"), request(server, "/v1/completions", body=[1, 2]),
               request(server, "/v1/completions", raw=b"\xff\xfe"), request(server, "/v1/completions", None)]
    for status, _, raw in answers:
        assert 400 <= status < 500
        assert not [leak for leak in LEAKS if leak in raw.decode("utf-8", "replace")], raw
    models = get_json(server, "/v1/models")
    assert str(REPO) not in json.dumps(models)


def test_stats_and_models_during_a_stream_do_not_end_it(server):
    chunks, polls, done = [], [], threading.Event()

    def poll():
        while not done.is_set():
            for path in ("/edgemoe/stats", "/v1/models"):
                polls.append((len(chunks), request(server, path)[0]))
            time.sleep(0.02)

    t = threading.Thread(target=poll)
    t.start()
    try:
        stream_completion(server, {"prompt": "import os\n", "max_tokens": 48, "temperature": 0}, chunks=chunks)
    finally:
        done.set()
        t.join()
    assert len(content_chunks(chunks)) == 48 and chunks[-1]["choices"][0]["finish_reason"] == "length"
    assert {status for _, status in polls} == {200}
    assert any(0 < n < 48 for n, _ in polls)          # some polls came mid-stream


def test_concurrent_streams_all_run_to_max_tokens(server):
    prompts = ["import os\n", "import sys\n", "def main(argv):\n", "class Config:\n", "for i in range("]
    with ThreadPoolExecutor(len(prompts)) as pool:
        streams = list(pool.map(lambda p: stream_completion(server, {"prompt": p, "max_tokens": 24,
                                                                     "temperature": 0,
                                                                     "logit_bias": {"0": -100}}), prompts))
    for chunks in streams:
        assert chunks[-1]["choices"][0]["finish_reason"] == "length"
        assert "".join(content_chunks(chunks))
    assert [len(content_chunks(c)) for c in streams] == [24] * len(prompts)


@pytest.fixture(scope="module")
def small_queue_server(model_copy, tmp_path_factory):
    """No room to wait (--queue_size 0), the key from API_KEY."""
    proc, base = start_server([str(model_copy), "--memory-budget", "50%", "--n-ctx", "512", "--queue_size", "0"],
                              tmp_path_factory.mktemp("server") / "server.log", key="env-key",
                              env={"API_KEY": "env-key"})
    yield base
    stop_server(proc)


def test_api_key_from_the_environment(small_queue_server):
    assert request(small_queue_server, "/v1/models", key=None)[0] == 401
    assert request(small_queue_server, "/v1/models", key="env-key")[0] == 200


def test_a_full_queue_is_503_with_retry_after_and_the_stream_goes_on(small_queue_server):
    chunks, started = [], threading.Event()
    body = {"prompt": "import os\n", "max_tokens": 300, "temperature": 0, "logit_bias": {"0": -100}}

    def long_stream():
        req = urllib.request.Request(f"{small_queue_server}/v1/completions",
                                     data=json.dumps({**body, "stream": True}).encode(),
                                     headers={"Authorization": "Bearer env-key", "Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=120) as r:
            for line in r:
                if line.startswith(b"data: {"):
                    chunks.append(json.loads(line[len(b"data: "):]))
                    started.set()

    t = threading.Thread(target=long_stream)
    t.start()
    assert started.wait(60)
    status, headers, raw = request(small_queue_server, "/v1/completions", "env-key",
                                   {"prompt": "x = ", "max_tokens": 2})
    stats = get_json(small_queue_server, "/edgemoe/stats", "env-key")
    t.join()
    assert status == 503, raw
    assert int(headers["retry-after"]) >= 1
    assert json.loads(raw)["error"]["type"] == "server_busy"
    assert stats["queue"]["running"]
    assert len(content_chunks(chunks)) == 300 and chunks[-1]["choices"][0]["finish_reason"] == "length"


def test_serve_help_lists_every_flag():
    from edgemoe_llamacpp.server import EdgeMoESettings

    proc = subprocess.run(serve_command("--help"), capture_output=True, text=True, timeout=120, check=False)
    assert proc.returncode == 0, proc.stderr
    missing = [name for name in EdgeMoESettings.model_fields if f"--{name}" not in proc.stdout]
    assert not missing
    assert "50% of the expert bytes" in " ".join(proc.stdout.split())


def assert_one_line_error(proc: subprocess.CompletedProcess, needle: str) -> None:
    assert proc.returncode == 2, proc.stderr[-2000:]
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("edgemoe: error: "), proc.stderr[-2000:]
    assert needle in lines[0], lines[0]


@pytest.mark.parametrize(("flags", "needle"), [
    (["--fetch_threads", "0"], "--fetch_threads 0: Input should be greater than or equal to 1"),
    (["--fetch-threads", "0"], "--fetch_threads 0"),
    (["--n_ctx", "-1"], "--n_ctx -1"),
    (["--n_batch", "-3"], "--n_batch -3"),
    (["--port", "99999"], "--port 99999: Input should be less than or equal to 65535"),
    (["--policy", "fifo"], "--policy fifo: Input should be 'nextuse', 'distance', 'lru', 'lfu' or 'hobbit'"),
    (["--predictor", "oracle"], "--predictor oracle"),
    (["--prefetch_depth", "9"], "--prefetch_depth 9"),
    (["--substitute", "1.5"], "--substitute 1.5"),
    (["--queue_size", "-1"], "--queue_size -1"),
    (["--interrupt_requests", "true"], "interrupt_requests would end a running stream"),
    (["--api_key_file", "/nonexistent/key"], "cannot read the API key file"),
    (["--memory-budget", "150%"], "over 100%"),
])
def test_bad_flags_are_one_line_errors_before_the_model_loads(fixture_path, flags, needle):
    proc = subprocess.run(serve_command(str(fixture_path), *flags), capture_output=True, text=True, timeout=120,
                          check=False)
    assert_one_line_error(proc, needle)


@pytest.mark.parametrize(("name", "text", "needle"), [
    ("unknown.yaml", "models:\n  - model: {model}\n    memory_budget: 50%\n    flavour: vanilla\n",
     "models.0.flavour: Extra inputs are not permitted"),
    ("server-key.json", '{{"models": [{{"model": "{model}"}}], "colour": "blue"}}', "colour: Extra inputs"),
    ("bad.yaml", "models: [\n  - model: {model}\n", "not valid YAML"),
    ("bad.json", '{{"models": [', "not valid JSON"),
    ("list.yaml", "- {model}\n", "a config file is a mapping"),
    ("empty.yaml", "host: 127.0.0.1\n", "no models"),
    ("threads.yaml", "models:\n  - model: {model}\n    fetch_threads: 0\n", "models.0.fetch_threads"),
    ("policy.yaml", "models:\n  - model: {model}\n    policy: fifo\n", "models.0.policy"),
])
def test_bad_config_files_are_one_line_errors(fixture_path, tmp_path, name, text, needle):
    path = tmp_path / name
    path.write_text(text.format(model=fixture_path))
    assert_one_line_error(subprocess.run(serve_command("--config_file", str(path)), capture_output=True,
                                         text=True, timeout=120, check=False), needle)


def test_missing_config_file_is_a_one_line_error(tmp_path):
    for argv, env in ((["--config_file", str(tmp_path / "absent.yaml")], {}),
                      ([], {"CONFIG_FILE": str(tmp_path / "absent.yaml")})):     # llama-cpp-python's variable
        assert_one_line_error(subprocess.run(serve_command(*argv), capture_output=True, text=True, timeout=120,
                                             check=False, env={**os.environ, **env}),
                              "no such config file")


def test_config_file_budget_in_bytes_and_every_cache_option(fixture_path, tmp_path):
    from edgemoe_llamacpp.server import CACHE_OPTIONS, load_config_file

    path = tmp_path / "edgemoe.yaml"
    path.write_text(f"api_key: k\nqueue_size: 3\nmodels:\n  - model: {fixture_path}\n    memory_budget: 5000000\n"
                    "    policy: lru\n    predictor: gate\n    prefetch_depth: 2\n    prefetch_threads: 3\n"
                    "    fetch_threads: 5\n    hold_dense: copy\n    substitute: 0.5\n")
    server, (model,) = load_config_file(str(path))
    assert server.api_key == "k" and server.queue_size == 3 and server.interrupt_requests is False
    assert {k: getattr(model, k) for k in CACHE_OPTIONS} == {
        "memory_budget": 5000000, "policy": "lru", "predictor": "gate", "prefetch_depth": 2, "prefetch_threads": 3,
        "fetch_threads": 5, "hold_dense": "copy", "substitute": 0.5}


def test_api_key_file(tmp_path):
    from edgemoe_llamacpp.server import EdgeMoEServerSettings

    (tmp_path / "key").write_text("s3cret\n")
    (tmp_path / "empty").write_text("\n")
    assert EdgeMoEServerSettings(api_key_file=str(tmp_path / "key")).api_key == "s3cret"
    for settings, needle in (({"api_key_file": str(tmp_path / "empty")}, "is empty"),
                             ({"api_key_file": str(tmp_path / "key"), "api_key": "x"}, "not both")):
        with pytest.raises(ValueError, match=needle):
            EdgeMoEServerSettings(**settings)


def test_listening_beyond_loopback_without_a_key_warns_and_a_taken_port_fails_before_loading(fixture_path):
    with socket.socket() as taken:
        taken.bind(("0.0.0.0", 0))
        taken.listen()
        port = taken.getsockname()[1]
        proc = subprocess.run(serve_command(str(fixture_path), "--host", "0.0.0.0", "--port", str(port)),
                              capture_output=True, text=True, timeout=120, check=False, env={
                                  k: v for k, v in os.environ.items() if k != "API_KEY"})
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(lines) == 2, proc.stderr[-2000:]
    assert lines[0].startswith("edgemoe: WARNING: listening on 0.0.0.0, which is not a loopback address, with no "
                               "API key")
    assert lines[1].startswith(f"edgemoe: error: cannot listen on 0.0.0.0:{port}")


def stream_events(base: str, path: str, body: dict, events: list[str], key: str = KEY) -> None:
    """The data of each event of a streamed `path` answer, `[DONE]` included, appended to `events` as they come."""
    req = urllib.request.Request(f"{base}{path}", data=json.dumps({**body, "stream": True}).encode(),
                                 headers={"Authorization": f"Bearer {key}", "Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=60) as r:
        for line in r:
            if line.startswith(b"data: "):
                events.append(line[len(b"data: "):].strip().decode())


def wait_for(condition, what: str, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            pytest.fail(f"waited {timeout} s for {what}")
        time.sleep(0.05)


@pytest.fixture
def own_server(model_copy, tmp_path):
    """A server of this test's own, to stop with a signal: (process, base URL, log path). A context of 4096
    tokens (the fixture's own is 512) keeps a stream running for seconds."""
    log = tmp_path / "server.log"
    proc, base = start_server([str(model_copy), "--memory-budget", "50%", "--api-key", KEY, "--n-ctx", "4096",
                               "--model-alias", "edgemoe"], log)
    yield proc, base, log
    if proc.poll() is None:
        proc.kill()
        proc.wait()


LONG = {"max_tokens": 4000, "temperature": 0, "logit_bias": {"0": -100}}


def test_sigterm_ends_open_streams_with_a_finish_reason_and_done(own_server):
    """A stream running and one waiting for the model: on SIGTERM each ends with a chunk the openai client's
    types accept, finish_reason "length", then [DONE]; and the server exits."""
    from openai.types import Completion
    from openai.types.chat import ChatCompletionChunk

    proc, base, log = own_server
    streams = {"/v1/completions": ({"prompt": "import os\n"}, Completion),
               "/v1/chat/completions": ({"messages": [{"role": "user", "content": "class Parser:"}]},
                                        ChatCompletionChunk)}
    events = {path: [] for path in streams}
    threads = {path: threading.Thread(target=stream_events, args=(base, path, {**body, **LONG}, events[path]))
               for path, (body, _) in streams.items()}
    threads["/v1/completions"].start()
    wait_for(lambda: events["/v1/completions"], "the first chunk")
    threads["/v1/chat/completions"].start()
    wait_for(lambda: get_json(base, "/edgemoe/stats")["queue"]["waiting"] == 1, "the chat to wait for the model")
    proc.send_signal(signal.SIGTERM)
    t0 = time.monotonic()
    for t in threads.values():
        t.join(60)
    proc.wait(timeout=20)
    assert time.monotonic() - t0 < 10, log.read_text()[-2000:]
    for path, (_, kind) in streams.items():
        data = events[path]
        assert data[-1] == "[DONE]", (path, data[-3:])
        chunks = [json.loads(d) for d in data[:-1]]
        assert [c["choices"][0]["finish_reason"] for c in chunks] == [None] * (len(chunks) - 1) + ["length"], path
        assert kind.model_validate(chunks[-1]).choices[0].finish_reason == "length"   # the openai client's types
        assert len(chunks) < LONG["max_tokens"], path                  # cut short: the model had more to say
    assert "Traceback" not in log.read_text()


def test_ctrl_c_stops_the_server_within_2_s_with_exit_code_130(own_server):
    proc, base, log = own_server
    events = []
    t = threading.Thread(target=stream_events, args=(base, "/v1/completions", {"prompt": "import os\n", **LONG},
                                                     events))
    t.start()
    wait_for(lambda: events, "the first chunk")
    proc.send_signal(signal.SIGINT)
    try:
        code = proc.wait(timeout=2)
    except subprocess.TimeoutExpired:
        pytest.fail(f"still running 2 s after SIGINT: {log.read_text()[-2000:]}")
    finally:
        t.join(60)
    output = log.read_text()
    assert code == 130, output[-2000:]
    assert "Traceback" not in output, output[-2000:]
    assert events[-1] == "[DONE]", events[-3:]
