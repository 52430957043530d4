"""Each eviction policy on small traces whose victims are worked out by hand (pure Python, no llama.cpp)."""
from __future__ import annotations

from collections import defaultdict

import numpy as np

from edgemoe_bench.replay import Foresight, ReplayCache, synthetic_layout
from edgemoe_llamacpp.cache.hobbit import Hobbit
from edgemoe_llamacpp.cache.policies import LFU, LRU, Distance, NextUse
from edgemoe_llamacpp.gguf.layout import ExpertUID

ONE = defaultdict(lambda: 1)        # every expert costs one unit


def serve(policy, steps, capacity):
    """Drive `policy` as the cache does, every expert costing 1: steps are (layer, experts) with layer == its
    position, or "new" for a new sequence. Returns the victims (layer, expert) of each step."""
    resident, out = set(), []
    for step in steps:
        if step == "new":
            policy.new_sequence()
            continue
        layer, experts = step
        policy.begin(layer)
        chosen = [ExpertUID(layer, e) for e in experts]
        for uid in chosen:
            policy.use(uid)
        missing = [u for u in chosen if u not in resident]
        over = len(resident) + len(missing) - capacity
        victims = policy.victims(over, ONE, set(chosen), ()) if over > 0 else []
        for uid in victims:
            policy.remove(uid)
            resident.discard(uid)
        for uid in missing:
            policy.add(uid)
            resident.add(uid)
        out.append([(v.layer, v.expert) for v in victims])
    return out


def test_lru_evicts_the_least_recently_touched():
    # resident 0 1 | 0 1 2 | a hit moves 0 behind 2 | 3 evicts 1 | 2 is touched, 4 evicts 0
    got = serve(LRU({0: 0}), [(0, [0, 1]), (0, [2]), (0, [0]), (0, [3]), (0, [4, 2])], capacity=3)
    assert got == [[], [], [], [(0, 1)], [(0, 0)]]


def test_lfu_evicts_the_least_used_and_keeps_counts_of_evicted_experts():
    # counts 0:2 1:1 -> 2 evicts 1; 1 comes back with count 2, so 2 (count 1) goes; then 0 and 1 tie at 2 and
    # 0, touched longer ago, goes first
    got = serve(LFU({0: 0}), [(0, [0]), (0, [0]), (0, [1]), (0, [2]), (0, [1]), (0, [3])], capacity=2)
    assert got == [[], [], [], [(0, 1)], [(0, 2)], [(0, 0)]]


def test_distance_weighs_uses_against_how_soon_the_layer_runs_again():
    """4 layers, decay 0.5: a use weighs 2 in token 1, 4 in token 2, 8 in token 3; score (w + uses) / steps.
    Token 3, layer 0 (w 8): (0,0) used twice scores (8 + 6) / 4 = 3.5 in its own layer, a whole cycle away;
    (3,0) used once, in token 1, scores (8 + 2) / 3 = 3.33 and goes, though its layer is nearer. At layer 1,
    (1,0) scores (8 + 6) / 4 = 3.5, the least: (0,0) 4.67, (0,1) 5.33, (2,0) 14, (3,1) 6."""
    steps = [(0, [0]), (1, [0]), (2, [0]), (3, [0]),
             (0, [0]), (1, [0]), (2, [0]), (3, [1]),
             (0, [1]), (1, [1])]
    got = serve(Distance({i: i for i in range(4)}, use_decay=0.5), steps, capacity=5)
    assert got == [[]] * 8 + [[(3, 0)], [(1, 0)]]


def test_distance_breaks_ties_by_recency():
    """Two experts of layer 0 with equal uses: the one touched first in that step goes first."""
    got = serve(Distance({0: 0, 1: 1}), [(0, [0, 1]), (1, [0]), (0, [0, 1]), (1, [1]), (0, [2])], capacity=4)
    assert got == [[], [], [], [], [(0, 0)]]


def test_hobbit_scores_recency_frequency_and_nearness_and_forgets_at_a_new_sequence():
    """2 layers, keep priority = last use / step + count / highest count + (1 - steps to the layer / 2).
    Step 5 (layer 0): (0,0) 3/5 + 2/2 + 0 = 1.6, (1,0) 2/5 + 1/2 + 0.5 = 1.4, (1,1) 4/5 + 1/2 + 0.5 = 1.8.
    Step 6 (layer 1): (0,0) 3/6 + 1 + 0.5 = 2.0, (0,1) 5/6 + 1/2 + 0.5 = 1.83, (1,1) 4/6 + 1/2 + 0 = 1.17.
    Step 7, new sequence: only nearness is left, (0,0) and (0,1) tie at 0 and (0,0) is older."""
    steps = [(0, [0]), (1, [0]), (0, [0]), (1, [1]), (0, [1]), (1, [2]), "new", (0, [2])]
    got = serve(Hobbit({0: 0, 1: 1}), steps, capacity=3)
    assert got == [[], [], [], [], [(1, 0)], [(1, 1)], [(0, 0)]]


