"""A flood on the serial line (issue 11, item 2): the signer's memory and log against its idle self.

A `signer serve` on a pty gets N two-byte broken frames and then M pipelined `health` requests
whose answers are not read until everything is written (signer/tools/flood.py); its RSS is
sampled throughout and compared with its idle RSS in the same run. Run:

    python bench/flood.py [--quick]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

# bench/replication.py shadows the `replication` package in this folder: take the folder off.
sys.path.remove(str(Path(__file__).resolve().parent))

from signer.tools.flood import FloodFigures, flood

RSS_BUDGET_MB = 20
LOG_BUDGET_LINES = 100


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="the issue's flood only (~10 s)")
    args = parser.parse_args()
    plan = [(50_000, 5_000)] if args.quick else [(50_000, 5_000), (200_000, 20_000)]
    rows: list[FloodFigures] = []
    with tempfile.TemporaryDirectory() as tmp:
        for number, (broken, requests) in enumerate(plan):
            workdir = Path(tmp) / str(number)
            workdir.mkdir()
            rows.append(flood(workdir, broken, requests, progress=print, timeout=600))
    print(
        f"{'broken':>8} {'requests':>8} {'idle MB':>8} {'peak MB':>8} {'growth':>7} "
        f"{'peak/idle':>9} {'log':>5} {'nil-id':>6} {'answered':>8} {'busy':>5} {'secs':>6}"
    )
    for f in rows:
        print(
            f"{f.broken_sent:>8} {f.requests_sent:>8} {f.idle_rss_mb:>8.1f} "
            f"{max(f.peak_rss_mb, f.hwm_mb):>8.1f} {f.growth_mb:>7.1f} "
            f"{max(f.peak_rss_mb, f.hwm_mb) / f.idle_rss_mb:>9.3f} {f.log_lines:>5} "
            f"{f.broken_answers:>6} {f.answered:>8} {f.busy:>5} "
            f"{f.flood_seconds + f.drain_seconds:>6.1f}"
        )
    print(f"(budget: growth < {RSS_BUDGET_MB} MB, log < {LOG_BUDGET_LINES} lines)")
    first = rows[0]
    results = {
        "growth_mb": first.growth_mb,
        "peak_over_idle": max(first.peak_rss_mb, first.hwm_mb) / first.idle_rss_mb,
        "log_lines": float(first.log_lines),
        "nil_id_answers": float(first.broken_answers),
        "unanswered": float(first.requests_sent - first.answered),
    }
    print("RESULT " + " ".join(f"{key}={value:.3f}" for key, value in sorted(results.items())))


if __name__ == "__main__":
    main()
