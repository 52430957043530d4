"""The CLI contract, checked with hypothesis over argv: every `edgemoe` subcommand, given generated arguments
(numbers at their edges, paths that are the input, a directory, missing, read-only, existing files, FIFOs, a
character device, a socket),
    - exits 0 or 2, never dies by a signal and never hangs;
    - prints no traceback;
    - leaves every file that existed before unchanged (sha256) unless --force is given and names it;
    - refuses (exit 2) an output that is a FIFO, a device or a socket, or a symlink to one, with or without
      --force, and leaves it what it was;
    - interrupted by SIGINT (five cases in eight get a moment, 5 ms to 2 s after main() starts), stops within
      STOP_WITHIN_S with exit 130 and no traceback, and leaves every file as it was, the outputs --force names
      included (or finishes first).

Each case runs `edgemoe_llamacpp.cli.main(argv)` in a forked child of this process, which never loads a
model itself (llama.cpp's and OpenMP's threads do not survive a fork). `serve` runs everything up to the
point where uvicorn would listen, then returns (the server contract test covers the listening server).

    python tests/cli_contract.py --examples 50                 # per subcommand (the test suite's setting)
    python tests/cli_contract.py --examples 1300 --json out.json
"""
from __future__ import annotations

import argparse
import contextlib
import gc
import hashlib
import json
import os
import select
import shutil
import signal
import socket
import stat
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

FIXTURE = Path(__file__).parent / "fixtures" / "tiny-moe.gguf"
CASE_TIMEOUT_S = 300
# when a case is sent SIGINT, seconds after its main() starts: None for most cases (not interrupted)
SIGINT_SCHEDULE = [None, None, None, 0.005, 0.02, 0.1, 0.5, 2.0]
STOP_WITHIN_S = 3.0         # two runners share two cores in the suite: a little above the 2 s test_interrupt holds
EXIT_INTERRUPTED = 130
SUBCOMMANDS = ("inspect", "verify", "run", "ppl", "profile", "convert", "bench", "serve")

# numbers at the edges of every numeric option, and a few ordinary ones
EDGE_NUMBERS = ["0", "-1", "-3", "nan", "inf", "-inf", "1e400", "9" * 400, "abc", "", "0.5", "-0", "1e-300"]
BUDGETS = ["50%", "25%", "100%", "101%", "0%", "0", "-1", "1", "1KB", "10MB", "1e400", "9" * 400, "nan", "inf",
           "abc", "", "50%%", "none", "1.5GiB", "3 MB"]
# nodes an output may name, made in the sandbox (the character device has /dev/null's numbers; it is never
# /dev/null itself): name -> how to make it
SPECIALS = {"fifo.gguf": "fifo", "fifo.out": "fifo", "chardev.out": "chardev", "socket.out": "socket"}
TYPES = ["Q2_K", "Q3_K", "Q4_K", "Q6_K", "Q8_0", "Q5_0", "F16", "F32", "IQ4_XS", "IQ2_XXS", "q4_k", "BOGUS", "", "2"]


