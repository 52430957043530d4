"""ExpertStorage's page calls (readahead and MADV_POPULATE_READ in, MADV_DONTNEED and POSIX_FADV_DONTNEED out),
checked with mincore on a copy of the fixture this test maps itself: no llama.cpp. The storage is handed the
mapping as it would be llama.cpp's."""
import ctypes
import mmap
import os
import shutil
import time

import pytest

from edgemoe_llamacpp import limits, pages
from edgemoe_llamacpp.cache.storage import ExpertStorage
from edgemoe_llamacpp.gguf.layout import ExpertUID, read_layout


def resident(storage: ExpertStorage, uid: ExpertUID) -> int:
    """Bytes of `uid`'s pages in memory, by mincore over its spans."""
    return sum(pages.resident_bytes(storage.address(a), b - a) for a, b in storage.spans[uid])


@pytest.fixture
def storage(fixture_path, tmp_path):
    """An ExpertStorage over a copy of the fixture, mapped here (private, as a file mapping of its own), every expert
    page dropped first."""
    path = tmp_path / "m.gguf"
    shutil.copyfile(fixture_path, path)
    fd = os.open(path, os.O_RDONLY)
    pages.flush(fd)                               # written pages are dirty: written back, they can be dropped
    os.close(fd)
    limits.drop_file_cache(path)
    layout = read_layout(path)
    with open(path, "rb") as f:
        m = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY)
    base = ctypes.addressof(ctypes.c_char.from_buffer(m))
    s = ExpertStorage(layout, threads=2, prefetch_threads=2)
    s.attach([base])
    s.drop_all()
    if s.measured_resident_bytes() > s.pinned_edge_bytes:
        pytest.skip(f"{tmp_path}'s filesystem keeps the file's pages in memory")
    yield s
    s.close()
    del base
    m.close()


def far_apart(storage: ExpertStorage) -> tuple[ExpertUID, ExpertUID]:
    """Two experts of different layers: no page of one is a page of the other."""
    layers = storage.layout.moe_layers
    return ExpertUID(layers[0], 0), ExpertUID(layers[-1], storage.layout.n_expert - 1)


def test_a_fetch_brings_in_that_experts_pages_and_no_other(storage):
    a, b = far_apart(storage)
    assert resident(storage, a) == resident(storage, b) == 0
    got = storage.fetch([a], wait=True)
    assert got == storage.cost[a]
    assert storage.in_memory(a) and resident(storage, a) == storage.cost[a]
    assert resident(storage, b) == 0
    assert storage.measured_resident_bytes() <= storage.cost[a] + storage.pinned_edge_bytes


def test_a_drop_takes_the_pages_out_but_those_a_resident_neighbour_shares(storage):
    layer = storage.layout.moe_layers[0]
    one, two = ExpertUID(layer, 0), ExpertUID(layer, 1)
    storage.fetch([one, two], wait=True)
    assert storage.in_memory(one) and storage.in_memory(two)
    storage.drop(one, resident={two})
    assert storage.in_memory(two), "a page the neighbour shares was dropped"
    kept = sum(b - a for a, b in storage.spans[one]) - sum(b - a for a, b in storage.unshared_spans(one, {two}))
    assert resident(storage, one) <= kept         # only the shared edge pages, if the experts are not whole pages
    storage.drop(two)
    storage.drop(one)
    assert resident(storage, one) == resident(storage, two) == 0


def test_a_later_drop_waits_for_settle_and_then_holds(storage):
    a, b = far_apart(storage)
    storage.fetch([a, b], wait=True)
    storage.drop_later([a])
    storage.settle()
    assert resident(storage, a) == 0 and storage.in_memory(b)


def test_a_queued_fetch_lands_without_waiting_and_a_batch_reads_a_layer_in_one_request(storage):
    a, _ = far_apart(storage)
    storage.fetch([a], wait=False)                # returns once queued: the pages land as the reads finish
    deadline = time.monotonic() + 10
    while not storage.in_memory(a) and time.monotonic() < deadline:
        time.sleep(0.01)
    assert storage.in_memory(a)
    layer = storage.layout.moe_layers[1]
    uids = [ExpertUID(layer, e) for e in range(storage.layout.n_expert)]
    read = storage.submit_many(uids).result(timeout=30)
    assert all(storage.in_memory(u) for u in uids)
    # the layer's experts merged: every page once, however many experts share an edge page
    assert read == sum(b - a for a, b in pages.merge_spans(s for u in uids for s in storage.spans[u]))
