"""The call-state rows of ``python -m bench``: what reconciliation takes after a gap, and what
keeping the call map costs the socket's path.

- **reconcile**: a fresh fake Sippet and one daemon (``bench/drivers/callstate.py``). Per
  trial, ``open`` calls ring and are answered, heard live (the map and the fake's call table
  both hold them); then an outage (every socket closed, upgrades refused for ``outage`` s)
  during which the first ``end`` of them end, heard by no socket; the daemon re-joins, its
  reconciler asks ``list_calls`` and rebuilds the ``end`` missed ``call_ended`` events. The
  figure is the time from the join (the server's clock when it accepted it) to the last
  rebuilt event reaching the handler (the handler's ``time.time()``; one host, one clock),
  with the ``list_calls`` round trip it holds (the fake's answer, in Python, over HTTP).
  After each trial the open calls end, heard live, and the table is emptied.
- **drain, call state on vs off**: the drain row's method (``bench.scenarios``) on the same
  server with the driver's call state on (as shipped), on without a call store (the
  daemon's ``persist=False``, as ``tail`` runs: the store's share of the cost) and off (the
  session hands events on without ids and the dispatcher's tracker admits all and knows no
  call: the path as it was before call state, in the bench process only). Rounds alternate
  the order, a fresh driver each, so that a noisy neighbour spreads over all three;
  ``µs CPU/event`` as in the drain row (the process's CPU: the store's thread counts).
  With a checkout of :data:`BEFORE_CALL_STATE` (``python -m bench`` makes one with ``git
  archive`` when the clone has that commit), its daemon joins the rounds: the throughput row
  as it was without call state, issue #11's reference ("the socket -> handler throughput row
  stays within 5 % of what it was without call state"). "Off" is the stricter comparison:
  this tree's path with the call map taken out, which later work made faster as well.

``python -m bench.reconcile [smoke|quick|full]`` runs these rows alone (their own server).
"""

from __future__ import annotations

import dataclasses
import json
import statistics
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bench.procs import ROOT, BenchServer, Driver
from bench.scenarios import Mode, _drain, warm_up

__all__ = ["BEFORE_CALL_STATE", "SIZES", "Sizes", "before_call_state", "rows"]

#: The last commit before stable ids and the call map (issue #11) landed: its daemon is the
#: throughput row without call state.
BEFORE_CALL_STATE = "e940c07"

_SCRIPT = "callstate.py"
_LABEL = "sippet-listener (Daemon, no-op handler)"
# Reconnects every 0.1-0.2 s, so that the re-join comes soon after the outage.
_SIPPET = {"stable_after": 0.5, "backoff_initial": 0.2, "backoff_max": 0.2}


@dataclass(frozen=True, slots=True)
class Sizes:
    """How big the call-state rows are in one mode."""

    open: int
    end: int
    trials: int
    outage: float
    drain_events: int
    rounds: int
    runs_per_round: int


SIZES = {
    "smoke": Sizes(100, 50, 1, 0.3, 500, 1, 1),
    "quick": Sizes(1000, 500, 3, 1.0, 10_000, 3, 2),
    "full": Sizes(1000, 500, 5, 1.0, 20_000, 5, 2),
}


@dataclass
class _Variant:
    label: str
    options: dict[str, Any]
    rates: list[float] = field(default_factory=list)
    cpu_us: list[float] = field(default_factory=list)
    lost: int = 0

    @property
    def rate(self) -> float:
        return statistics.median(self.rates) if self.rates else 0.0

    @property
    def cpu(self) -> float:
        return statistics.median(self.cpu_us) if self.cpu_us else 0.0


@dataclass
class _Trial:
    seconds: float
    list_calls: float
    reconciled: int  # events with origin "reconcile" handled
    handled: int  # events handled after the outage began
    cpu_ms: float | None


def _driver(server: BenchServer, options: dict[str, Any], log: Path) -> Driver:
    # ``script``: another tree's driver, for an A/B run, with that tree's ``listener``
    # (Driver's ``root``; without it the venv's editable install is this tree's, whatever
    # the driver).
    options = dict(options)
    script = options.pop("script", None)
    if script is None:
        return Driver(_LABEL, Path(sys.executable), _SCRIPT, server, log, options)
    path = Path(script).resolve()
    return Driver(
        _LABEL, Path(sys.executable), path.name, server, log, options, root=path.parents[2]
    )


def _verdict(ratio: float) -> str:
    return "PASS" if ratio >= 0.95 else "MISS"


def before_call_state(into: Path) -> Path | None:
    """A checkout of :data:`BEFORE_CALL_STATE` under ``into`` (``git archive``), or None when
    this is not a clone that has it (a source archive, a shallow clone)."""
    archive = subprocess.run(
        ["git", "-C", str(ROOT), "archive", BEFORE_CALL_STATE],
        capture_output=True,
        check=False,
    )
    if archive.returncode != 0:
        return None
    tree = into / BEFORE_CALL_STATE
    tree.mkdir(parents=True, exist_ok=True)
    subprocess.run(["tar", "-x", "-C", str(tree)], input=archive.stdout, check=True)
    return tree


