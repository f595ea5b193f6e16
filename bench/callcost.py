"""``python -m bench.callcost``: where the per-event microseconds of call state go.

A microbenchmark, in one process, of what the call state added to every event on the socket's
path, piece by piece, on two streams of events as the socket delivers them (payloads decoded
by orjson from their JSON text):

- *lifecycle*: the drain rows' stream (``bench.server.call_event``): ``incoming_call``,
  ``call_answered``, ``call_ended`` of a new call each, about 190 bytes;
- *other*: ``call_transcript_delta`` events (not lifecycle: their id hashes the canonical
  payload) of 100 calls the map knows, ringing or answered, a few lines of text each.

The pieces, each timed alone over the whole stream (best of ``--repeat`` passes, each on
fresh state), in microseconds per event:

- ``ids``: :meth:`EventIds.stamp <listener.core.ids.EventIds.stamp>`, the id the session
  gives an event (a lifecycle event's is made when first read: ``read id`` is that read);
- ``stamp``: the session giving the event its id (the ids themselves left out);
- ``admit``: :meth:`CallTracker.admit <listener.calls.tracker.CallTracker.admit>`, the
  de-duplication by id;
- ``merge``: :meth:`CallTracker.merge <listener.calls.tracker.CallTracker.merge>`;
- ``submit``: :meth:`Dispatcher.submit <listener.dispatch.dispatcher.Dispatcher.submit>` to
  one runner with the real tracker, less the same with a tracker that admits everything and
  knows no call: de-dup, merge and handing the record on, as the dispatcher does them;
- ``read id``: reading ``event.id`` of each stamped event once (what a webhook handler does:
  it is the ``webhook-id``), not on the socket's path;
- ``store``: the persister's batch for the stream (the calls it changed, the lifecycle ids
  it handed on, by call and name) written by :meth:`CallStore.save
  <listener.calls.store.CallStore.save>` into a fresh file: off the event loop, on the
  persister's worker thread, but CPU all the same; with ``CallTracker.unsaved``, on the
  loop, once a second.

``total`` is ``ids + stamp + submit``: what call state costs the socket's path per event;
``store`` comes on top, on another thread.
``--json`` prints the figures as JSON instead of a table.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import orjson

from bench.server import call_event
from listener.calls.state import CallRecord
from listener.calls.store import CallStore
from listener.calls.tracker import CallTracker
from listener.core.events import Event, stamp_id
from listener.core.ids import EventIds
from listener.dispatch.dispatcher import Dispatcher, HandlerRunner, RunnerSettings
from listener.dispatch.handler import Context, Handler
from listener.realtime.session import Session, SessionSettings

__all__ = ["Stream", "main", "measure", "streams"]

_TOPIC = "events"
_LINES = (
    "Hello, thanks for calling, how can I help?",
    "I'd like to move my appointment to Thursday.",
    "Sure, let me check what we have that afternoon.",
    "Anything after three works for me.",
    "We have 3:30 or 4:15; which would you prefer?",
)


class _Nothing(Handler):
    name = "nothing"

    async def handle(self, event: Event, ctx: Context) -> None:
        del event, ctx


class _NoCalls(CallTracker):
    """A tracker that admits every event and knows no call: the dispatcher without call state."""

    def admit(self, event: Event) -> bool:
        del event
        return True

    def merge(self, event: Event) -> CallRecord | None:
        del event
        return None


class _SameId(EventIds):
    """Ids for free, so that timing the session's stamp leaves them out."""

    def stamp(self, event: Event) -> Event:
        return stamp_id(event, "evt_" + "a" * 32)

    def assign(self, name: str, payload: dict[str, Any], now: float) -> str:
        del name, payload, now
        return "evt_" + "a" * 32

    def of(self, event: Event) -> str:
        del event
        return "evt_" + "a" * 32


class Stream:
    """Events as the socket delivers them, and the call map they start from."""

    def __init__(self, label: str, heard: list[Event], known: Sequence[Event] = ()) -> None:
        self.label = label
        self.heard = heard
        # Events merged before the stream (the calls it speaks of), not timed.
        self.known = list(known)

    def stamped(self) -> list[Event]:
        """The stream with the ids the session gives it."""
        ids = EventIds()
        return [ids.stamp(_copy(e)) for e in self.heard]

    def tracker(self, kind: type[CallTracker] = CallTracker) -> CallTracker:
        """A tracker that has heard the stream's known events."""
        tracker = kind()
        ids = EventIds()
        for e in self.known:
            event = Event.create(
                e.name, e.payload, _TOPIC, e.received_at, id=ids.assign(e.name, e.payload, 0.0)
            )
            if tracker.admit(event):
                tracker.merge(event)
        return tracker


def _copy(event: Event) -> Event:
    """A fresh copy of an event as the connection built it (the session stamps in place)."""
    return Event.create(event.name, event.payload, event.topic, event.received_at, event.size)


def _wire(name: str, payload: dict[str, Any], at: float) -> Event:
    """The event as the connection builds it: the payload decoded from its JSON text."""
    text = orjson.dumps({"event": name, "payload": payload})
    decoded = orjson.loads(text)
    return Event.create(decoded["event"], decoded["payload"], _TOPIC, at, len(text) + 40)


