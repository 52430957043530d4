"""edgemoe_llamacpp.Llama as a Python API: arguments llama.cpp would crash on are refused with a clear error,
a closed Llama says so, one Llama is safe to share between threads, and pickling keeps the cache options.

What used to kill the process (an abort in llama.cpp, a segfault) runs in a child process, so that a
regression fails its test instead of taking the test session down."""
import pickle
import shutil
import subprocess
import sys
import textwrap
import threading

import llama_cpp
import pytest

from edgemoe_llamacpp.engine.llama import Llama
from edgemoe_llamacpp.errors import (
    ArgumentError,
    BudgetError,
    ContextLengthError,
    EdgeMoEError,
    LlamaBusyError,
)

PROMPT = "import os\n"


@pytest.fixture(scope="module")
def model_path(fixture_path, tmp_path_factory):
    """A copy of the fixture: another process mapping the shared file would pin its pages, and a budget
    below them is refused."""
    path = tmp_path_factory.mktemp("model") / "tiny-moe.gguf"
    shutil.copyfile(fixture_path, path)
    return path


@pytest.fixture(scope="module")
def llm(model_path):
    model = Llama(str(model_path), memory_budget="50%", n_ctx=256, verbose=False)
    yield model
    model.close()


def run_child(path, body: str) -> subprocess.CompletedProcess:
    """Run `body` in a fresh interpreter with `llm` a loaded Llama; it prints what the test checks."""
    code = ("from edgemoe_llamacpp.engine.llama import Llama\n"
            f"llm = Llama({str(path)!r}, memory_budget='50%', n_ctx=256, verbose=False)\n"
            + textwrap.dedent(body))
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, check=False)


def assert_child_ok(proc: subprocess.CompletedProcess, *lines: str) -> None:
    assert proc.returncode == 0, f"exit {proc.returncode}: {proc.stderr[-1500:]}"
    out = proc.stdout.splitlines()
    for line in lines:
        assert line in out, (line, proc.stdout[-1500:])


@pytest.mark.parametrize("tokens", [[99999999], [-1], [4096]])
def test_detokenize_outside_the_vocabulary_is_an_error_not_an_abort(model_path, tokens):
    proc = run_child(model_path, f"""
        from edgemoe_llamacpp.errors import ArgumentError
        try:
            llm.detokenize({tokens!r})
        except ArgumentError as e:
            print("refused:", e)
        print(llm.detokenize([5, 6]) != b"")
    """)
    assert_child_ok(proc, "True")
    assert "refused: tokens: token ids are integers from 0 to 4095" in proc.stdout


def test_grammar_that_does_not_parse_is_an_error_not_a_segfault(model_path):
    proc = run_child(model_path, """
        import llama_cpp
        from edgemoe_llamacpp.errors import ArgumentError
        for text in ["root ::= (", "root ::= " + "(" * 100000 + '"a"' + ")" * 100000, "other ::= [a-z]"]:
            try:
                llm.create_completion("x = ", max_tokens=2, grammar=llama_cpp.LlamaGrammar.from_string(text))
                print("ran", text[:20])
            except ArgumentError as e:
                print("refused:", str(e)[:40])
        out = llm.create_completion("x = ", max_tokens=3, temperature=0,
                                    grammar=llama_cpp.LlamaGrammar.from_string('root ::= [0-9]+'))
        print("digits", out["choices"][0]["text"].isdigit())
    """)
    assert_child_ok(proc, "digits True")
    assert proc.stdout.count("refused:") == 3, proc.stdout


def test_closed_llama_raises_a_clear_error_from_every_method(model_path):
    proc = run_child(model_path, """
        from edgemoe_llamacpp.errors import LlamaClosedError
        stream = llm.create_completion("import os\\n", max_tokens=8, stream=True)
        next(stream)
        llm.close()
        llm.close()                    # twice is fine
        calls = {"tokenize": lambda: llm.tokenize(b"x"), "detokenize": lambda: llm.detokenize([5]),
                 "completion": lambda: llm("x", max_tokens=2), "chat": lambda: llm.create_chat_completion(
                     [{"role": "user", "content": "x"}]), "eval": lambda: llm.eval([5]), "reset": llm.reset,
                 "n_vocab": llm.n_vocab, "stats": llm.edgemoe_stats, "stream": lambda: next(stream),
                 "generate": lambda: llm.generate([5]), "pickle": lambda: __import__("pickle").dumps(llm)}
        for name, call in calls.items():
            try:
                call()
                print(name, "ran")
            except LlamaClosedError as e:
                print(name, e)
    """)
    assert_child_ok(proc, "tokenize this Llama is closed", "stream this Llama is closed",
                    "stats this Llama is closed", "pickle this Llama is closed")
    assert proc.stdout.count("this Llama is closed") == 11, proc.stdout