def _drain_rows(
    server: BenchServer,
    mode: Mode,
    sizes: Sizes,
    logs: Path,
    extra: dict[str, dict[str, Any]] | None = None,
    before: Path | None = None,
) -> list[tuple[str, ...]]:
    on = _Variant("call state on (as shipped)", {"sippet": _SIPPET})
    unstored = _Variant(
        "call state on, no call store (as tail runs)", {"sippet": _SIPPET, "persist": False}
    )
    off = _Variant(
        "call state off (no ids, no-op tracker: bench only)",
        {"sippet": _SIPPET, "call_state": False},
    )
    more = [
        _Variant(label, {"sippet": _SIPPET, **options}) for label, options in (extra or {}).items()
    ]
    earlier = None
    if before is not None:
        earlier = _Variant(
            f"before call state ({BEFORE_CALL_STATE}'s daemon)",
            {"sippet": _SIPPET, "script": str(before / "bench" / "drivers" / "daemon.py")},
        )
        more.append(earlier)
    variants = (on, unstored, *more, off)
    for round_ in range(sizes.rounds):
        for variant in variants if round_ % 2 == 0 else variants[::-1]:
            key = ("on", "unstored", *(f"v{i}" for i in range(len(more))), "off")[
                variants.index(variant)
            ]
            driver = _driver(server, variant.options, logs / f"callstate-drain-{key}.log")
            try:
                warm_up(server, driver, mode.warmup)
                for _ in range(sizes.runs_per_round):
                    rate, lost, cpu = _drain(server, driver, sizes.drain_events)
                    variant.rates.append(rate)
                    variant.lost += lost
                    if cpu is not None:
                        variant.cpu_us.append(cpu)
            finally:
                driver.quit()
    runs = sizes.rounds * sizes.runs_per_round
    measure = f"throughput, drain {sizes.drain_events:,} x {runs}, call state on vs off (events/s)"
    rows = []
    for variant in variants:
        figures = ", ".join(f"{rate:,.0f}" for rate in variant.rates)
        cpus = ", ".join(f"{cpu:.1f}" for cpu in variant.cpu_us)
        lost = f"; {variant.lost:,} lost" if variant.lost else ""
        result = (
            f"{variant.rate:,.0f} (runs {figures}); {variant.cpu:.1f} µs CPU/event"
            f" (runs {cpus}){lost}"
        )
        if variant is off:
            reference, target = "reference", ""
        else:
            ratio = variant.rate / off.rate if off.rate else 0.0
            cpu_ratio = variant.cpu / off.cpu if off.cpu else 0.0
            reference = (
                f"{ratio:.2f} x off; CPU {cpu_ratio:.2f} x off"
                f" (+{variant.cpu - off.cpu:.1f} µs/event)"
            )
            verdicts = []
            if variant is on and earlier is not None and earlier.rate:
                then = variant.rate / earlier.rate
                reference += f"; {then:.2f} x before call state"
                verdicts.append(f"{_verdict(then)} (#11: >= 0.95 x before call state)")
            if variant is on:
                verdicts.append(f"{_verdict(ratio)} (>= 0.95 x off)")
            target = "; ".join(verdicts)
        rows.append((measure, f"{_LABEL}, {variant.label}", result, reference, target))
    return rows


def _trial(server: BenchServer, driver: Driver, sizes: Sizes, prefix: str) -> _Trial:
    driver.expect(2 * sizes.open, keep=False)
    server.call("/calls/open", {"count": sizes.open, "prefix": prefix})
    heard = driver.wait(timeout=30, records=False)["count"]
    if heard != 2 * sizes.open:
        raise RuntimeError(f"the daemon heard {heard} of {2 * sizes.open} call events live")
    before = driver.stats()
    driver.expect(sizes.end)
    timeout = 30.0 + sizes.outage
    answer = server.call(
        "/calls/outage",
        {"end": sizes.end, "prefix": prefix, "seconds": sizes.outage, "timeout": timeout},
        timeout + 10,
    )
    if not answer["rejoined"]:
        raise RuntimeError("the daemon did not re-join after the outage")
    if answer["heard"]:
        raise RuntimeError(f"{answer['heard']} call_ended events were heard during the outage")
    got = driver.wait(timeout=30)
    stats = driver.stats()
    records = got["records"]
    last = max((received for _, _, received in records), default=answer["rejoined_at"])
    passes = stats["list_calls"][len(before["list_calls"]) :]
    list_calls = sum(end - start for start, end in passes)
    driver.expect(sizes.open - sizes.end, keep=False)
    server.call("/calls/close", {})
    driver.wait(timeout=30, records=False)
    cpu_ms = got["cpu"] * 1000 if got["cpu"] is not None else None
    reconciled = stats["reconciled"] - before["reconciled"]
    return _Trial(last - answer["rejoined_at"], list_calls, reconciled, len(records), cpu_ms)


