"""A shard of a split model (NAME-00001-of-00003.gguf, as gguf-py and gguf-split write them) is refused in one line
by every command and by Llama, never read as the whole model (edgemoe reads a model in one file)."""
from __future__ import annotations

import subprocess
import sys

import pytest
from synthetic import write_shards

from edgemoe_llamacpp.errors import ShardError
from edgemoe_llamacpp.layout import read_layout

PROMPT = "import os\n\n\ndef"


@pytest.fixture(scope="module")
def shards(fixture_path, tmp_path_factory):
    paths = write_shards(fixture_path, tmp_path_factory.mktemp("shards") / "tiny-moe.gguf", max_tensors=40)
    assert len(paths) >= 3 and paths[0].name.endswith(f"-00001-of-{len(paths):05d}.gguf")
    return paths


def test_read_layout_refuses_every_shard(shards):
    for i, path in enumerate(shards):
        with pytest.raises(ShardError, match=f"shard {i + 1} of {len(shards)} of a split model"):
            read_layout(path)


@pytest.mark.parametrize("argv", [["inspect"], ["inspect", "--json"], ["verify"], ["run", "-p", PROMPT, "-n", "4"],
                                  ["run", "-p", PROMPT, "-n", "4", "--memory-budget", "50%"],
                                  ["run", "-p", PROMPT, "-n", "4", "--stock"], ["ppl", "--tokens", "512"],
                                  ["profile", "--out", "{tmp}/p.npz"], ["convert", "{tmp}/o.gguf", "--uniform", "Q4_K"],
                                  ["bench", "--memory-budget", "50%", "--runs", "1", "--tokens", "4"],
                                  ["serve", "--port", "65000"]])
def test_every_command_refuses_a_shard_in_one_line(shards, tmp_path, argv):
    argv = [a.replace("{tmp}", str(tmp_path)) for a in argv]
    proc = subprocess.run([sys.executable, "-m", "edgemoe_llamacpp", argv[0], str(shards[0]), *argv[1:]],
                          check=False, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, (proc.stdout[-1000:], proc.stderr[-2000:])
    err = proc.stderr.strip().splitlines()
    assert len(err) == 1 and "shard 1 of" in err[0] and "split model" in err[0], proc.stderr[-2000:]
    assert not list(tmp_path.iterdir())


def test_llama_refuses_a_shard(shards):
    from edgemoe_llamacpp import Llama

    for budget in (None, "50%"):
        with pytest.raises(ShardError):
            Llama(str(shards[0]), memory_budget=budget, verbose=False)
