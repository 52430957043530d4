"""The CLI loses no file, never crashes and explains every mistake in one line (exit 2)."""
import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from edgemoe_llamacpp.cli import main


def sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture
def model(fixture_path, tmp_path) -> Path:
    dst = tmp_path / "model.gguf"
    shutil.copyfile(fixture_path, dst)
    return dst


def edgemoe(*argv, timeout=300) -> subprocess.CompletedProcess:
    """The CLI in a child process: a signal there is a failed test, not a dead test session."""
    return subprocess.run([sys.executable, "-m", "edgemoe_llamacpp", *map(str, argv)], capture_output=True,
                          text=True, timeout=timeout, check=False)


def one_line_error(proc: subprocess.CompletedProcess, *words: str) -> None:
    assert proc.returncode == 2, (proc.returncode, proc.stderr[-2000:])
    assert "Traceback" not in proc.stderr, proc.stderr[-2000:]
    for w in words:
        assert w in proc.stderr, proc.stderr[-2000:]


def test_profile_out_is_the_model(model):
    before = sha(model)
    one_line_error(edgemoe("profile", model, "--out", model, "--tokens", 600), "input")
    assert sha(model) == before


def test_profile_out_exists_needs_force(model, tmp_path):
    out = tmp_path / "kept.npz"
    out.write_bytes(b"mine")
    one_line_error(edgemoe("profile", model, "--out", out, "--tokens", 600), "--force")
    assert out.read_bytes() == b"mine"


def test_save_plan_over_the_input(model, tmp_path, capsys):
    before = sha(model)
    assert main(["convert", str(model), str(tmp_path / "out.gguf"), "--uniform", "Q4_K",
                 "--save-plan", str(model)]) == 2
    assert "input" in capsys.readouterr().err
    assert sha(model) == before
    assert not (tmp_path / "out.gguf").exists()


def test_save_plan_over_an_existing_file_needs_force(model, tmp_path, capsys):
    plan = tmp_path / "plan.json"
    plan.write_text("mine")
    assert main(["convert", str(model), str(tmp_path / "out.gguf"), "--uniform", "Q4_K",
                 "--save-plan", str(plan)]) == 2
    assert plan.read_text() == "mine"


def test_convert_leaves_no_predictable_temporary(model, tmp_path):
    out = tmp_path / "out.gguf"
    assert main(["convert", str(model), str(out), "--uniform", "Q8_0", "--save-plan", str(tmp_path / "p.json")]) == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.gguf", "out.gguf", "p.json"]
    assert json.loads((tmp_path / "p.json").read_text())
    # outputs get the mode any new file gets (0666 less the umask), not the temporary's 0600
    mask = os.umask(0o022)
    os.umask(mask)
    for name in ("out.gguf", "p.json"):
        assert (tmp_path / name).stat().st_mode & 0o777 == 0o666 & ~mask, name


def test_temporaries_are_unpredictable(tmp_path):
    from edgemoe_llamacpp import files

    a, b = files.temporary_beside(tmp_path / "x.gguf"), files.temporary_beside(tmp_path / "x.gguf")
    assert a != b and a.parent == tmp_path and a.name.startswith(".x.gguf.")


def write_profile(path: Path, moe_layers, ids: np.ndarray, n_expert: int = 16, samples: int = 2,
                  n_embd: int = 8) -> None:
    """A profile file whose metadata is sound, with `ids` as given and the other arrays of the right shapes."""
    n_l = len(moe_layers)
    meta = {"format": ["edgemoe-profile", 2], "moe_layers": list(moe_layers), "n_expert": n_expert}
    with open(path, "wb") as f:
        np.savez(f, meta=json.dumps(meta), ids=ids, weights=np.full(ids.shape, 0.5, np.float32),
                 inputs=np.zeros((n_l, n_expert, samples, n_embd), np.float16),
                 input_weights=np.zeros((n_l, n_expert, samples), np.float32),
                 input_count=np.zeros((n_l, n_expert), np.int32),
                 down_inputs=np.zeros((n_l, n_expert, samples, 2 * n_embd), np.float16))


