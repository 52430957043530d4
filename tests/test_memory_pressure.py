"""Under a real memory limit (a cgroup, v1 or v2, as on a device with little RAM) a long generation finishes."""
import json
import sys

import pytest

from edgemoe_bench import cgroup
from edgemoe_bench.bench import kv_cache_bytes, measure_allowance
from edgemoe_llamacpp import limits
from edgemoe_llamacpp.cache.residency import parse_budget
from edgemoe_llamacpp.gguf.layout import read_layout

CONTROLLER = cgroup.memory_controller()
pytestmark = pytest.mark.skipif(CONTROLLER.kind == "none", reason=CONTROLLER.reason)


def test_256_tokens_under_a_30_percent_limit_without_oom(fixture_path):
    model = str(fixture_path)
    layout = read_layout(model)
    # the room edgemoe's own process needs (stock is not what this test is about)
    limit = (layout.dense_bytes + parse_budget("30%", layout.expert_bytes) + kv_cache_bytes(model, 512)
             + measure_allowance(model, engines=("edgemoe",)))
    limits.drop_file_cache(model)
    run = cgroup.run_limited([sys.executable, "-m", "edgemoe_llamacpp", "run", model, "-p", "import os\n",
                              "-n", "256", "--memory-budget", "30%", "--repeat-penalty", "1.1", "--json"], limit,
                             timeout=300)
    print(f"{run.kind}: {CONTROLLER.reason}; limit {limit:,}, peak {run.peak_bytes:,}, limit hits {run.failcnt}")
    assert run.kind == CONTROLLER.kind
    assert run.returncode == 0 and run.oom_kills == 0, run.stderr[-2000:]
    assert 0 < run.peak_bytes <= limit
    out = json.loads(run.stdout)
    assert out["tokens"] == 256
    stats = out["stats"]
    assert stats["total"]["misses"] > 0 and stats["resident_expert_bytes"] <= stats["budget_bytes"]
