"""``call_summary``: one log line per finished call, the smallest useful function handler."""

from __future__ import annotations

from listener import Context, Event, handler

__all__ = ["call_summary"]


# A summary line is worth less than slowing the intake: under a flood, drop it.
@handler(events=["call_ended"], when=lambda event: event.call_key is not None, on_full="drop")
async def call_summary(event: Event, ctx: Context[None]) -> None:
    """Log the call's status, direction and duration, whichever spelling the payload uses."""
    ctx.log.info(
        "call summary",
        status=event.field("status"),
        direction=event.field("direction"),
        duration_seconds=event.field("durationSeconds"),
    )