def test_one_llama_shared_by_threads(model_path):
    """Two threads generating, tokenizing and detokenizing on one Llama: calls are serialised."""
    proc = run_child(model_path, """
        import threading
        results, errors = [], []

        def work(i):
            try:
                for _ in range(4):
                    out = llm.create_completion("import os\\n", max_tokens=6, temperature=0)
                    results.append(out["choices"][0]["text"])
                    llm.detokenize(llm.tokenize(b"def main():"))
            except BaseException as e:
                errors.append(repr(e))

        threads = [threading.Thread(target=work, args=(i,)) for i in range(3)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        print("errors", errors)
        print("same", len(results), len(set(results)))
    """)
    assert_child_ok(proc, "errors []", "same 12 1")


def test_a_stream_is_stepped_from_other_threads_and_refuses_a_second_generation(llm):
    stream = llm.create_completion(PROMPT, max_tokens=12, temperature=0, stream=True)
    chunks = [next(stream)]
    errors = []

    def other_thread_generation():
        try:
            llm.create_completion("x = ", max_tokens=2)
        except LlamaBusyError as e:
            errors.append(str(e))

    def other_thread_steps():        # the server takes a stream's steps from its threadpool
        chunks.extend(stream)

    t = threading.Thread(target=other_thread_generation)
    t.start()
    t.join()
    assert errors and "streaming a completion for another thread" in errors[0]
    llm.detokenize([5, 6])           # a call that does not generate runs between steps
    t = threading.Thread(target=other_thread_steps)
    t.start()
    t.join()
    assert chunks[-1]["choices"][0]["finish_reason"] == "length"
    assert len(chunks) == 13
    assert llm.create_completion("x = ", max_tokens=2)["choices"][0]["finish_reason"]   # the stream ended


def test_a_new_generation_in_the_same_thread_ends_its_open_stream(llm):
    stream = llm.create_completion(PROMPT, max_tokens=12, stream=True)
    next(stream)
    assert llm.create_completion("x = ", max_tokens=2)["usage"]["completion_tokens"] == 2
    with pytest.raises(LlamaBusyError, match="ended by a later generation"):
        next(stream)


def test_stats_do_not_wait_for_a_call_in_progress(llm):
    started, release = threading.Event(), threading.Event()

    def hold():
        with llm._edgemoe_call():
            started.set()
            release.wait(30)

    t = threading.Thread(target=hold)
    t.start()
    started.wait(30)
    try:
        stats = llm.edgemoe_stats()      # would block on the lock
    finally:
        release.set()
        t.join()
    assert stats["budget_bytes"] > 0 and "total" in stats


@pytest.mark.parametrize(("kwargs", "error", "match"), [
    ({"prompt": ""}, ArgumentError, "prompt is empty"),
    ({"prompt": []}, ArgumentError, "prompt is empty"),
    ({"prompt": [5, 9999]}, ArgumentError, "prompt: token ids are integers"),
    ({"logit_bias": {99999: 5.0}}, ArgumentError, "logit_bias: token ids"),
    ({"logit_bias": {"-1": 5.0}}, ArgumentError, "logit_bias: token ids"),
    ({"logit_bias": {"5": float("nan")}}, ArgumentError, "finite"),
    ({"temperature": float("nan")}, ArgumentError, "temperature must be a finite number"),
    ({"top_p": float("inf")}, ArgumentError, "top_p must be a finite number"),
    ({"mirostat_mode": 7}, ArgumentError, "mirostat_mode"),
    ({"seed": 1.5}, ArgumentError, "seed must be an integer"),
    ({"max_tokens": 2.5}, ArgumentError, "max_tokens"),
    ({"logprobs": 3}, ArgumentError, "logits_all=True"),
    ({"prompt": "\ud800"}, ArgumentError, "lone surrogate"),
    ({"prompt": "x = " * 300}, ContextLengthError, r"Requested tokens \(601\) exceed context window of 256"),
    ({"prompt": "x = " * 300, "stream": True}, ContextLengthError, "exceed context window"),
])
def test_completion_arguments_are_checked_before_anything_runs(llm, kwargs, error, match):
    with pytest.raises(error, match=match):
        llm.create_completion(**{"prompt": "x = ", "max_tokens": 2, **kwargs})


def test_errors_are_value_errors_like_llama_cpp_pythons(llm):
    with pytest.raises(ValueError, match="exceed context window"):      # what llama-cpp-python users catch
        llm("x = " * 300, max_tokens=2, stream=True)


def test_streamed_chat_over_the_context_fails_when_created(llm):
    with pytest.raises(ContextLengthError):
        llm.create_chat_completion([{"role": "user", "content": "x = " * 300}], max_tokens=2, stream=True)


def test_none_sampling_values_mean_the_defaults(llm):
    out = llm.create_completion(PROMPT, max_tokens=3, temperature=0, presence_penalty=None, frequency_penalty=None)
    assert out["usage"]["completion_tokens"] == 3