@pytest.mark.parametrize("argv, words", [
    (["ppl", "{model}", "--tokens", "600", "--batch", "-3"], ["--batch"]),
    (["ppl", "{model}", "--tokens", "600", "--batch", "1000"], ["--batch"]),
    (["ppl", "{model}", "--n-ctx", "1", "--tokens", "600"], ["--n-ctx"]),
    (["ppl", "{model}", "--n-ctx", "0"], ["--n-ctx"]),
    (["ppl", "{model}", "--n-ctx", "100000"], ["window"]),
    (["ppl", "{model}", "--tokens", "0"], ["--tokens"]),
    (["ppl", "{model}", "--tokens", "100"], ["window"]),
    (["ppl", "{model}", "--tokens", "100", "--text", "{tiny}"], ["window"]),
    (["ppl", "{model}", "--tokens", "600", "--n-ctx", "64", "--text", "{tiny}"], ["window"]),
    (["ppl", "{model}", "--tokens", "600", "--text", "{dir}"], ["not a regular text file"]),
    (["ppl", "{model}", "--tokens", "600", "--text", "{binary}"], ["not UTF-8 text (byte 0xff at offset 2)"]),
    (["ppl", "{model}", "--tokens", "600", "--text", "{tiny}", "{empty}"], ["empty.txt: the text file is empty"]),
    (["ppl", "{model}", "--tokens", "600", "--text", "{nul}"], ["not text (a NUL byte at offset 3)"]),
    (["profile", "{model}", "--out", "{dir}/p.npz", "--tokens", "600", "--text", "{binary}"], ["not UTF-8 text"]),
    (["profile", "{model}", "--out", "{dir}/p.npz", "--tokens", "600", "--text", "{empty}"], ["is empty"]),
    (["profile", "{model}", "--out", "{dir}/p.npz", "--tokens", "600", "--text", "{dir}"], ["not a regular"]),
    (["run", "{model}", "-p", "x", "--policy", "fifo"], ["--policy", "invalid choice: 'fifo'"]),
    (["run", "{model}", "-p", "x", "--predictor", "oracle", "--memory-budget", "lots"], ["invalid choice: 'oracle'"]),
    (["bench", "{model}", "--memory-budget", "50%", "--policy", "fifo"], ["invalid choice: 'fifo'"]),
    (["ppl", "{model}", "--tokens", "600", "--fetch-threads", "0"], ["--fetch-threads"]),
    (["run", "{model}", "-p", "x", "-n", "0"], ["-n"]),
    (["run", "{model}", "-p", "x", "-n", "-1"], ["-n"]),
    (["run", "{model}", "-p", "x", "-n", "-100"], ["-n"]),
    (["run", "{model}", "-p", "", "-n", "4"], ["empty"]),
    (["run", "{model}", "-p", "x " * 600, "-n", "4"], ["does not fit"]),
    # llama.cpp pads a context of 16 to 256; the prompt (20 tokens) fits the padding, not the buffer
    (["run", "{model}", "-p", "é" * 10, "--n-ctx", "16"], ["does not fit"]),
    (["run", "{model}", "-p", "é" * 10, "--n-ctx", "16", "--stock"], ["does not fit"]),
    (["run", "{model}", "-p", "x", "-n", "4", "--memory-budget", "9" * 400], ["budget"]),
    (["run", "{model}", "-p", "x", "--n-ctx", "-5"], ["--n-ctx"]),
    (["run", "{model}", "-p", "x", "--temperature", "nan"], ["--temperature"]),
    (["profile", "{model}", "--out", "{dir}/p.npz", "--samples", "-1"], ["--samples"]),
    (["profile", "{model}", "--out", "{dir}/p.npz", "--tokens", "0"], ["--tokens"]),
    (["profile", "{model}", "--out", "/proc/no/p.npz", "--tokens", "600"], ["no such directory"]),
    (["profile", "{model}", "--out", "{dir}", "--tokens", "600"], ["directory"]),
    (["convert", "{model}", "{dir}/o.gguf", "--profile", "{model}", "--expert-bits", "1"], ["2.0625", "IQ2_XXS"]),
    (["convert", "{model}", "{dir}/o.gguf", "--profile", "{model}", "--expert-bits", "2.5", "--no-imatrix"],
     ["2.5625", "IQ2_S", "without importance matrices"]),
    (["convert", "{model}", "{dir}/o.gguf", "--uniform", "IQ2_XXS"], ["IQ2_XXS cannot be made without importance"]),
    (["convert", "{model}", "{dir}/o.gguf", "--uniform", "Q4_K", "--lowbit", "IQ2_XS"],
     ["IQ2_XS cannot be made without importance"]),
    (["convert", "{model}", "{dir}/o.gguf", "--uniform", "Q4_K", "--imatrix", "{garbage}", "--no-imatrix"],
     ["contradict"]),
    (["convert", "{model}", "{dir}/o.gguf", "--uniform", "Q4_K", "--imatrix", "{v1}"], ["format 1", "older edgemoe"]),
    (["convert", "{model}", "{dir}/o.gguf", "--profile", "{model}", "--expert-bits", "nan"], ["--expert-bits"]),
    (["convert", "{model}", "{dir}/o.gguf", "--profile", "{garbage}", "--expert-bits", "4"], ["profile"]),
    (["convert", "{model}", "{dir}/o.gguf", "--profile", "{missing}", "--expert-bits", "4"], ["profile"]),
    (["convert", "{model}", "{dir}/o.gguf", "--profile", "{tiny}", "--expert-bits", "4"], ["zip archive"]),
    (["convert", "{model}", "{dir}/o.gguf", "--profile", "{strings}", "--expert-bits", "4"],
     ["damaged profile: ids is an array of <U1, not of integers"]),
    (["convert", "{model}", "{dir}/o.gguf", "--profile", "{floatids}", "--expert-bits", "4"],
     ["damaged profile: ids is an array of float32"]),
    (["convert", "{model}", "{dir}/o.gguf", "--profile", "{notokens}", "--expert-bits", "4"],
     ["damaged profile: it holds no tokens"]),
    (["convert", "{model}", "{dir}/o.gguf", "--plan", "{listplan}"], ["JSON object"]),
    (["convert", "{model}", "{dir}/o.gguf", "--plan", "{intplan}"], ["type names"]),
    (["convert", "{model}", "{dir}/o.gguf", "--uniform", "Q4_K", "--lowbit", "Q8_0"], ["no smaller"]),
    (["ppl", "{trunc}", "--tokens", "600"], ["truncated"]),
    (["run", "{trunc}", "-p", "x", "-n", "2"], ["truncated"]),
    (["convert", "{model}", "{loop}", "--uniform", "Q4_K"], ["exists"]),
    # a FIFO would block a plain open() for ever
    (["ppl", "{model}", "--tokens", "600", "--text", "{fifo}"], ["not a regular"]),
    (["convert", "{model}", "{dir}/o.gguf", "--plan", "{fifo}"], ["not a regular"]),
    (["convert", "{model}", "{dir}/o.gguf", "--profile", "{fifo}", "--expert-bits", "4"], ["not a regular"]),
    (["serve", "{model}", "--config_file", "{fifo}"], ["not a regular"]),
    (["serve", "{model}", "--api_key_file", "{fifo}"], ["not a regular"]),
])
def test_one_line_errors(model, tmp_path, argv, words):
    from edgemoe_llamacpp.gguf.layout import read_layout

    (tmp_path / "d").mkdir()
    (tmp_path / "tiny.txt").write_text("x = 1\n")
    (tmp_path / "garbage.npz").write_bytes(b"PK\x03\x04" + bytes(200))
    names = [t.name for t in read_layout(model).expert_tensors]
    (tmp_path / "list.json").write_text("[1, 2]")
    (tmp_path / "trunc.gguf").write_bytes(model.read_bytes()[:100_000])
    os.mkfifo(tmp_path / "fifo")
    (tmp_path / "loop.gguf").symlink_to(tmp_path / "loop.gguf")
    (tmp_path / "int.json").write_text(json.dumps({n: 12 for n in names}))
    (tmp_path / "binary.txt").write_bytes(b"x=\xff\xfe" + bytes(range(256)))
    (tmp_path / "empty.txt").write_bytes(b"")
    (tmp_path / "nul.txt").write_bytes(b"abc\0def")
    layers = read_layout(model).moe_layers
    write_profile(tmp_path / "strings.npz", layers, ids=np.full((4, len(layers), 2), "a"))
    write_profile(tmp_path / "floatids.npz", layers, ids=np.full((4, len(layers), 2), 0.5, np.float32))
    write_profile(tmp_path / "notokens.npz", layers, ids=np.zeros((0, len(layers), 2), np.int16))
    with open(tmp_path / "v1.npz", "wb") as f:      # a profile from before down_inputs
        np.savez(f, meta=json.dumps({"format": ["edgemoe-profile", 1], "moe_layers": list(layers), "n_expert": 16}))
    subs = {"model": model, "dir": tmp_path / "d", "tiny": tmp_path / "tiny.txt", "garbage": tmp_path / "garbage.npz",
            "missing": tmp_path / "missing.npz", "listplan": tmp_path / "list.json", "intplan": tmp_path / "int.json",
            "trunc": tmp_path / "trunc.gguf", "fifo": tmp_path / "fifo",
            "loop": tmp_path / "loop.gguf", "binary": tmp_path / "binary.txt", "empty": tmp_path / "empty.txt",
            "nul": tmp_path / "nul.txt", "strings": tmp_path / "strings.npz", "floatids": tmp_path / "floatids.npz",
            "notokens": tmp_path / "notokens.npz", "v1": tmp_path / "v1.npz"}
    before = sha(model)
    one_line_error(edgemoe(*[a.format(**subs) for a in argv]), *words)
    assert sha(model) == before


