"""The webhook receiver (``listener.testing.WebhookReceiver``) in a process of its own.

Run: ``python -m bench.receiver PORT``. It answers every request with 200 (uvicorn, no access
log), prints one JSON line once it listens, and serves until standard input closes. It keeps
only a count of the requests, so a 100k backlog does not grow its memory.
"""

from __future__ import annotations

import asyncio
import json
import sys

from listener.testing.receiver import WebhookReceiver

_TRIM_EVERY = 0.5


async def main() -> None:
    receiver = WebhookReceiver()
    receiver.port = int(sys.argv[1])
    await receiver.up()
    sys.stdout.write(json.dumps({"url": receiver.url}) + "\n")
    sys.stdout.flush()
    closed = asyncio.get_running_loop().run_in_executor(None, sys.stdin.read)
    received = 0
    try:
        while not closed.done():
            await asyncio.wait({closed}, timeout=_TRIM_EVERY)
            received += len(receiver.requests)
            receiver.requests.clear()
    finally:
        await receiver.down()
    sys.stderr.write(f"received {received} requests\n")


if __name__ == "__main__":
    asyncio.run(main())
