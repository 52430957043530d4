"""The cache's accounting on its own: what the budget counts, the runtime's ready table, and the prefetch
statistics, with no file and no llama.cpp."""
from edgemoe_llamacpp.cache.ledger import Ledger
from edgemoe_llamacpp.gguf.layout import ExpertUID


def test_admitted_and_released_experts_are_what_the_budget_counts_and_the_ready_table_shows():
    ledger = Ledger([1, 3], n_expert=4)
    a, b, low = ExpertUID(1, 2), ExpertUID(3, 0), ExpertUID(3, 1, True)
    ledger.admit(a, 4096)
    ledger.admit(b, 8192)
    ledger.admit(low, 1024)
    assert ledger.resident_bytes == 13312 and ledger.kept_bytes([a, low, ExpertUID(1, 0)]) == 5120
    assert ledger.ready[1, 2] == ledger.ready[3, 0] == 1
    assert ledger.ready[3, 1] == 0                        # a low-bit copy never makes the full expert ready
    ledger.release(a)
    assert ledger.resident_bytes == 9216 and ledger.ready[1, 2] == 0
    assert ledger.stats.layers[1].bytes_evicted == 4096
    ledger.clear()
    assert ledger.resident_bytes == 0 and not ledger.resident and not ledger.ready.any()
    assert ledger.stats.layers[1].bytes_evicted == 4096   # the statistics stay


def test_a_prefetch_counts_from_its_read_is_ready_at_first_use_and_is_wasted_if_evicted_unused():
    ledger = Ledger([0], n_expert=8)
    used, wasted = ExpertUID(0, 1), ExpertUID(0, 2)
    for uid in (used, wasted):
        ledger.admit_prefetch(uid, 4096)
    assert ledger.resident_bytes == 8192                  # the budget covers reads in flight
    assert ledger.ready[0, 1] == 0                        # not ready until it is waited for
    assert ledger.hit(used) is True and ledger.ready[0, 1] == 1
    assert ledger.hit(used) is False                      # its first use only
    ledger.release(wasted)
    st = ledger.stats.layers[0]
    assert (st.hits, st.prefetches, st.prefetch_bytes, st.prefetch_used) == (2, 2, 8192, 1)
    assert (st.prefetch_wasted, st.prefetch_wasted_bytes) == (1, 4096)
    assert ledger.stats.total().prefetch_wasted == 1