def test_profile_with_out_of_range_ids(model, tmp_path):
    """A profile whose ids point past the model's experts is refused, not indexed with."""
    prof = tmp_path / "p.npz"
    assert edgemoe("profile", model, "--out", prof, "--tokens", 512, "--samples", 4).returncode == 0
    with np.load(prof) as z:
        arrays = {k: z[k] for k in z.files}
    arrays["ids"][0, 0, 0] = 999
    with open(tmp_path / "bad.npz", "wb") as f:
        np.savez(f, **arrays)
    one_line_error(edgemoe("convert", model, tmp_path / "o.gguf", "--profile", tmp_path / "bad.npz",
                           "--expert-bits", "4"), "expert ids")


def test_run_counts_tokens_and_prefill(model):
    """A one-token prompt and -n 4: 4 tokens, a prefill speed, and 3 decode steps (the prompt is not one)."""
    proc = edgemoe("run", model, "-p", "x", "-n", 4, "--json")
    assert proc.returncode == 0, proc.stderr
    r = json.loads(proc.stdout)
    assert r["prompt_tokens"] == 1
    assert r["tokens"] == (4 if r["finish_reason"] == "length" else r["tokens"])
    assert r["tokens"] <= 4
    assert r["prefill_tok_s"] > 0
    assert r["decode_evals"] == r["tokens"] - 1 if r["finish_reason"] == "length" else r["decode_evals"] == r["tokens"]


