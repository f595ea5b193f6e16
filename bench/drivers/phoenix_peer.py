"""Peer: ``phoenix-channels-python-client``, in its own venv, with the baseline's shims.

Stock, it joins and then drops every broadcast: in V2 it discards any frame whose join_ref
differs from the topic's, and Phoenix (like the fake) sends broadcasts with a null join_ref.
As in the peer baseline:

1. the "fix": ``PHXProtocolHandler.parse_message`` is wrapped so that frames whose join_ref
   and ref are both null get the topic's current join_ref;
2. ``max_topic_queue_size=1_000_000``: the default of 1000 drops the oldest events of a
   backlog.

The token goes in the ``websocket_url`` query; the client appends its own ``api_key=``, so a
dummy value is passed there. Events are counted with ``subscribe_to_topic("events", cb)``.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from common import Recorder, driver_args, mint_token, serve, socket_url
from phoenix_channels_python_client import PHXChannelsClient


def _fix_broadcasts(client: PHXChannelsClient) -> None:
    """Give broadcasts (join_ref and ref null) the topic's current join_ref."""
    handler = client._protocol_handler
    parse = handler.parse_message
    topics = client._topic_subscriptions

    def parse_message(raw: str | bytes) -> Any:
        message = parse(raw)
        if message.join_ref is None and message.ref is None:
            topic = topics.get(message.topic)
            if topic is not None:
                return message.model_copy(update={"join_ref": topic.join_ref})
        return message

    handler.parse_message = parse_message


async def main() -> None:
    args = driver_args(__doc__ or "")
    # The client's own account of reconnects and refusals, in the driver's log (stderr).
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    token = mint_token(args.base_url, args.api_key)
    recorder = Recorder()
    url = socket_url(args.base_url, {"session_token": token})
    client = PHXChannelsClient(url, "dummy", max_topic_queue_size=1_000_000)
    _fix_broadcasts(client)
    record = recorder.record

    async def on_message(message: Any) -> None:
        record(message.payload)

    async with client:
        await client.subscribe_to_topic(args.topic, on_message)
        await serve(recorder, {"client": "phoenix-channels-python-client"})


if __name__ == "__main__":
    asyncio.run(main())
