"""A split model (NAME-00001-of-00003.gguf, as gguf-py and gguf-split write them), given by any of its shards, is the
model: its layout spans every shard, Llama and every command run it as they run the single file (the same tokens and
logits as stock llama-cpp-python on the same shards, at no budget and under one), the budget holds over the shards'
mappings, convert writes shards too, and a missing or foreign shard is refused in one line before llama.cpp sees it."""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import stock
from synthetic import write_shards
from test_hook import Measured
from test_server import KEY, request, start_server, stop_server

from edgemoe_llamacpp import Llama
from edgemoe_llamacpp.convert.rewrite import convert, uniform_plan
from edgemoe_llamacpp.convert.verify import verify
from edgemoe_llamacpp.engine.generate import greedy
from edgemoe_llamacpp.errors import ShardError
from edgemoe_llamacpp.gguf.layout import read_layout

PROMPT = "import os\n\n\ndef"
N_TOKENS = 12


@pytest.fixture(scope="module")
def shards(fixture_path, tmp_path_factory):
    paths = write_shards(fixture_path, tmp_path_factory.mktemp("shards") / "tiny-moe.gguf", max_tensors=40)
    assert len(paths) == 3 and paths[0].name == "tiny-moe-00001-of-00003.gguf"
    return paths


@pytest.fixture(scope="module")
def converted(shards, tmp_path_factory):
    """shards[1] converted at Q4_K into shards of at most 5 MB."""
    out = tmp_path_factory.mktemp("converted") / "q4.gguf"
    layout = convert(shards[1], out, uniform_plan(read_layout(shards[1]), "Q4_K"), progress=False,
                     split_max_size=5_000_000)
    return [Path(p) for p in layout.files]


def edgemoe(*argv: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "edgemoe_llamacpp", *argv], check=False, capture_output=True,
                          text=True, timeout=600)


def ok(*argv: str) -> subprocess.CompletedProcess:
    proc = edgemoe(*argv)
    assert proc.returncode == 0, (argv, proc.stdout[-1000:], proc.stderr[-2000:])
    return proc


def test_the_layout_spans_every_shard_given_any_shard(fixture_path, shards):
    whole = read_layout(fixture_path)
    data = fixture_path.read_bytes()
    for path in shards:
        layout = read_layout(path)
        assert layout.path == str(shards[0]) and layout.files == tuple(map(str, shards))
        assert layout.file_sizes == tuple(p.stat().st_size for p in shards) and layout.file_size == sum(layout.file_sizes)
        assert (layout.expert_bytes, layout.dense_bytes, layout.moe_layers) == \
            (whole.expert_bytes, whole.dense_bytes, whole.moe_layers)
        assert {r.file for x in layout.experts for r in x.ranges} == {0, 1, 2}
        files = [p.read_bytes() for p in shards]
        for x, y in zip(layout.experts, whole.experts, strict=True):      # every expert's bytes, from its own file
            for r, s in zip(x.ranges, y.ranges, strict=True):
                assert r.size == s.size and files[r.file][r.offset:r.offset + r.size] == data[s.offset:s.offset + s.size]


class PerFile(Measured):
    """After every layer's fetches: the expert bytes in memory in each of the model's files, by mincore."""

    def measure(self):
        return [self.edgemoe.cache.measured_resident_bytes(i) for i in range(len(self.edgemoe.layout.files))]


@pytest.fixture(scope="module")
def stock_on_shards(shards, tmp_path_factory):
    """Stock llama-cpp-python on shard 1 (repack off: the kernels edgemoe computes with), in a child process."""
    return stock.greedy(shards[0], PROMPT, N_TOKENS, tmp_path_factory.mktemp("stock") / "logits.npy", repack=False)


@pytest.mark.stock
@pytest.mark.repack_off
@pytest.mark.parametrize(("budget", "shard"), [(None, 0), (None, 2), ("50%", 1), ("25%", 0), ("25%", 2)])
def test_tokens_and_logits_are_stocks_on_the_shards_and_the_budget_holds_in_every_file(shards, stock_on_shards,
                                                                                         budget, shard):
    want_tokens, want_logits = stock_on_shards
    llm = PerFile(str(shards[shard]), memory_budget=budget, n_ctx=256, verbose=False)
    try:
        tokens, logits = greedy(llm, PROMPT, N_TOKENS)
        stats = llm.edgemoe_stats()
        final = [llm.edgemoe.cache.measured_resident_bytes(i) for i in range(3)]
    finally:
        llm.close()
    assert tokens == want_tokens
    np.testing.assert_array_equal(logits, want_logits)
    if budget is None:          # every file's experts stay as the load read them
        assert stats["total"]["misses"] == 0 and min(final) > 0
        return
    assert llm.seen and all(len(per) == 3 for per in llm.seen)
    assert stats["total"]["misses"] > 0 and stats["total"]["bytes_evicted"] > 0
    assert max(sum(per) for per in [*llm.seen, final]) <= stats["budget_bytes"]
    assert all(max(per[i] for per in llm.seen) > 0 for i in range(3))      # experts of every file were fetched