def test_broken_pipe_is_quiet(model):
    proc = subprocess.run(f"{sys.executable} -m edgemoe_llamacpp inspect {model} --json | head -c 10", shell=True,
                          capture_output=True, text=True, timeout=120, check=False)
    assert "Traceback" not in proc.stderr and "Broken pipe" not in proc.stderr, proc.stderr


def test_cache_closes_its_file_when_the_budget_is_refused(fixture_path):
    """ExpertCache opens the model and starts its readers before it can size one layer's experts: a refused
    budget closes them again."""
    import os

    from edgemoe_llamacpp.cache.residency import ExpertCache
    from edgemoe_llamacpp.errors import ArgumentError, BudgetError
    from edgemoe_llamacpp.gguf.layout import read_layout

    layout = read_layout(fixture_path)
    before = set(os.listdir("/proc/self/fd"))
    for _ in range(3):
        with pytest.raises(BudgetError, match="cannot hold"):
            ExpertCache(layout, 1000)
    assert set(os.listdir("/proc/self/fd")) <= before
    with pytest.raises(ArgumentError, match="policy"):
        ExpertCache(layout, None, policy="fifo")


@pytest.mark.parametrize(("text", "needle"), [
    ("models: [5]\n", "{config}: models.0: a model is a mapping of settings (model: PATH, ...), not '5'"),
    ("models:\n  - {{1: 2}}\n", "{config}: models.0: a model is a mapping of settings"),
    ("models:\n  - model: {model}\n    memory_budget: lots\n",
     "{config}: models.0: memory budget 'lots' is not a size"),
    ("models:\n  - model: {model}\n    predictor: oracle\n", "{config}: models.0.predictor: Input should be"),
    ("models:\n  - model: {model}\n  - model: {model}\n    memory_budget: 1%\n",
     "{model}: memory budget"),
    ("models:\n  - model: {model}\n    substitute: 0.5\n", "{model} has no low-bit copies of its experts"),
    ("models:\n  - model: {config}\n", "{config}: not a GGUF file"),
])
def test_bad_server_config_files(model, tmp_path, text, needle):
    """Every model of a config file is checked before the server starts (the address is one no machine
    listens on, so a config that passed would fail there, not serve)."""
    pytest.importorskip("uvicorn")
    config = tmp_path / "server.yaml"
    config.write_text("host: 192.0.2.1\n" + text.format(model=model, config=config))
    proc = edgemoe("serve", "--config_file", config, timeout=120)
    one_line_error(proc, needle.format(model=model, config=config))
    assert len(proc.stderr.strip().splitlines()) == 1, proc.stderr