class Sandbox:
    """A directory of the files the cases point at, restored after each case."""

    def __init__(self, root: Path):
        self.root = root
        self.pristine = root / ".pristine"
        work = root / "w"
        work.mkdir(parents=True)
        self.work = work
        shutil.copyfile(FIXTURE, work / "model.gguf")
        (work / "text.txt").write_text((Path(json.__file__)).read_text() * 2)
        (work / "tiny.txt").write_text("x = 1\n")
        (work / "existing.txt").write_text("keep me\n")
        (work / "garbage.gguf").write_bytes(os.urandom(4096))
        (work / "empty.gguf").write_bytes(b"")
        (work / "truncated.gguf").write_bytes(FIXTURE.read_bytes()[:100_000])
        (work / "plan.json").write_text(json.dumps(self._uniform_plan("Q4_K")))
        (work / "list-plan.json").write_text("[1, 2, 3]")
        (work / "int-plan.json").write_text(json.dumps({k: 12 for k in self._uniform_plan("Q4_K")}))
        (work / "config.json").write_text(json.dumps({"models": [{"model": str(work / "model.gguf"),
                                                                  "memory_budget": "50%"}]}))
        (work / "bad-config.json").write_text(json.dumps({"models": [], "no_such_key": 1}))
        (work / "bad.yaml").write_text("models: [\n")
        (work / "dir").mkdir()
        (work / "readonly.txt").write_text("read only\n")
        (work / "readonly.txt").chmod(0o444)
        (work / "link.gguf").symlink_to(work / "model.gguf")
        (work / "dangling.gguf").symlink_to(work / "gone.gguf")
        (work / "loop.gguf").symlink_to(work / "loop.gguf")
        self.specials = [work / name for name in SPECIALS if self._make_special(work / name)]
        (work / "link-fifo.out").symlink_to("fifo.out")
        shutil.copyfile(FIXTURE, work / "spaced é model.gguf")
        (work / "-dash.gguf").write_bytes(b"GGUF")
        (work / ("x" * 250 + ".gguf")).write_bytes(b"GGUF\x03\x00\x00\x00")
        self._make_profile()
        shutil.copytree(work, self.pristine, symlinks=True,
                        ignore=lambda d, names: [n for n in names if n in SPECIALS])
        self.hashes = self._hash_all()
        self.nodes = self._nodes()

    @staticmethod
    def _make_special(path: Path) -> bool:
        """Make the node SPECIALS names at `path`; False where this user may not (a device needs root)."""
        kind = SPECIALS[path.name]
        if kind == "fifo":
            os.mkfifo(path)                         # opening it for reading would block for ever
        elif kind == "socket":
            with socket.socket(socket.AF_UNIX) as s:
                s.bind(str(path))
        else:
            try:
                os.mknod(path, stat.S_IFCHR | 0o666, os.makedev(1, 3))
            except PermissionError:
                return False
        return True

    def _nodes(self) -> dict[str, tuple[int, int, int]]:
        """Each special node's type, device numbers and inode: what a case must leave as it was."""
        out = {}
        for p in self.specials:
            with contextlib.suppress(OSError):
                st = os.lstat(p)
                out[str(p)] = (stat.S_IFMT(st.st_mode), st.st_rdev, st.st_ino)
        return out

    def special_outputs(self) -> list[str]:
        return [str(p) for p in self.specials] + [str(self.work / "link-fifo.out")]

    def _uniform_plan(self, type_name: str) -> dict:
        sys.path.insert(0, str(Path(__file__).parent.parent))
        from edgemoe_llamacpp.gguf.layout import read_layout

        return {t.name: type_name for t in read_layout(FIXTURE).expert_tensors}

    def _make_profile(self) -> None:
        subprocess.run([sys.executable, "-m", "edgemoe_llamacpp", "profile", str(self.work / "model.gguf"),
                        "--out", str(self.work / "profile.npz"), "--tokens", "512", "--samples", "8"],
                       check=True, capture_output=True)
        with open(self.work / "damaged.npz", "wb") as f:
            f.write((self.work / "profile.npz").read_bytes()[:5000])

    def paths(self) -> list[str]:
        w = self.work
        names = ["model.gguf", "text.txt", "tiny.txt", "existing.txt", "garbage.gguf", "empty.gguf",
                 "truncated.gguf", "plan.json", "list-plan.json", "int-plan.json", "profile.npz", "damaged.npz",
                 "dir", "readonly.txt", "missing.gguf", "nodir/out.gguf", "config.json", "bad-config.json",
                 "bad.yaml", "link.gguf", "dangling.gguf", "loop.gguf", "fifo.gguf", "spaced é model.gguf",
                 "-dash.gguf", "x" * 250 + ".gguf"]
        return [str(w / n) for n in names] + [str(w), "", str(w / "dir") + "/"]

    def new_outputs(self) -> list[str]:
        return [str(self.work / n) for n in ("new.gguf", "new.npz", "new.json", "sub/new.gguf")]

    def _hash_all(self) -> dict[str, str]:
        out = {}
        for p in sorted(self.work.rglob("*")):
            if p.is_file() and not p.is_symlink():
                out[str(p)] = hashlib.sha256(p.read_bytes()).hexdigest()
        return out

    def changes(self) -> tuple[list[str], list[str], list[str]]:
        """(pre-existing files whose bytes changed or that are gone, new files, special nodes replaced or gone)."""
        now = self._hash_all()
        changed = [p for p, h in self.hashes.items() if now.get(p) != h]
        nodes = self._nodes()
        return changed, [p for p in now if p not in self.hashes], [p for p in self.nodes if nodes.get(p) != self.nodes[p]]

    def restore(self, changed: list[str], new: list[str], nodes: list[str]) -> None:
        for p in new:
            Path(p).unlink(missing_ok=True)
        for p in nodes:                                     # whatever replaced the node goes; it is made again
            if Path(p).is_dir() and not Path(p).is_symlink():
                shutil.rmtree(p)
            Path(p).unlink(missing_ok=True)
            self._make_special(Path(p))
        self.nodes = self._nodes()
        for p in changed:
            src = self.pristine / Path(p).relative_to(self.work)
            Path(p).unlink(missing_ok=True)
            shutil.copy2(src, p)
        for src in self.pristine.rglob("*"):              # symlinks a case replaced or removed
            dst = self.work / src.relative_to(self.pristine)
            if src.is_symlink() and not (dst.is_symlink() and os.readlink(dst) == os.readlink(src)):
                if dst.is_dir() and not dst.is_symlink():
                    shutil.rmtree(dst)
                dst.unlink(missing_ok=True)
                dst.symlink_to(os.readlink(src))
        for d in sorted((p for p in self.work.rglob("*") if p.is_dir()), reverse=True):
            if not (self.pristine / d.relative_to(self.work)).exists():
                shutil.rmtree(d, ignore_errors=True)