# each command on shard 1 and on a later one; `same` names what must equal the single file's
COMMANDS = {
    "inspect": (["inspect", "--json"], "totals"),
    "inspect-text": (["inspect"], None),
    "run": (["run", "-p", PROMPT, "-n", "6", "--json"], "text"),
    "run-budget": (["run", "-p", PROMPT, "-n", "6", "--memory-budget", "50%", "--json"], "text"),
    "run-stock": (["run", "-p", PROMPT, "-n", "6", "--stock", "--json"], "text"),
    "ppl": (["ppl", "--tokens", "512", "--json"], "perplexity"),
    "profile": (["profile", "--tokens", "512", "--out", "{tmp}/p.npz"], "profile"),
}


@pytest.fixture(scope="module")
def single(fixture_path, tmp_path_factory):
    """A command's run on the single file (once per command) and the directory it wrote to."""
    done = {}

    def result(name: str):
        if name not in done:
            tmp = tmp_path_factory.mktemp("single")
            argv, _ = COMMANDS[name]
            done[name] = (ok(argv[0], str(fixture_path), *[a.replace("{tmp}", str(tmp)) for a in argv[1:]]), tmp)
        return done[name]
    return result


@pytest.mark.parametrize("shard", [0, 2])
@pytest.mark.parametrize("name", list(COMMANDS))
def test_every_command_runs_a_shard_as_the_single_file(shards, single, tmp_path, name, shard):
    argv, same = COMMANDS[name]
    proc = ok(argv[0], str(shards[shard]), *[a.replace("{tmp}", str(tmp_path)) for a in argv[1:]])
    want_proc, single_tmp = single(name)
    if same == "totals":
        got, want = json.loads(proc.stdout), json.loads(want_proc.stdout)
        for key in ("expert_bytes", "dense_bytes", "tensor_data_bytes", "n_expert", "moe_layers", "layers"):
            assert got[key] == want[key], key
        assert got["files"] == list(map(str, shards)) and got["file_size"] == sum(p.stat().st_size for p in shards)
    elif same == "text":
        assert json.loads(proc.stdout)["text"] == json.loads(want_proc.stdout)["text"]
    elif same == "perplexity":
        assert json.loads(proc.stdout)["perplexity"] == pytest.approx(json.loads(want_proc.stdout)["perplexity"], rel=1e-6)
    elif same == "profile":
        got, want = np.load(tmp_path / "p.npz"), np.load(single_tmp / "p.npz")
        assert set(got.files) == set(want.files)
        for key in set(got.files) - {"meta"}:
            np.testing.assert_array_equal(got[key], want[key], err_msg=key)
    else:
        assert proc.stdout.startswith(f"{shards[0]}: ") and "split in 3 files" in proc.stdout


@pytest.mark.parametrize("shard", [0, 2])
def test_verify_checks_every_shard_of_a_converted_split(converted, shard):
    report = json.loads(ok("verify", str(converted[min(shard, len(converted) - 1)]), "--json").stdout)
    assert report["checksums"] == "ok" and report["unaligned_expert_ranges"] == 0
    assert report["expert_ranges"] == report["finite_expert_ranges"] == 8 * 16 * 3


def test_convert_reads_shards_and_writes_one_file_or_shards_with_the_single_files_tokens(fixture_path, shards,
                                                                                         converted, tmp_path):
    ok("convert", str(fixture_path), str(tmp_path / "whole.gguf"), "--uniform", "Q4_K")
    ok("convert", str(shards[2]), str(tmp_path / "joined.gguf"), "--uniform", "Q4_K")
    whole, joined = read_layout(tmp_path / "whole.gguf"), read_layout(tmp_path / "joined.gguf")
    split = read_layout(converted[-1])
    assert len(converted) >= 3 and not joined.split and split.files == tuple(map(str, converted))
    sums = [x.edgemoe["checksum.sha256"] for x in (whole, joined, split)]
    assert sums[0] == sums[1] == sums[2]                  # every tensor's bytes the same, in one file or in shards
    assert all(r.offset % 4096 == 0 for x in split.experts for r in x.ranges)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["joined.gguf", "whole.gguf"]    # no temporaries left
    assert_same_greedy([(tmp_path / "whole.gguf", "50%"), (tmp_path / "joined.gguf", "50%"), (converted[0], "50%"),
                        (converted[-1], "50%")])