def make_special(path: Path, kind: str) -> Path:
    """A FIFO, a character device (the null device's numbers, made here, never /dev/null itself), a Unix socket,
    or a symlink to a FIFO at `path`."""
    import socket
    import stat

    if kind == "fifo":
        os.mkfifo(path)
    elif kind == "chardev":
        os.mknod(path, stat.S_IFCHR | 0o666, os.makedev(1, 3))
    elif kind == "socket":
        with socket.socket(socket.AF_UNIX) as s:
            s.bind(str(path))
    else:
        make_special(path.with_name(path.name + ".target"), "fifo")
        path.symlink_to(path.name + ".target")
    return path


def node(path: Path) -> tuple[int, int]:
    """What a path names, through symlinks (type and device numbers): unchanged if nothing replaced it."""
    st = os.stat(path)
    return st.st_mode, st.st_rdev


SPECIAL_KINDS = {"fifo": "a FIFO", "chardev": "a character device", "socket": "a socket",
                 "link-to-fifo": "a symlink to a FIFO"}
# every CLI output flag, {out} the special file; the other options make the work as small as it gets
OUTPUT_COMMANDS = {
    "convert": ["convert", "{model}", "{out}", "--uniform", "Q4_K"],
    "convert --save-plan": ["convert", "{model}", "{dir}/o.gguf", "--uniform", "Q4_K", "--save-plan", "{out}"],
    "profile --out": ["profile", "{model}", "--out", "{out}", "--tokens", "512", "--samples", "4"],
    "bench --json": ["bench", "{model}", "--memory-budget", "50%", "--runs", "1", "--tokens", "1", "--no-cgroup",
                     "--json", "{out}"],
}


@pytest.mark.parametrize("force", [True, False], ids=["force", "no-force"])
@pytest.mark.parametrize("kind", SPECIAL_KINDS)
@pytest.mark.parametrize("command", OUTPUT_COMMANDS)
def test_outputs_that_are_not_regular_files_are_refused(model, tmp_path, command, kind, force):
    """A FIFO, device, socket or symlink to one given as an output is refused in one line before any work,
    with or without --force; it stays what it was (--force used to replace it with a regular file)."""
    (tmp_path / "d").mkdir()
    out = make_special(tmp_path / "d" / "out", kind)
    before = node(out)
    argv = [a.format(model=model, out=out, dir=tmp_path / "d") for a in OUTPUT_COMMANDS[command]]
    proc = edgemoe(*argv, *(["--force"] if force else []), timeout=120)
    one_line_error(proc, f"{out} is {SPECIAL_KINDS[kind]}, not a regular file")
    assert len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    assert node(out) == before
    assert sorted(p.name for p in (tmp_path / "d").iterdir()) == sorted(
        ["out", "out.target"] if kind == "link-to-fifo" else ["out"])     # nothing written beside it


