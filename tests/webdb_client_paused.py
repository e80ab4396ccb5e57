"""`signer webdb-client --once`, stopped between the signer's answer and the write-back.

Builds the WebDB client with a `before_write_back` hook that writes the job's request id to
`--marker` and then hangs, so that test_webdb_client can kill the process (-9) right there.
Run as a script: `python tests/webdb_client_paused.py --config FILE --marker FILE`.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # the project, when run as a script

from signer.client.webdb import Job, WebdbClient, WebdbClientConfig
from signer.config import load


async def run(config: WebdbClientConfig, marker: Path) -> None:
    async def hang(job: Job) -> None:
        marker.write_text(job.request_id)
        await asyncio.sleep(3600)

    async with WebdbClient(config, before_write_back=hang) as client:
        await client.run_once()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", type=Path, required=True)
    parser.add_argument("--marker", type=Path, required=True)
    args = parser.parse_args()
    config = load(args.config, WebdbClientConfig)
    logging.basicConfig(level=config.log_level, stream=sys.stderr)
    asyncio.run(run(config, args.marker))


if __name__ == "__main__":
    main()