def assert_same_greedy(models: list) -> None:
    """Every (path, memory budget) gives the first's greedy tokens and logits."""
    runs = []
    for path, budget in models:
        llm = Llama(str(path), memory_budget=budget, n_ctx=256, verbose=False)
        try:
            runs.append(greedy(llm, PROMPT, 8))
        finally:
            llm.close()
    for tokens, logits in runs[1:]:
        assert tokens == runs[0][0]
        np.testing.assert_array_equal(logits, runs[0][1])


def test_convert_split_with_low_bit_copies_runs_and_substitutes(shards, tmp_path):
    layout = convert(shards[0], tmp_path / "low.gguf", uniform_plan(read_layout(shards[0]), "Q4_K"), lowbit="Q2_K",
                     progress=False, split_max_size=4_000_000)
    assert layout.split and {t.low.file for t in layout.expert_tensors} == {0}
    assert len({t.file for t in layout.expert_tensors}) > 2       # the experts themselves spread over the shards
    assert verify(layout.files[-1])["lowbit_ranges"] == 8 * 16 * 3
    llm = Llama(layout.files[1], memory_budget="25%", substitute=0.6, n_ctx=256, verbose=False)
    try:
        tokens, _ = greedy(llm, PROMPT, 8)
        stats = llm.edgemoe_stats()
    finally:
        llm.close()
    assert len(tokens) == 8 and stats["total"]["substituted"] > 0


def test_bench_runs_a_shard(shards, tmp_path):
    ok("bench", str(shards[1]), "--memory-budget", "50%", "--runs", "1", "--tokens", "4",
       "--json", str(tmp_path / "b.json"))
    result = json.loads((tmp_path / "b.json").read_text())
    assert result["file_bytes"] == sum(p.stat().st_size for p in shards)
    entry = result["budgets"][0]
    assert entry["same_text"] and entry["pairs"][0]["stock"]["ok"] and entry["pairs"][0]["edgemoe"]["ok"]


def test_serve_runs_a_shard(fixture_path, shards, tmp_path):
    llm = Llama(str(fixture_path), n_ctx=256, verbose=False)
    try:
        want = llm.create_completion(PROMPT, max_tokens=6, temperature=0.0, repeat_penalty=1.0)["choices"][0]["text"]
    finally:
        llm.close()
    proc, base = start_server([str(shards[2]), "--memory-budget", "50%", "--api-key", KEY, "--n_ctx", "256"],
                              tmp_path / "server.log")
    try:
        status, _, body = request(base, "/v1/completions", KEY, {"prompt": PROMPT, "max_tokens": 6,
                                                                 "temperature": 0.0, "repeat_penalty": 1.0})
    finally:
        stop_server(proc)
    assert status == 200 and json.loads(body)["choices"][0]["text"] == want


def _copy(shards, where: Path) -> list[Path]:
    where.mkdir()
    return [Path(shutil.copy(p, where / p.name)) for p in shards]


def test_a_missing_or_foreign_shard_is_refused_in_one_line(fixture_path, shards, tmp_path):
    missing = _copy(shards, tmp_path / "missing")
    missing[1].unlink()
    for path in (missing[0], missing[2]):
        with pytest.raises(ShardError, match=r"shard 2 \(.*tiny-moe-00002-of-00003.gguf\) is missing"):
            read_layout(path)
        with pytest.raises(ShardError, match="is missing"):
            Llama(str(path), verbose=False)
    for argv in (["inspect"], ["run", "-p", PROMPT, "-n", "2"], ["convert", str(tmp_path / "o.gguf"), "--uniform",
                                                                   "Q4_K"]):
        proc = edgemoe(argv[0], str(missing[2]), *argv[1:])
        err = proc.stderr.strip().splitlines()
        assert proc.returncode == 2 and len(err) == 1 and "is missing" in err[0], proc.stderr[-2000:]
    assert not (tmp_path / "o.gguf").exists()

    foreign = _copy(shards, tmp_path / "foreign")        # shard 2 of another split of the same model, renamed
    other = write_shards(fixture_path, tmp_path / "other.gguf", max_tensors=30)
    shutil.copy(other[1], foreign[1])
    with pytest.raises(ShardError, match="is not shard 2 of the split model tiny-moe-00001-of-00003.gguf"):
        read_layout(foreign[0])

    renamed = tmp_path / "renamed.gguf"                 # llama.cpp could not find the others from this name
    shutil.copy(shards[0], renamed)
    with pytest.raises(ShardError, match="is shard 1 of 3 of a split model but is not named"):
        read_layout(renamed)