def _reconcile_rows(sizes: Sizes, logs: Path) -> list[tuple[str, ...]]:
    server = BenchServer(logs / "server-reconcile.log")
    trials: list[_Trial] = []
    try:
        driver = _driver(server, {"sippet": _SIPPET}, logs / "callstate-reconcile.log")
        try:
            for index in range(sizes.trials):
                trials.append(_trial(server, driver, sizes, f"bench-open-{index}"))
        finally:
            driver.quit()
    finally:
        server.close()
    measure = (
        f"reconcile: {sizes.open:,} open calls, {sizes.end:,} end during a {sizes.outage:g} s"
        " outage; re-join -> last reconciled event at the handler"
    )
    seconds = [trial.seconds for trial in trials]
    calls = [trial.list_calls for trial in trials]
    runs = ", ".join(f"{value * 1000:.0f}" for value in seconds)
    got = min(trial.reconciled for trial in trials)
    extra = max(trial.handled - trial.reconciled for trial in trials)
    cpus = [trial.cpu_ms for trial in trials if trial.cpu_ms is not None]
    cpu = (
        f"; daemon CPU from the outage on {statistics.median(cpus):.0f} ms"
        f" ({statistics.median(cpus) * 1000 / sizes.end:.0f} µs per reconciled event)"
        if cpus
        else ""
    )
    result = (
        f"median {statistics.median(seconds) * 1000:.0f} ms (runs {runs} ms), of which"
        f" list_calls {statistics.median(calls) * 1000:.0f} ms (the fake's answer);"
        f" at least {got:,} of {sizes.end:,} reconciled in each of {len(trials)} trials,"
        f" {extra} other events{cpu}"
    )
    exact = all(t.reconciled == t.handled == sizes.end for t in trials)
    target = "PASS" if exact else "MISS"
    return [(measure, _LABEL, result, "", f"{target} (every missed call_ended rebuilt once)")]


def rows(
    server: BenchServer,
    mode: Mode,
    logs: Path,
    *,
    variants: dict[str, dict[str, Any]] | None = None,
    drain_only: bool = False,
    rounds: int | None = None,
    before: Path | None = None,
) -> list[tuple[str, ...]]:
    """The call-state rows: (measure, client, result, reference, target) each.

    ``variants``: more daemons in the drain rounds, ``{label: driver options}`` (see
    ``bench/drivers/callstate.py``; ``script`` runs another tree's driver); ``drain_only``
    skips the reconcile row; ``rounds`` overrides the mode's; ``before``: a checkout of
    :data:`BEFORE_CALL_STATE` (:func:`before_call_state`), whose daemon joins the rounds.
    """
    sizes = SIZES[mode.name]
    if rounds is not None:
        sizes = dataclasses.replace(sizes, rounds=rounds)
    head = [] if drain_only else _reconcile_rows(sizes, logs)
    return head + _drain_rows(server, mode, sizes, logs, variants, before)


def main(argv: list[str] | None = None) -> int:
    """Only these rows: ``python -m bench.reconcile [smoke|quick|full]`` (default quick)."""
    import argparse

    from bench.run import MODES, RESULTS, Row, _table

    parser = argparse.ArgumentParser(prog="python -m bench.reconcile", description=__doc__)
    parser.add_argument("mode", nargs="?", default="quick", choices=sorted(SIZES))
    parser.add_argument(
        "--variant",
        action="append",
        default=[],
        metavar="LABEL=JSON",
        help="another daemon in the drain rounds, with these driver options (repeatable)",
    )
    parser.add_argument("--drain-only", action="store_true", help="skip the reconcile row")
    parser.add_argument("--rounds", type=int, help="drain rounds (default: the mode's)")
    parser.add_argument(
        "--no-before",
        action="store_true",
        help=f"leave {BEFORE_CALL_STATE}'s daemon (the row without call state) out",
    )
    args = parser.parse_args(argv)
    mode = MODES[args.mode]
    variants = {
        label: json.loads(options)
        for label, _, options in (item.partition("=") for item in args.variant)
    }
    logs = RESULTS / mode.name
    logs.mkdir(parents=True, exist_ok=True)
    server = BenchServer(logs / "server-callstate.log")
    with tempfile.TemporaryDirectory(prefix="sippet-bench-before-") as trees:
        before = None if args.no_before else before_call_state(Path(trees))
        try:
            server.call("/configure", {"token_ttl": 3600})
            found = rows(
                server,
                mode,
                logs,
                variants=variants,
                drain_only=args.drain_only,
                rounds=args.rounds,
                before=before,
            )
            print(_table([Row(*row) for row in found]))
        finally:
            server.close()

    return 0


if __name__ == "__main__":
    sys.exit(main())
