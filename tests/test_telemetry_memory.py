"""Peak memory on CPU is the process's peak RSS, labelled as such, and grows with a big allocation."""

import torch

from ear_dist.telemetry.memory import PROCESS_RSS, peak_memory, reset_peak_memory


def test_cpu_peak_is_process_rss_and_sees_a_large_allocation():
    before = peak_memory("cpu")
    assert before.kind == PROCESS_RSS
    assert before.reserved_peak_bytes is None
    # a block bigger than the whole earlier peak, touched so its pages are resident,
    # must raise the peak above the earlier one
    block_bytes = before.peak_bytes + 64 * 2**20
    block = torch.ones(block_bytes, dtype=torch.uint8)
    after = peak_memory()
    del block
    assert after.peak_bytes >= block_bytes > before.peak_bytes
    reset_peak_memory("cpu")  # no-op on CPU: the peak stays
    assert peak_memory().peak_bytes >= after.peak_bytes
    metrics = after.as_metrics()
    assert list(metrics) == ["memory/cpu_peak_rss_gib"]
    assert metrics["memory/cpu_peak_rss_gib"] == after.peak_bytes / 2**30
    assert "process peak RSS" in after.describe()