def preload() -> None:
    """Import what the subcommands import, once, before any fork: each child then starts in milliseconds.
    Importing llama_cpp maps its libraries but starts no thread, so forking after it is safe."""
    import importlib

    sys.path.insert(0, str(Path(__file__).parent.parent))
    for name in ("llama_cpp", "uvicorn", "edgemoe_llamacpp.cli", "edgemoe_llamacpp.engine.llama", "edgemoe_bench.bench",
                 "edgemoe_llamacpp.convert.rewrite", "edgemoe_llamacpp.convert.plan", "edgemoe_llamacpp.engine.perplexity",
                 "edgemoe_llamacpp.convert.profile", "edgemoe_llamacpp.engine.generate", "edgemoe_llamacpp.convert.verify",
                 "edgemoe_llamacpp.server", "llama_cpp.server.app"):
        try:
            importlib.import_module(name)
        except ImportError:
            pass                # the server extra may be missing: serve then says so itself


def run_case(argv: list[str], workdir: Path, sigint_after: float | None = None) -> tuple[str, int, str, float | None]:
    """Run main(argv) in a forked child, sent SIGINT `sigint_after` seconds in if given; ('exit', code, output,
    seconds from the signal to the exit or None) or ('signal', signum, ...) or ('hang', seconds, ...)."""
    out_path = workdir / ".case-output"
    ready_r, ready_w = os.pipe()        # the child writes a byte as it calls main(): the SIGINT clock starts there
    pid = os.fork()
    if pid == 0:                                            # child: never returns into this runner
        code = 1
        try:
            os.close(ready_r)
            gc.callbacks.clear()        # hypothesis's instrumentation: a Ctrl-C raised in it would be swallowed
            signal.signal(signal.SIGINT, signal.default_int_handler)   # as Python starts, where CI ignores it too
            fd = os.open(out_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            os.dup2(fd, 1)
            os.dup2(fd, 2)
            nul = os.open(os.devnull, os.O_RDONLY)
            os.dup2(nul, 0)
            os.environ["TQDM_DISABLE"] = "1"
            import uvicorn

            uvicorn.Server.run = lambda self, **kw: print(f"serve: would listen on {self.config.host}:"
                                                          f"{self.config.port}")
            from edgemoe_llamacpp.cli import main

            os.write(ready_w, b"1")
            code = main(argv)
        except SystemExit as e:
            code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
        except BaseException:  # noqa: BLE001 - the contract reports any escape as a traceback
            import traceback

            traceback.print_exc()
            code = 1
        finally:    # nested: an exception raised anywhere above still ends here (unwound into the runner, a child
            try:    # would run its clean-up, e.g. remove the sandbox)
                sys.stdout.flush()
                sys.stderr.flush()
            finally:
                os._exit(code if isinstance(code, int) else 1)
    os.close(ready_w)
    select.select([ready_r], [], [], CASE_TIMEOUT_S)      # the byte, or EOF if the child ended before main()
    os.close(ready_r)
    start = time.monotonic()
    deadline = start + CASE_TIMEOUT_S
    sent = None
    while True:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            break
        now = time.monotonic()
        if sigint_after is not None and sent is None and now >= start + sigint_after:
            os.kill(pid, signal.SIGINT)
            sent = now
        if now > deadline:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
            return "hang", CASE_TIMEOUT_S, out_path.read_text(errors="replace"), None
        select.select([], [], [], 0.01)
    stopped = None if sent is None else time.monotonic() - sent
    output = out_path.read_text(errors="replace")
    out_path.unlink(missing_ok=True)
    if os.WIFSIGNALED(status):
        return "signal", os.WTERMSIG(status), output, stopped
    return "exit", os.WEXITSTATUS(status), output, stopped


def strategies(box: Sandbox) -> dict[str, st.SearchStrategy]:
    """argv strategies per subcommand: (argv, output paths the command may write with --force)."""
    paths = st.sampled_from(box.paths())
    model = st.one_of(st.just(str(box.work / "model.gguf")), paths)
    # one output in four is a FIFO, a device, a socket or a symlink to a FIFO
    regular, special = st.sampled_from(box.paths() + box.new_outputs()), st.sampled_from(box.special_outputs())
    outs = st.integers(0, 3).flatmap(lambda i: special if i == 0 else regular)
    num = st.sampled_from(EDGE_NUMBERS)

    def small(*valid: int):
        return st.one_of(num, st.sampled_from([str(v) for v in valid]))

    def opt(flag: str, value: st.SearchStrategy | None = None) -> st.SearchStrategy:
        """An optional [flag, value] (or [flag]) pair."""
        part = st.just([flag]) if value is None else value.map(lambda v: [flag, v])
        return st.one_of(st.just([]), part)

    def build(fixed: list, *options) -> st.SearchStrategy:
        return st.tuples(st.tuples(*fixed), *options).map(
            lambda t: [*t[0], *[x for o in t[1:] for x in o]])

    budget = st.sampled_from(BUDGETS)
    prompt = st.sampled_from(["import os\n", "", "x" * 4000, "def f():", "\x00", "é" * 10])
    policy = st.sampled_from(["nextuse", "distance", "lru", "lfu", "hobbit", "bogus"])
    predictor = st.sampled_from(["none", "gate", "table", "frequency", "bogus"])
    types = st.sampled_from(TYPES)
    cache = [opt("--policy", policy), opt("--predictor", predictor), opt("--prefetch-depth", small(1, 2, 3, 4)),
             st.one_of(st.just([]), st.just(["--substitute"]), small(0, 1).map(lambda v: ["--substitute", v]))]

    def with_outputs(argv_s: st.SearchStrategy, flags: tuple[str, ...], positional: int | None = None):
        def pick(argv: list[str]) -> tuple[list[str], list[str]]:
            found = [argv[i + 1] for i, a in enumerate(argv[:-1]) if a in flags]
            if positional is not None and len(argv) > positional:
                found.append(argv[positional])
            return argv, found
        return argv_s.map(pick)

    plain = {
        "inspect": build([st.just("inspect"), model], opt("--json")),
        "verify": build([st.just("verify"), model], opt("--json")),
        "run": build([st.just("run"), model, st.just("-p"), prompt], opt("-n", small(1, 4, 600)),
                     opt("--memory-budget", budget), opt("--n-ctx", small(16, 64, 512, 100000)),
                     opt("--temperature", small(0, 1)), opt("--seed", small(0, 7, 2**32)),
                     opt("--repeat-penalty", small(1)), opt("--n-threads", small(1, 2)), opt("--stock"),
                     opt("--json"), opt("--trace"), *cache),
        # work-size values stay small (a valid --tokens 600 --batch 1 --reference scores 1,200 evaluations)
        "ppl": build([st.just("ppl"), model, st.just("--tokens"), small(64, 128)], opt("--n-ctx", small(32, 64, 100000)),
                     opt("--batch", small(1, 32)), opt("--memory-budget", budget), opt("--reference", model),
                     opt("--text", paths), opt("--json"),
                     st.one_of(st.just([]), small(0).map(lambda v: ["--substitute", v]))),
        "serve": build([st.just("serve"), model], opt("--memory_budget", budget), opt("--port", small(8000, 99999)),
                       opt("--n_ctx", small(64, 512)), opt("--n_batch", small(64)), opt("--fetch_threads", small(1, 4)),
                       opt("--api_key", st.just("k")), opt("--host", st.sampled_from(["127.0.0.1", "0.0.0.0"])),
                       opt("--config_file", paths), opt("--api_key_file", paths), opt("--policy", policy)),
    }
    spec = {k: v.map(lambda a: (a, [])) for k, v in plain.items()}
    # the default --tokens (16384) is minutes of work: a valid profile case always names a small one
    spec["profile"] = with_outputs(build(
        [st.just("profile"), model, st.just("--out"), outs, st.just("--tokens"), small(64, 256, 600)],
        opt("--samples", small(1, 4, 10**9)), opt("--n-ctx", small(64, 256)), opt("--text", paths), opt("--force")),
        ("--out",))
    spec["convert"] = with_outputs(build(
        [st.just("convert"), model, outs], opt("--uniform", types), opt("--plan", paths), opt("--profile", paths),
        opt("--expert-bits", small(3, 4)), opt("--size", budget), opt("--save-plan", outs), opt("--lowbit", types),
        opt("--imatrix", paths), opt("--no-imatrix"), opt("--force")), ("--save-plan",), positional=2)
    # a valid bench runs both engines in children: its work-size options are always given, and small
    spec["bench"] = with_outputs(build(
        [st.just("bench"), model, st.just("--memory-budget"), budget, st.just("--runs"), small(1),
         st.just("--tokens"), small(1, 2), st.just("--allowance"), budget], opt("--n-ctx", small(64)),
        opt("--json", outs), opt("--force"), st.just(["--no-cgroup"]), opt("--stock-model", model)), ("--json",))
    return spec


def check(box: Sandbox, command: str, argv: list[str], outputs: list[str], log: list[dict],
          sigint_after: float | None = None) -> None:
    t0 = time.monotonic()
    kind, value, output, stopped = run_case(argv, box.root, sigint_after)
    changed, new, nodes = box.changes()
    box.restore(changed, new, nodes)
    specials = set(box.special_outputs())
    interrupted = kind == "exit" and value == EXIT_INTERRUPTED and stopped is not None
    record = {"argv": argv, "result": kind, "value": value, "seconds": round(time.monotonic() - t0, 2),
              "special_output": any(p in specials for p in outputs), "sigint_after": sigint_after,
              "interrupted": interrupted, "stop_s": None if stopped is None else round(stopped, 3)}
    log.append(record)
    named = {os.path.realpath(p) for p in outputs} if "--force" in argv and not interrupted else set()
    touched = [p for p in changed if os.path.realpath(p) not in named]
    problems = []
    if interrupted:
        if stopped > STOP_WITHIN_S:
            problems.append(f"stopped {stopped:.2f} s after SIGINT")
        if new:
            problems.append(f"interrupted, yet wrote {new}")
    elif kind != "exit" or value not in (0, 2):
        problems.append(f"{kind} {value}")
    elif record["special_output"] and value != 2:
        problems.append(f"exit {value} with an output that is no regular file")
    if nodes:
        problems.append(f"replaced special files {nodes}")
    if "Traceback (most recent call last)" in output:
        problems.append("traceback")
    if touched:
        problems.append(f"changed pre-existing files {touched}")
    if problems:
        record["output"] = output[-3000:]
        raise AssertionError(f"edgemoe {' '.join(map(repr, argv))}: {', '.join(problems)}\n{output[-3000:]}")


def _case(box: Sandbox, command: str, spec: st.SearchStrategy, log: list[dict], examples: int, seed):
    """The hypothesis test of one subcommand."""
    @settings(max_examples=examples, deadline=None, database=None, derandomize=seed is not None,
              suppress_health_check=list(HealthCheck), print_blob=True)
    @given(argv_outputs=spec, sigint_after=st.sampled_from(SIGINT_SCHEDULE))
    def case(argv_outputs, sigint_after):
        argv, outputs = argv_outputs
        check(box, command, argv, outputs, log, sigint_after)
    return case


def run_contract(examples: int, commands=SUBCOMMANDS, root: Path | None = None, seed: int | None = None) -> dict:
    """Run `examples` cases per subcommand; raises AssertionError (after hypothesis shrinks) on a breach."""
    tmp = Path(tempfile.mkdtemp(prefix="edgemoe-cli-contract-", dir=root))
    log: list[dict] = []
    preload()
    try:
        box = Sandbox(tmp)
        specs = strategies(box)
        for command in commands:
            case = _case(box, command, specs[command], log, examples, seed)
            start = len(log)
            case()
            took = sum(r["seconds"] for r in log[start:])
            print(f"{command}: {len(log) - start} cases, {took:.0f} s", file=sys.stderr, flush=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    by = {}
    for r in log:
        by.setdefault(r["argv"][0], {"cases": 0, "exit0": 0, "exit2": 0, "special_outputs": 0,
                                     "special_outputs_forced": 0, "sigint_sent": 0, "interrupted": 0,
                                     "max_stop_s": 0.0})
        by[r["argv"][0]]["cases"] += 1
        by[r["argv"][0]]["sigint_sent"] += r["stop_s"] is not None
        by[r["argv"][0]]["interrupted"] += r["interrupted"]
        by[r["argv"][0]]["max_stop_s"] = max(by[r["argv"][0]]["max_stop_s"], r["stop_s"] or 0.0)
        by[r["argv"][0]]["special_outputs"] += r["special_output"]
        by[r["argv"][0]]["special_outputs_forced"] += r["special_output"] and "--force" in r["argv"]
        if r["result"] == "exit" and r["value"] in (0, 2):
            by[r["argv"][0]][f"exit{r['value']}"] += 1
    return {"cases": len(log), "by_command": by, "log": log}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--examples", type=int, default=50, help="cases per subcommand (default 50)")
    ap.add_argument("--commands", nargs="+", default=list(SUBCOMMANDS), choices=SUBCOMMANDS)
    ap.add_argument("--json", help="write the summary and every case here")
    args = ap.parse_args()
    result = run_contract(args.examples, args.commands)
    print(json.dumps({k: v for k, v in result.items() if k != "log"}, indent=1))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
