"""Issue 11, item 2: a flood on the line must not grow the signer's memory or its log.

50,000 two-byte broken frames and then 5,000 pipelined `health` requests, written to a running
`signer serve` whose answers nobody reads (signer/tools/flood.py). Before the fix every answer
and every error frame waited as its own task for the send lock: +120 MB and 50,000 WARNING lines.
Now the signer stops reading while its outgoing queue is full, reports broken frames once per
interval, and logs one summary line per interval; every request is still answered once."""

from __future__ import annotations

from signer.tools.flood import flood

RSS_BUDGET_MB = 20
LOG_BUDGET_LINES = 100


def test_a_flood_of_broken_frames_and_unread_requests_stays_bounded(tmp_path):
    figures = flood(tmp_path, broken=50_000, requests=5_000, progress=print)
    print(figures)
    assert figures.growth_mb < RSS_BUDGET_MB, figures
    assert figures.log_lines < LOG_BUDGET_LINES, (tmp_path / "signer.log").read_text()[-3000:]
    assert figures.answered == figures.requests_sent, figures  # nothing lost, nothing twice
    assert figures.broken_answers < 100, figures  # coalesced: one report per interval
    assert figures.largest_answer < 16 * 1024, figures
