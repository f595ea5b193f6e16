"""The ``log`` handler: one structured log line per event.

Also the smallest complete example of a handler with settings, for plugin authors.
"""

from __future__ import annotations

import json
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from listener import Context, Event, Handler

__all__ = ["LogConfig", "LogHandler"]


class LogConfig(BaseModel):
    """``[[handlers]]`` settings for ``use = "log"``."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    level: Literal["debug", "info", "warning"] = "info"
    payload: bool = True
    max_payload_chars: int = Field(default=2000, ge=0)
    # Payload fields to show as their own keys, read in any spelling (event.field).
    fields: list[str] = Field(default_factory=list)


class LogHandler(Handler[LogConfig]):
    """Logs every event it is subscribed to (all of them by default)."""

    name = "log"
    events = ("*",)

    def __init__(self, config: LogConfig | None = None) -> None:
        super().__init__(config or LogConfig())

    async def handle(self, event: Event, ctx: Context[LogConfig]) -> None:
        # origin tells a transition rebuilt after a gap from one the channel delivered.
        fields: dict[str, object] = {
            "topic": event.topic,
            "origin": event.origin,
            "event_id": event.id,
        }
        for name in self.config.fields:
            fields[name] = event.field(name)
        if self.config.payload:
            text = json.dumps(event.payload, separators=(",", ":"), default=str)
            limit = self.config.max_payload_chars
            # One oversized event (an AI audit blob) must not flood the journal.
            fields["payload"] = text if len(text) <= limit else f"{text[:limit]}...(truncated)"
        getattr(ctx.log, self.config.level)("event received", **fields)
