"""The benchmark's pure parts: Belady's floor on a trace worked out by hand, the KV cache size."""
from edgemoe_llamacpp.bench import belady, kv_cache_bytes


def test_belady_by_hand():
    # one layer, one expert per step: a b c a b c with room for two
    trace = [(0, [[e]]) for e in "abcabc"]
    # a, b miss; c misses and evicts b (next used at 4, after a at 3); a hits; b misses and evicts a (never
    # used again); c hits -> 4 misses, all in one-token steps. LRU would miss all 6.
    assert belady(trace, capacity=2) == (4, 4)


def test_belady_prompt_steps_are_not_decode():
    trace = [(0, [["a"], ["b"]]), (0, [["a"]]), (0, [["c"]]), (0, [["b"]])]
    # the prompt step (two tokens) loads a and b; a hits; c evicts a (never again); b hits
    assert belady(trace, capacity=2) == (3, 1)


def test_kv_cache_bytes_of_fixture(fixture_path):
    # F16 K and V: 2 x 8 layers x 512 positions x 4 kv heads x (64 + 64) dims = 4 MiB
    assert kv_cache_bytes(str(fixture_path), 512) == 2 * 8 * 512 * 4 * (64 + 64)