def streams(count: int) -> list[Stream]:
    """The two streams, ``count`` events each, 10 µs apart."""
    start = time.time()
    lifecycle = [_wire(*call_event(seq), start + seq * 1e-5) for seq in range(count)]
    calls = [f"bench-delta-call-{index}" for index in range(100)]
    known = [
        _wire(name, {"callUuid": key, "fromNumber": "+15550100", "toNumber": "+15557654321"}, 0)
        for index, key in enumerate(calls)
        for name in ("incoming_call", "call_answered")[: 1 + index % 2]
    ]
    deltas = [
        _wire(
            "call_transcript_delta",
            {
                "seq": seq,
                "ts": time.time(),
                "callUuid": calls[seq % len(calls)],
                "role": "agent" if seq % 2 else "caller",
                "contentIndex": seq // len(calls),
                "content": _LINES[seq % len(_LINES)],
            },
            start + seq * 1e-5,
        )
        for seq in range(count)
    ]
    return [Stream("lifecycle", lifecycle), Stream("other", deltas, known)]


def _best(run: Callable[[], Callable[[], object]], repeat: int) -> float:
    """The fastest of ``repeat`` passes, in seconds; ``run()`` sets a pass up (untimed) and
    returns it."""
    best = float("inf")
    for _ in range(repeat):
        one = run()
        began = time.perf_counter()
        one()
        best = min(best, time.perf_counter() - began)
    return best


def _dispatcher(tracker: CallTracker) -> Dispatcher:
    handler = _Nothing()
    context = Context(rpc=None, config=None, name=handler.name, state_dir=Path("."))  # type: ignore[arg-type]
    runner = HandlerRunner(handler, RunnerSettings(name=handler.name, queue_size=10**9), context)
    return Dispatcher([runner], tracker)


def measure(stream: Stream, repeat: int) -> dict[str, float]:
    """Microseconds per event of each piece (see the module docstring)."""
    heard, stamped = stream.heard, stream.stamped()
    per_event = 1e6 / len(heard)

    def ids() -> Callable[[], object]:
        stamp = EventIds().stamp
        fresh = [_copy(e) for e in heard]
        return lambda: [stamp(e) for e in fresh]

    def read_id() -> Callable[[], object]:
        fresh = stream.stamped()
        return lambda: [e.id for e in fresh]

    def stamp() -> Callable[[], object]:
        session = Session(
            SessionSettings(base_url="http://127.0.0.1:9"),
            None,  # type: ignore[arg-type]  # never minted from
            lambda event: None,
            ids=_SameId(),
        )
        deliver = session._stamped
        # The session may stamp the events it is given in place: give it copies.
        fresh = [_copy(e) for e in heard]
        return lambda: [deliver(e) for e in fresh]

    def admit() -> Callable[[], object]:
        check = stream.tracker().admit
        return lambda: [check(e) for e in stamped]

    def merge() -> Callable[[], object]:
        fold = stream.tracker().merge
        return lambda: [fold(e) for e in stamped]

    def submit(kind: type[CallTracker]) -> Callable[[], Callable[[], object]]:
        def setup() -> Callable[[], object]:
            offer = _dispatcher(stream.tracker(kind)).submit
            return lambda: [offer(e) for e in stamped]

        return setup

    figures = {
        "ids": _best(ids, repeat) * per_event,
        "stamp": _best(stamp, repeat) * per_event,
        "admit": _best(admit, repeat) * per_event,
        "merge": _best(merge, repeat) * per_event,
        "submit": (_best(submit(CallTracker), repeat) - _best(submit(_NoCalls), repeat))
        * per_event,
    }
    figures["total"] = figures["ids"] + figures["stamp"] + figures["submit"]
    figures["read id"] = _best(read_id, repeat) * per_event

    def store() -> Callable[[], object]:
        tracker = stream.tracker()
        tracker.state.changed()
        tracker.unsaved()
        for event in stamped:
            if tracker.admit(event):
                tracker.merge(event)
        calls = tracker.state.changed()
        folder = Path(tempfile.mkdtemp(prefix="sippet-callcost-"))
        opened = CallStore(folder / "calls.sqlite3")

        def save() -> None:
            try:
                ids, pairs = tracker.unsaved()
                opened.save(
                    time.time(),
                    calls=calls,
                    handled=ids,
                    handled_calls=pairs,
                    seen_until=time.time(),
                )
            finally:
                opened.close()
                shutil.rmtree(folder)

        return save

    figures["store"] = _best(store, repeat) * per_event
    return figures


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bench.callcost",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--events", type=int, default=30_000, help="events per stream")
    parser.add_argument("--repeat", type=int, default=7, help="passes per piece (the best)")
    parser.add_argument("--json", action="store_true", help="print JSON, not a table")
    args = parser.parse_args(argv)
    results = {s.label: measure(s, args.repeat) for s in streams(args.events)}
    if args.json:
        print(json.dumps(results))
        return 0
    labels = list(results)
    print("| µs per event | " + " | ".join(labels) + " |")
    print("|---|" + "---:|" * len(labels))
    for piece in next(iter(results.values())):
        cells = " | ".join(f"{results[label][piece]:.2f}" for label in labels)
        print(f"| {piece} | {cells} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