def test_eval_sample_and_generate_checks(llm):
    llm.reset()
    with pytest.raises(ArgumentError, match="eval"):
        llm.sample()
    with pytest.raises(ArgumentError, match="token ids"):
        llm.eval([5, -3])
    with pytest.raises(ContextLengthError):
        llm.eval([5] * 257)
    with pytest.raises(ArgumentError, match="token ids"):
        llm.generate([70000])
    with pytest.raises(ArgumentError, match="tokenize\\(\\) takes UTF-8 bytes"):
        llm.tokenize("text")
    llm.eval(llm.tokenize(PROMPT.encode()))
    with pytest.raises(ArgumentError, match="position with logits"):
        llm.sample(idx=0)
    assert 0 <= llm.sample(temp=0.0) < llm.n_vocab()


def test_embeddings_need_an_embedding_model(llm):
    with pytest.raises(ArgumentError, match="embedding=True"):
        llm.create_embedding("text")


@pytest.mark.parametrize(("kwargs", "error", "match"), [
    ({"memory_budget": float("nan")}, BudgetError, "not a finite size"),
    ({"memory_budget": float("inf")}, BudgetError, "not a finite size"),
    ({"fetch_threads": 0}, ArgumentError, "fetch_threads must be an integer from 1"),
    ({"prefetch_threads": 0}, ArgumentError, "prefetch_threads must be an integer from 1"),
    ({"prefetch_depth": 0}, ArgumentError, "prefetch_depth must be an integer from 1 to 3"),
    ({"prefetch_depth": 4}, ArgumentError, "prefetch_depth must be an integer from 1 to 3"),
    ({"policy": "fifo"}, ArgumentError, "unknown cache policy"),
    ({"predictor": "oracle"}, ArgumentError, "unknown predictor"),
    ({"substitute": float("nan")}, ArgumentError, "substitute is a share"),
])
def test_constructor_options_are_checked_before_llama_cpp(model_path, monkeypatch, kwargs, error, match):
    def not_reached(*args, **kw):
        raise AssertionError("llama.cpp was asked to load the model")

    monkeypatch.setattr(llama_cpp.Llama, "__init__", not_reached)
    with pytest.raises(error, match=match) as info:
        Llama(str(model_path), verbose=False, **kwargs)
    assert isinstance(info.value, EdgeMoEError)


def test_pickle_keeps_the_cache_options(model_path):
    llm = Llama(str(model_path), memory_budget="25%", policy="lru", fetch_threads=3, n_ctx=128, verbose=False)
    state = llm.__getstate__()
    assert {k: state[k] for k in ("memory_budget", "policy", "fetch_threads", "predictor", "prefetch_depth",
                                  "prefetch_threads", "substitute", "record_routing")} == {
        "memory_budget": "25%", "policy": "lru", "fetch_threads": 3, "predictor": "auto", "prefetch_depth": 1,
        "prefetch_threads": 2, "substitute": None, "record_routing": False}
    copy = pickle.loads(pickle.dumps(llm))
    try:
        assert copy.edgemoe_stats()["budget_bytes"] == llm.edgemoe_stats()["budget_bytes"]
        assert copy.edgemoe_stats()["policy"] == "lru"
        assert copy.n_ctx() == llm.n_ctx()
    finally:
        copy.close()
        llm.close()


def test_a_grammar_that_admits_nothing_ends_the_text_instead_of_aborting(model_path):
    """No token's text can hold a NUL: llama.cpp drew a token its grammar had ruled out and aborted."""
    proc = run_child(model_path, r"""
        import llama_cpp
        for text, temperature in (('root ::= "\\x00"', 0.8), ('root ::= "a" "\\x00"', 0.8), ('root ::= "a" "\\x00"', 0.0),
                                  ('root ::= "ab"', 0.8)):
            out = llm.create_completion("x = ", max_tokens=6, temperature=temperature,
                                        grammar=llama_cpp.LlamaGrammar.from_string(text))
            print(repr(out["choices"][0]["text"]), out["choices"][0]["finish_reason"])
    """)
    assert_child_ok(proc)
    assert proc.stdout.splitlines() == ["'' stop", "'a' stop", "'a' stop", "'ab' stop"], proc.stdout


def test_openai_v1_chat_stream_is_the_guarded_stream(llm):
    pytest.importorskip("openai")
    stream = llm.create_chat_completion_openai_v1([{"role": "user", "content": "def f("}], max_tokens=4, stream=True)
    next(stream)
    errors = []

    def other():
        try:
            llm.create_completion("x = ", max_tokens=2)
        except LlamaBusyError as e:
            errors.append(e)

    t = threading.Thread(target=other)
    t.start()
    t.join()
    assert errors
    assert list(stream)[-1].choices[0].finish_reason == "length"