@pytest.mark.parametrize("where", ["writing", "renaming"])
def test_an_interrupted_split_conversion_leaves_no_shard_and_no_temporary(shards, tmp_path, monkeypatch, where):
    from edgemoe_llamacpp import files
    from edgemoe_llamacpp.convert import rewrite as convert_module

    calls = []
    target, name = (convert_module, "_write_tensor") if where == "writing" else (files, "_rename")
    real = getattr(target, name)

    def interrupted(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:                 # after one tensor written, or one shard renamed into place
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(target, name, interrupted)
    with pytest.raises(KeyboardInterrupt):
        convert(shards[0], tmp_path / "out.gguf", uniform_plan(read_layout(shards[0]), "Q4_K"), progress=False,
                split_max_size=5_000_000)
    assert len(calls) == 2 and list(tmp_path.iterdir()) == []


def test_a_split_with_per_expert_types_runs_as_the_same_conversion_in_one_file(shards, tmp_path):
    layout = read_layout(shards[0])
    plan = {t.name: ["Q4_K" if e % 2 else "Q8_0" for e in range(t.count)] for t in layout.expert_tensors}
    one = convert(shards[2], tmp_path / "one.gguf", plan, progress=False)
    split = convert(shards[2], tmp_path / "split.gguf", plan, progress=False, split_max_size=6_000_000)
    assert one.mixed and split.mixed and split.split and len({t.file for t in split.expert_tensors}) > 2
    assert split.edgemoe["checksum.sha256"] == one.edgemoe["checksum.sha256"]
    assert_same_greedy([(one.path, None), (split.files[1], None), (split.files[2], "25%")])


KILLED_BETWEEN_RENAMES = """
import os, sys
from edgemoe_llamacpp import files
from edgemoe_llamacpp.convert.rewrite import convert, uniform_plan
from edgemoe_llamacpp.gguf.layout import read_layout
real, calls = files._rename, []
def rename_then_die(tmp, dst):
    real(tmp, dst)
    calls.append(dst)
    if len(calls) == 1:                       # one shard renamed into place: killed before the next
        os._exit(9)
files._rename = rename_then_die
src, out, kind = sys.argv[1:]
convert(src, out, uniform_plan(read_layout(src), kind), progress=False, split_max_size=5_000_000, force=True)
"""


def test_a_conversion_killed_between_renames_leaves_a_set_that_is_refused(shards, converted, tmp_path):
    """Shards are renamed into place one at a time, the last first: a kill after the first rename, over an earlier
    conversion's shards, leaves the new last shard beside the old others. Each conversion stamps one random id in
    every shard (edgemoe.set_id), so the mixed set is refused in one line, by the loader and every command, where it
    would have run with one shard of another conversion."""
    old = _copy(converted, tmp_path / "set")
    assert len(old) > 2 and [Path(p) for p in read_layout(old[0]).files] == old
    # Q4_0: as many shards of 5 MB as Q4_K, other bytes
    proc = subprocess.run([sys.executable, "-c", KILLED_BETWEEN_RENAMES, str(shards[1]),
                           str(tmp_path / "set" / "q4.gguf"), "Q4_0"], capture_output=True, text=True, check=False)
    assert proc.returncode == 9, proc.stderr[-2000:]
    # the killed run's other temporaries stay (hidden) until the next conversion there clears them
    assert sorted(p for p in (tmp_path / "set").iterdir() if not p.name.startswith(".")) == old
    assert old[-1].read_bytes() != converted[-1].read_bytes()    # the last shard is the new conversion's
    assert old[0].read_bytes() == converted[0].read_bytes()      # the first is the old one's
    for shard in old:
        with pytest.raises(ShardError, match=f"is not of the same conversion as {old[0].name}"):
            read_layout(shard)
    proc = edgemoe("inspect", str(old[0]))
    err = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(err) == 1 and "convert again" in err[0], proc.stderr[-2000:]