@pytest.mark.parametrize("kind", SPECIAL_KINDS)
def test_check_output_refuses_special_files(tmp_path, kind):
    from edgemoe_llamacpp import files
    from edgemoe_llamacpp.errors import EdgeMoEError

    out = make_special(tmp_path / "out", kind)
    for force in (False, True):
        with pytest.raises(EdgeMoEError, match="not a regular file"):
            files.check_output(out, force=force)
    regular = tmp_path / "regular.json"
    regular.write_text("{}")
    (tmp_path / "link.json").symlink_to("regular.json")
    (tmp_path / "dangling.json").symlink_to("gone.json")
    for path in (regular, tmp_path / "link.json", tmp_path / "dangling.json"):
        assert files.check_output(path, force=True) == path


@pytest.mark.parametrize("argv, line", [
    (["run", "{model}", "-p", "x", "--memory-budget", "-5GiB"], "memory budget '-5GiB' is not a size"),
    (["run", "{model}", "-p", "x", "--memory-budget", "-.5GiB", "--json"], "memory budget '-.5GiB' is not a size"),
    (["ppl", "{model}", "--memory-budget", "-5GiB"], "memory budget '-5GiB' is not a size"),
    (["bench", "{model}", "--memory-budget", "-5GiB", "--no-cgroup"], "memory budget '-5GiB' is not a size"),
    (["bench", "{model}", "--memory-budget", "50%", "--allowance", "-5MB"], "memory budget '-5MB' is not a size"),
    (["convert", "{model}", "{dir}/o.gguf", "--profile", "{dir}/p.npz", "--size", "-5MB"],
     "memory budget '-5MB' is not a size"),
])
def test_negative_looking_values_get_one_line(model, tmp_path, argv, line):
    """A value that starts with '-' and a digit reaches the option's own check (argparse took it for an option
    and printed the whole usage); nothing runs."""
    argv = [a.format(model=model, dir=tmp_path) for a in argv]
    proc = edgemoe(*argv, timeout=120)
    one_line_error(proc, line)
    assert proc.stderr.strip().splitlines() == [proc.stderr.strip()] and "usage" not in proc.stderr, proc.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.gguf"]


def test_negative_values_are_attached_to_value_options_only():
    from edgemoe_llamacpp.cli import _attach_negative_values, build_parser

    parser = build_parser()
    argv = ["run", "m", "-p", "-5 apples", "--stock", "-n", "-1", "--memory-budget", "-5GiB", "--json", "--",
            "--seed", "-3x"]
    assert _attach_negative_values(parser, argv) == ["run", "m", "-p=-5 apples", "--stock", "-n=-1",
                                                     "--memory-budget=-5GiB", "--json", "--", "--seed", "-3x"]
    args = parser.parse_args(_attach_negative_values(parser, ["run", "m", "-p", "-5 apples", "-n", "3"]))
    assert args.prompt == "-5 apples" and args.n == 3
    assert _attach_negative_values(parser, ["--help"]) == ["--help"]


def test_the_profile_api_refuses_a_special_output(model, tmp_path):
    """profile() (what `edgemoe profile` and tools/quality_sweep.py call) checks its output too: it replaces a
    profile, as it always did, but never a FIFO, before any work."""
    from edgemoe_llamacpp.convert.record import profile
    from edgemoe_llamacpp.errors import EdgeMoEError

    out = make_special(tmp_path / "p.npz", "fifo")
    with pytest.raises(EdgeMoEError, match="is a FIFO, not a regular file"):
        profile(str(model), str(out), tokens=512, samples=4, progress=False)
    assert out.is_fifo()