def test_hobbit_order_within_a_layer_changes_with_the_step_alone():
    """A = (0,0) used at steps 1-3 (last use 3, count 3), B = (0,1) once at step 10 (last use 10, count 1).
    Step 10: A 3/10 + 3/3 = 1.30 < B 10/10 + 1/3 = 1.33. Step 11, neither touched: A 3/11 + 1 = 1.27 >
    B 10/11 + 1/3 = 1.24. Neither dominates the other, so both stay on the layer's front."""
    h = Hobbit({0: 0, 1: 1})
    a, b = ExpertUID(0, 0), ExpertUID(0, 1)
    for step in range(1, 11):
        h.begin(0)                                    # layer 0 at every step: nearness is the same for both
        if step <= 3:
            h.use(a)
        if step == 1:
            h.add(a)
        if step == 10:
            h.use(b)
            h.add(b)
    assert h.victims(1, ONE, set(), ()) == [a]
    h.begin(0)
    assert h.victims(1, ONE, set(), ()) == [b]
    assert h.victims(2, ONE, set(), ()) == [b, a]


def test_nextuse_evicts_the_farthest_estimated_next_use():
    """2 layers, decay 0.5: uses weigh 2 in token 1 and 4 in token 2. After token 2's layer 1: (0,0) has 2 + 4
    = 6, (0,1) 2, (1,0) 6; p = 0.5 uses / 4 = 0.75, 0.25, 0.75. Serving layer 1, layer 0 runs next (1 step),
    layer 1 in 2: next use (0,0) 1 + 2 (1/0.75 - 1) = 1.67, (0,1) 1 + 2 (4 - 1) = 7, (1,0) 2.67 layers away.
    Distance ranks the other way round at the head: (w + uses) / steps = 10, 6, 5, so (1,0) goes first."""
    steps = [(0, [0, 1]), (1, [0]), (0, [0]), (1, [0])]
    got = []
    for policy in (NextUse({0: 0, 1: 1}, use_decay=0.5), Distance({0: 0, 1: 1}, use_decay=0.5)):
        serve(policy, steps, capacity=8)
        got.append([(u.layer, u.expert) for u in policy.ranked()])
        assert got[-1] == [(u.layer, u.expert) for u in sorted(policy.stamp, key=policy.order_key)]
    assert got == [[(0, 1), (1, 0), (0, 0)], [(1, 0), (0, 1), (0, 0)]]
    assert NextUse({0: 0, 1: 1}, use_decay=0.5).keep(2.0, 1) == -1.0    # p = 1: chosen at its layer's turn


def test_a_prompt_batch_counts_every_token_weighed_by_age():
    """Three prompt tokens choose (0 1), (0 2), (1 2): each expert is used once per token that chose it,
    decayed by the token's age (2, 1, 0 tokens before the last) where the policy decays."""
    ids = np.array([[0, 1], [0, 2], [1, 2]])
    for policy, want in (("distance", {0: 0.25 + 0.5, 1: 0.25 + 1, 2: 0.5 + 1}), ("lfu", {0: 2, 1: 2, 2: 2})):
        cache = ReplayCache(synthetic_layout(2, 4, 2), None, policy=policy, use_decay=0.5)
        cache.ensure_ids(0, ids)
        counts = cache.eviction.uses if policy == "distance" else cache.eviction.count
        weight = getattr(cache.eviction, "weight", 1.0)
        assert {u.expert: c / weight for u, c in counts.items()} == want


def test_victims_spare_keep_and_take_deferred_ones_last():
    p = LRU({0: 0})
    a, b, c, d = (ExpertUID(0, e) for e in range(4))
    for uid in (a, b, c, d):
        p.add(uid)
    cost = {a: 1, b: 1, c: 1, d: 2}
    assert p.victims(2, cost, {b}, {a}) == [c, d]
    assert p.victims(4, cost, {b}, {a}) == [c, d, a]
    assert p.victims(9, cost, {b}, {a}) == [c, d, a]        # all that may go
    assert p.victims(1, cost, {a, b, c, d}, ()) == []


def test_heaps_give_back_what_a_walk_took():
    """A walk pops entries off the heaps; the experts not evicted are walked again in the same order."""
    for policy in (LFU({0: 0, 1: 1}), Distance({0: 0, 1: 1}), NextUse({0: 0, 1: 1}), Hobbit({0: 0, 1: 1})):
        serve(policy, [(0, [0, 1]), (1, [0, 1]), (0, [0, 2]), (1, [2])], capacity=6)
        first = list(policy.ranked())
        assert policy.victims(2, ONE, set(), ()) == first[:2]
        assert list(policy.ranked()) == first and len(first) == 6
        assert first == sorted(first, key=policy.order_key)


def test_foresight_keeps_the_experts_needed_soon_farthest_first():
    """LRU order 0 1 2 3; steps 2 and 3 need 1 (step 2 first) and 0 (step 3): 2 and 3 go first, then 0, then 1."""
    uids = [ExpertUID(0, e) for e in range(4)]
    inner = LRU({0: 0})
    for uid in uids:
        inner.add(uid)
    future = [set(), set(), {uids[1]}, {uids[0], uids[1]}, {uids[2]}]
    p = Foresight(inner, future, horizon_steps=2)
    p.i = 1
    assert list(p.ranked()) == [uids[2], uids[3], uids[0], uids[1]]
    p.i = 2                                   # steps 3 and 4: 2 is needed last, 0 and 1 tie (LRU order)
    assert list(p.ranked()) == [uids[3], uids[2], uids[0], uids[1]]
