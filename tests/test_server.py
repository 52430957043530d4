"""`edgemoe serve`: the real server on a free loopback port, the real openai client."""
import json
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

openai = pytest.importorskip("openai")
sys.path.insert(0, str(Path(__file__).parent.parent / "tools"))
from server_load import run_load, stats

KEY = "test-key-123"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(fixture_path, tmp_path_factory):
    port = free_port()
    log = tmp_path_factory.mktemp("server") / "server.log"     # a file: a full pipe would stall the server
    with open(log, "w") as out:
        proc = subprocess.Popen([sys.executable, "-m", "edgemoe_llamacpp", "serve", str(fixture_path),
                                 "--memory-budget", "50%", "--api-key", KEY, "--port", str(port),
                                 "--n-ctx", "512", "--model-alias", "edgemoe"], stdout=out, stderr=out)
    base = f"http://127.0.0.1:{port}"
    deadline = time.time() + 120
    while time.time() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"server exited: {log.read_text()[-2000:]}")
        try:
            stats(base, KEY)
            break
        except (urllib.error.URLError, ConnectionError):
            time.sleep(0.3)
    else:
        proc.kill()
        pytest.fail(f"server did not start: {log.read_text()[-2000:]}")
    yield base
    proc.terminate()
    proc.wait(timeout=30)


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
    for key in (None, "wrong"):
        with pytest.raises(urllib.error.HTTPError) as err:
            stats(server, key)
        assert err.value.code == 401


def test_stats_show_misses_within_budget(server):
    client(server).completions.create(model="edgemoe", prompt="def main(argv):\n", max_tokens=16)
    s = stats(server, KEY)["stats"]
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
