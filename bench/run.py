"""``python -m bench``: sippet-listener side by side with the raw limit and its Python peers.

Starts the fake Sippet in its own process, runs every client in its own process (each peer in
its own venv under ``bench/.venvs/``, created on first run), and prints one table in which
every row carries its figures and its ratio to the reference measured in the same run.
``--quick`` is a reduced run (a couple of minutes), ``--smoke`` a tiny one without peers
(under 20 s, for the test suite). See ``bench/README.md`` for the method.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

from bench import endtoend, endtoend_profile, hotpath, imports, reconcile, scenarios, soak
from bench.peers import BARE, DAEMON, DAEMON_UVLOOP, OURS, PEERS, PRODUCTION, Client, ensure_venv
from bench.procs import ROOT, BenchServer
from bench.profile import RATE, Profile, py_spy
from bench.scenarios import Mode, percentile

__all__ = ["MODES", "main"]

MODES = {
    "smoke": Mode(
        "smoke",
        drain_events=500,
        drain_runs=1,
        warmup=100,
        latency_seconds=1.0,
        recovery_trials=2,
        peer_recovery_trials=0,
        rotation_seconds=2.0,
        rotation_ttl=0.8,
        webhook_count=100,
        webhook_runs=1,
        backlog=200,
        outage_seconds=0.5,
        footprint_events=2000,
        idle_seconds=0.5,
        profile_seconds=0.0,
        peers=False,
    ),
    "quick": Mode(
        "quick",
        drain_events=10_000,
        drain_runs=3,
        warmup=1000,
        latency_seconds=3.0,
        recovery_trials=10,
        peer_recovery_trials=3,
        rotation_seconds=6.0,
        rotation_ttl=2.0,
        webhook_count=2000,
        webhook_runs=2,
        backlog=10_000,
        outage_seconds=2.0,
        footprint_events=100_000,
        idle_seconds=5.0,
        profile_seconds=5.0,
        peers=True,
    ),
    "full": Mode(
        "full",
        drain_events=20_000,
        drain_runs=5,
        warmup=2000,
        latency_seconds=10.0,
        recovery_trials=20,
        peer_recovery_trials=20,
        rotation_seconds=20.0,
        rotation_ttl=2.0,
        webhook_count=10_000,
        webhook_runs=3,
        backlog=100_000,
        outage_seconds=5.0,
        footprint_events=1_000_000,
        idle_seconds=60.0,
        profile_seconds=15.0,
        peers=True,
    ),
}
RESULTS = ROOT / "bench" / "results"
OUR_CODE = ("listener/", "handlers/")


@dataclass(frozen=True, slots=True)
class Row:
    """One line of the table."""

    measure: str
    client: str
    result: str
    reference: str
    target: str = ""


def _verdict(ok: bool) -> str:
    return "PASS" if ok else "MISS"


def _n(value: float) -> str:
    return f"{value:,.0f}"


def _ms(seconds: float) -> str:
    return f"{seconds * 1000:.1f} ms"


def _throughput_rows(results: list[scenarios.SocketResult], mode: Mode) -> list[Row]:
    limit = next(r for r in results if r.client is BARE).rate
    peers = [r.rate for r in results if r.client.is_peer and not r.error]
    rows = []
    measure = f"throughput, drain {_n(mode.drain_events)} x {mode.drain_runs} (events/s)"
    for r in results:
        if r.error:
            rows.append(Row(measure, r.client.label, f"failed: {r.error}", ""))
            continue
        runs = ", ".join(_n(rate) for rate in r.rates)
        lost = f"; {_n(r.lost)} lost" if r.lost else ""
        cpu = f"; {statistics.median(r.cpu_us):.1f} µs CPU/event" if r.cpu_us else ""
        ratio = r.rate / limit if limit else 0.0
        target = ""
        if r.client in OURS:
            ahead = all(r.rate > peer for peer in peers)
            target = (
                f"{_verdict(ratio >= 0.6 and ahead)} (>= 0.6 x limit, ahead of every peer);"
                " #14: the interleaved row"
            )
        reference = "reference" if r.client is BARE else f"{ratio:.2f} x limit"
        rows.append(
            Row(
                measure, r.client.label, f"{_n(r.rate)} (runs {runs}){cpu}{lost}", reference, target
            )
        )
    return rows


def _latency_rows(results: list[scenarios.SocketResult], mode: Mode) -> list[Row]:
    bare = next(r for r in results if r.client is BARE)
    bare_p99 = percentile(bare.latency_ms, 99) if bare.latency_ms else 0.0
    measure = f"latency at 500/s for {mode.latency_seconds:g} s, server send -> handler (ms)"
    rows = []
    for r in results:
        if r.error or not r.latency_ms:
            rows.append(Row(measure, r.client.label, f"failed: {r.error}", ""))
            continue
        p50, p99 = percentile(r.latency_ms, 50), percentile(r.latency_ms, 99)
        lost = f"; {r.latency_lost} lost" if r.latency_lost else ""
        result = f"p50 {p50:.2f} / p99 {p99:.2f} / max {max(r.latency_ms):.2f}{lost}"
        reference = "reference" if r.client is BARE else f"p99 {p99 / bare_p99:.2f} x limit"
        target = (
            f"{_verdict(p99 <= 1.0)} (p99 <= 1 ms); #14: the interleaved row"
            if r.client in OURS
            else ""
        )
        rows.append(Row(measure, r.client.label, result, reference, target))
    return rows


def _interleaved_rows(variants: list[hotpath.Variant], mode: str) -> list[Row]:
    """Issue #14's drain and latency targets, from rounds that alternate the clients
    (``bench.hotpath``): the rows above run each client once, minutes apart, and one 10 s
    window's p99 moved by 2 x between rounds of the bare loop alone (bench/README.md,
    "Issue #14's verdicts: from interleaved rounds")."""
    rounds, events = hotpath.ROUNDS[mode]
    bare, ours = variants[0], variants[1]
    drain_measure = (
        f"#14 drain, interleaved: {rounds} rounds of 2 drains of {_n(events)} (events/s)"
    )
    latency_measure = (
        f"#14 latency at 500/s, interleaved: {rounds} rounds of {hotpath.LATENCY_SECONDS:g} s,"
        " server send -> handler (p99 ms, median of the rounds)"
    )
    bare_rate, bare_cpu = statistics.median(bare.rates), statistics.median(bare.cpu_us)
    bare_p99 = statistics.median(bare.p99)
    drains, latencies = [], []
    for variant in variants:
        rate, cpu = statistics.median(variant.rates), statistics.median(variant.cpu_us)
        p99 = statistics.median(variant.p99)
        label = variant.client.label
        drain = (
            f"{_n(rate)} (runs {', '.join(_n(r) for r in variant.rates)}); {cpu:.1f} µs"
            f" CPU/event (runs {', '.join(f'{c:.1f}' for c in variant.cpu_us)})"
        )
        latency = f"{p99:.2f} (rounds {', '.join(f'{p:.2f}' for p in variant.p99)})"
        if variant is bare:
            drains.append(Row(drain_measure, label, drain, "reference"))
            latencies.append(Row(latency_measure, label, latency, "reference"))
            continue
        drain_ref = f"{rate / bare_rate:.2f} x limit; CPU {cpu / bare_cpu:.2f} x"
        latency_ref = f"{p99 / bare_p99:.2f} x limit"
        if variant is not ours:
            drain_ref += f"; {rate / statistics.median(ours.rates):.2f} x asyncio's rate"
            latency_ref += f"; {p99 / statistics.median(ours.p99):.2f} x asyncio's"
        drains.append(
            Row(drain_measure, label, drain, drain_ref,
                f"{_verdict(rate >= bare_rate)} (#14: >= 1.0 x limit)")
        )  # fmt: skip
        latencies.append(
            Row(latency_measure, label, latency, latency_ref,
                f"{_verdict(p99 <= bare_p99)} (#14: p99 <= 1.0 x limit)")
        )  # fmt: skip
    return drains + latencies


def _recovery_rows(results: list[scenarios.SocketResult]) -> list[Row]:
    peer_medians = [
        statistics.median(r.recovery) for r in results if r.client.is_peer and r.recovery
    ]
    best_peer = min(peer_medians) if peer_medians else None
    rows = []
    for r in results:
        if r.client is BARE:
            rows.append(
                Row(
                    "recovery: drop_all -> re-joined",
                    r.client.label,
                    "no reconnect (by design)",
                    "",
                )
            )
            continue
        if not r.recovery:
            failed = f"failed: {r.error}" if r.error else "did not re-join"
            rows.append(Row("recovery: drop_all -> re-joined", r.client.label, failed, ""))
            continue
        median, p95 = statistics.median(r.recovery), percentile(r.recovery, 95)
        failures = (
            f"; then no re-join within {scenarios.RECOVERY_TIMEOUT:g} s, trials stopped"
            if r.recovery_failures
            else ""
        )
        result = (
            f"median {_ms(median)} / p95 {_ms(p95)} / max {_ms(max(r.recovery))}"
            f" ({len(r.recovery)} trials){failures}"
        )
        reference = f"{median / best_peer:.2f} x best peer" if best_peer else "no peer in this run"
        if r.client.is_peer:
            reference = "peer"
        target = f"{_verdict(median <= 0.050)} (median <= 50 ms)" if r.client in OURS else ""
        rows.append(
            Row(
                "recovery: drop_all -> re-joined",
                r.client.label,
                result,
                reference,
                target,
            )
        )
    return rows


def _rotation_rows(results: list[scenarios.Rotation], mode: Mode) -> list[Row]:
    measure = (
        f"rotation: 200/s for {mode.rotation_seconds:g} s, token TTL"
        f" {mode.rotation_ttl:g} s, expired sockets closed"
    )
    rows = []
    for r in results:
        if r.error:
            rows.append(Row(measure, r.client.label, f"failed: {r.error}", ""))
            continue
        result = (
            f"lost {r.lost} / duplicates {r.duplicates} / out of order {r.out_of_order}"
            f" of {_n(r.sent)}; {r.mints} mints, {r.refused_upgrades} refused upgrades"
        )
        if r.rotations is not None:
            result += f"; {r.rotations} rotations, {r.reconnects} reconnects"
        target = ""
        if r.client in OURS:
            target = f"{_verdict(r.lost == 0 and r.duplicates == 0)} (0 lost, 0 duplicates)"
        rows.append(
            Row(measure, r.client.label, result, "" if r.client in OURS else "peer", target)
        )
    return rows


def _webhook_rows(result: scenarios.Webhooks, mode: Mode) -> list[Row]:
    plain = result.runs["plain"]["rate"]
    measure = (
        f"webhooks: {_n(mode.webhook_count)} deliveries x {mode.webhook_runs}, 8 in flight"
        " (deliveries/s)"
    )
    labels = {
        "plain": "plain httpx POST loop",
        "signed": "httpx POST loop + Standard Webhooks signing",
        "outbox": "sippet-listener WebhookForwarder (durable outbox)",
    }
    rows = []
    for name, run in result.runs.items():
        runs = ", ".join(_n(rate) for rate in run["rates"])
        figures = (
            f"{_n(run['rate'])}/s (runs {runs}; sender CPU {run['cpu']:.0%},"
            f" receiver CPU {run['receiver_cpu']:.0%})"
        )
        reference = "reference" if name == "plain" else f"{run['rate'] / plain:.2f} x plain httpx"
        target = f"{_verdict(run['rate'] >= 1000)} (>= 1,000/s)" if name == "outbox" else ""
        rows.append(Row(measure, labels[name], figures, reference, target))
    backlog = result.backlog
    if "seconds" in backlog:
        figures = (
            f"{backlog['seconds']:.1f} s ({_n(backlog['rate'])}/s);"
            f" {_n(backlog['failed_attempts_in_outage'])} failed attempts during the"
            f" outage; {backlog['dead']} dead letters"
        )
        rows.append(
            Row(
                f"webhooks: drain a {_n(mode.backlog)} backlog after an outage",
                labels["outbox"],
                figures,
                f"{backlog['rate'] / plain:.2f} x plain httpx rate",
            )
        )
    return rows


def _footprint_rows(results: list[scenarios.Footprint]) -> list[Row]:
    bare = next(r for r in results if r.client is BARE)
    rows = []
    for r in results:
        growth = r.after_rss - r.idle_rss
        result = (
            f"idle RSS {r.idle_rss:.1f} MiB; after {_n(r.events)} events {r.after_rss:.1f} MiB"
            f" (+{growth:.1f} vs idle, {r.second_half_growth:+.1f} over the second half, peak"
            f" {max(r.trace):.1f}); idle CPU {r.idle_cpu:.2%} over {r.idle_seconds:.1f} s"
        )
        reference = (
            "reference"
            if r.client is BARE
            else f"{r.idle_rss / bare.idle_rss:.2f} x limit idle RSS"
        )
        target = ""
        if r.client in OURS:
            target = (
                f"{_verdict(r.idle_rss <= 1.3 * bare.idle_rss)} (idle RSS <= 1.3 x limit);"
                f" {_verdict(r.second_half_growth <= 1.0)} (no growth over the second half);"
                f" {_verdict(growth <= 5.0)} (+5 MiB at most vs idle)"
            )
        rows.append(Row("footprint", r.client.label, result, reference, target))
    return rows


def _idle_run_rows(
    server: BenchServer,
    logs: Path,
    bare_idle: float,
    say: Callable[[str], None],
    production: bool,
) -> list[Row]:
    """`sippet-listener run` itself, minimal configuration, joined: in the bench's venv (dev
    extras) on each loop, and as `pip install` gives it, next to the bare loop's idle RSS."""
    measure = "idle RSS: `sippet-listener run`, minimal config (no handler, no metrics), joined"
    runs: list[tuple[str, Path, str]] = [
        ("bench venv (dev extras)", Path(sys.executable), "asyncio")
    ]
    if importlib.util.find_spec("uvloop") is not None:
        runs.append(("bench venv (dev extras)", Path(sys.executable), "uvloop"))
    for client in PRODUCTION if production else ():
        say(f"venv for {client.label} ...")
        python = ensure_venv(client, logs / f"venv-{client.key}.log")
        runs.append((client.label, python, "auto"))
    rows = []
    for label, python, loop in runs:
        rss = imports.idle_run(server, logs, loop, python)
        rows.append(
            Row(
                measure,
                f"{label}, SIPPET_EVENT_LOOP={loop}",
                f"{rss:.1f} MiB (bare loop {bare_idle:.1f} MiB)",
                f"{rss / bare_idle:.2f} x limit idle RSS",
                f"{_verdict(rss <= 1.3 * bare_idle)} (<= 1.3 x limit)",
            )
        )
    return rows


def _table(rows: list[Row]) -> str:
    header = ("measure", "client", "result", "vs reference (same run)", "target")
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row in rows:
        cells = (row.measure, row.client, row.result, row.reference, row.target)
        lines.append("| " + " | ".join(cell.replace("|", "/") for cell in cells) + " |")
    return "\n".join(lines)


def _profile_text(
    title: str, profile: Profile, seconds: float, threads: tuple[str, ...], rate: int = RATE
) -> str:
    """Per thread: how busy it was, and its top costs (idle waits left out)."""
    lines = [f"### {title}"]
    expected = seconds * rate
    for thread in threads:
        busy = profile.only(thread)
        lines += [
            "",
            f"**{thread} thread**: busy ~{min(1.0, busy.total / expected):.0%} of"
            f" {seconds:g} s ({busy.total} samples; shares below are of its busy samples)",
        ]
        sections = (
            ("self time, innermost frame", busy.top_self(12)),
            (
                "self time charged to our innermost frame (listener/, handlers/)",
                busy.top_self(15, OUR_CODE),
            ),
            ("inclusive time, our functions", busy.top_inclusive(12, OUR_CODE)),
        )
        for name, costs in sections:
            if costs:
                lines += ["", f"{name}:", "```"]
                lines += [f"{cost.share:6.1%}  {cost.frame}" for cost in costs]
                lines.append("```")
    return "\n".join(lines)


def _header(mode: Mode, peers_used: list[Client], skipped: dict[str, str]) -> str:
    def git(*args: str) -> str:
        done = subprocess.run(
            ["git", *args], cwd=ROOT, capture_output=True, text=True, check=False, timeout=10
        )
        return done.stdout.strip()

    dirty = (
        " (with uncommitted changes)"
        if git("status", "--porcelain", "--", "listener", "handlers")
        else ""
    )
    lines = [
        f"# sippet-listener bench, {mode.name} mode",
        "",
        f"- {time.strftime('%Y-%m-%d %H:%M:%S')}, commit {git('rev-parse', '--short', 'HEAD')}"
        f"{dirty}; Python {platform.python_version()}, {os.cpu_count()} cores",
        "- server: FakeSippet in its own process (uvicorn, permessage-deflate negotiated with"
        " every client); each client in its own process",
    ]
    for peer in peers_used:
        lines.append(f"- shims for {peer.label}: {peer.shims}")
    for key, reason in skipped.items():
        lines.append(f"- {key} skipped: {reason}")
    return "\n".join(lines)


def _soak(
    duration: float, loop: str, rate: float, heap: int | None, heap_every: float, trim: float
) -> int:
    logs = RESULTS / "soak"
    logs.mkdir(parents=True, exist_ok=True)
    began = time.monotonic()

    def say(text: str) -> None:
        print(f"[bench {time.monotonic() - began:5.1f} s] {text}", file=sys.stderr, flush=True)

    say(f"soak of {duration:g} s ...")
    result = soak.run(
        duration, logs, say, loop, rate=rate, heap=heap, heap_every=heap_every, trim=trim
    )
    table = _table([Row(*cells) for cells in soak.rows(result)])
    report = f"{_header(MODES['full'], [], {}).replace('full mode', 'soak')}\n\n{table}\n"
    print(report)
    (RESULTS / "soak.md").write_text(report)
    (RESULTS / "soak.json").write_text(json.dumps(asdict(result)))
    return 0 if "MISS" not in table else 1


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bench",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    size = parser.add_mutually_exclusive_group()
    size.add_argument("--quick", action="store_true", help="a reduced run (a couple of minutes)")
    size.add_argument("--smoke", action="store_true", help="tiny counts, no peers (< 20 s)")
    parser.add_argument("--no-peers", action="store_true", help="skip the peer clients")
    parser.add_argument("--no-profile", action="store_true", help="skip the py-spy profiles")
    size.add_argument(
        "--soak", action="store_true", help="only the soak: 1,000,000 events through faults"
    )
    parser.add_argument(
        "--duration",
        type=float,
        default=600.0,
        help="the soak's length in seconds (default %(default)g; events scale with it)",
    )
    parser.add_argument(
        "--rate",
        type=float,
        default=soak.RATE,
        help="the soak's events/s (default %(default).0f: 1,000,000 in 600 s)",
    )
    parser.add_argument(
        "--loop", choices=("asyncio", "uvloop"), default="asyncio", help="the soak's loop"
    )
    parser.add_argument(
        "--heap",
        nargs="?",
        type=float,
        const=0.0,
        default=None,
        metavar="S",
        help="the soak's daemon dumps its heap every S s (default: ten times; a debugging run)",
    )
    parser.add_argument(
        "--tracemalloc",
        type=int,
        default=None,
        metavar="FRAMES",
        help="with --heap: trace the daemon's allocations with this many frames",
    )
    parser.add_argument(
        "--trim",
        type=float,
        default=0.0,
        metavar="S",
        help="the soak's daemon calls malloc_trim every S s",
    )
    args = parser.parse_args(argv)
    if args.soak:
        traced = args.heap is not None or args.tracemalloc is not None
        heap = (args.tracemalloc or 0) if traced else None
        return _soak(args.duration, args.loop, args.rate, heap, args.heap or 0.0, args.trim)
    mode = MODES["smoke" if args.smoke else "quick" if args.quick else "full"]
    logs = RESULTS / mode.name
    logs.mkdir(parents=True, exist_ok=True)
    for old in logs.glob("*.log"):
        old.unlink()

    began = time.monotonic()

    def say(text: str) -> None:
        print(f"[bench {time.monotonic() - began:5.1f} s] {text}", file=sys.stderr, flush=True)

    clients: list[tuple[Client, Path]] = [
        (BARE, Path(sys.executable)),
        (DAEMON, Path(sys.executable)),
    ]
    if importlib.util.find_spec("uvloop") is not None:
        clients.append((DAEMON_UVLOOP, Path(sys.executable)))
    skipped: dict[str, str] = {}
    if mode.peers and not args.no_peers:
        for peer in PEERS:
            say(f"venv for {peer.label} ...")
            try:
                clients.append((peer, ensure_venv(peer, logs / f"venv-{peer.key}.log")))
            except (RuntimeError, subprocess.TimeoutExpired, OSError) as exc:
                skipped[peer.label] = str(exc)
    profile = mode.profile_seconds > 0 and not args.no_profile
    if profile and py_spy() is None:
        skipped["profiles"] = "py-spy is not installed (pip install -e '.[bench]')"
        profile = False

    rows: list[Row] = []
    profiles: list[str] = []
    failures: list[str] = []

    def section(name: str, measure: Callable[[], list[Row] | str]) -> None:
        """Run one part; a failure becomes a row, and the rest of the run goes on."""
        say(f"{name} ...")
        try:
            produced = measure()
        except (RuntimeError, TimeoutError, OSError, subprocess.SubprocessError) as exc:
            failures.append(name)
            rows.append(Row(name, "", f"failed: {exc}".splitlines()[0], ""))
            return
        if isinstance(produced, str):
            profiles.append(produced)
        else:
            rows.extend(produced)

    server = BenchServer(logs / "server.log")
    footprints: list[scenarios.Footprint] = []
    try:
        server.call("/configure", {"token_ttl": 3600})
        socket_results = []
        for client, python in clients:
            say(f"throughput, latency, recovery: {client.label} ...")
            socket_results.append(scenarios.socket_client(client, python, server, mode, logs))
        rows += _throughput_rows(socket_results, mode)
        rows += _latency_rows(socket_results, mode)
        rows += _recovery_rows(socket_results)

        def measure_footprint() -> list[Row]:
            ours = tuple(client for client, _ in clients if client in OURS)
            footprints.extend(scenarios.footprint(server, mode, logs, ours))
            return []

        section("footprint", measure_footprint)
        if footprints:
            bare_idle = footprints[0].idle_rss
            # Like the peers', the production venvs are made on first use (they need PyPI).
            production = mode.peers and not args.no_peers
            section("idle run", lambda: _idle_run_rows(server, logs, bare_idle, say, production))

        def measure_call_state() -> list[Row]:
            # The #11 row's reference: the daemon as it was before call state, from this clone.
            before = reconcile.before_call_state(logs / "trees")
            return [Row(*row) for row in reconcile.rows(server, mode, logs, before=before)]

        section("call state", measure_call_state)
        section(
            "#14, interleaved",
            lambda: _interleaved_rows(
                hotpath.measure(server, mode.name, logs, idle_runs=False), mode.name
            ),
        )
        if profile:
            section(
                "profile of the hot path",
                lambda: _profile_text(
                    "Hot path: socket -> handler, live flood",
                    scenarios.profile_hot_path(server, mode.profile_seconds, logs),
                    mode.profile_seconds,
                    ("MainThread",),
                ),
            )
    finally:
        server.close()
    rotations = []
    for client, python in clients:
        if client is not BARE:
            say(f"rotation: {client.label} ...")
            rotations.append(scenarios.rotation(client, python, mode, logs))
    rows += _rotation_rows(rotations, mode)
    section("webhooks", lambda: _webhook_rows(scenarios.webhooks(mode, logs), mode))
    section(
        "end to end webhooks",
        lambda: [
            Row(*cells) for cells in endtoend.table(endtoend.measure(mode.name, logs), mode.name)
        ],
    )
    if profile:
        section(
            "profile of the webhook outbox",
            lambda: _profile_text(
                "Webhooks: WebhookForwarder delivering to a live receiver",
                scenarios.profile_webhooks(mode.profile_seconds, logs),
                mode.profile_seconds,
                ("MainThread", "sippet-outbox"),
            ),
        )
    if profile:
        section(
            "profile of the end-to-end webhook path",
            lambda: endtoend_profile.report(mode.name, logs, mode.profile_seconds),
        )
    if footprints:
        rows += _footprint_rows(footprints)

    peers_used = [client for client, _ in clients if client.is_peer]
    report = "\n\n".join([_header(mode, peers_used, skipped), _table(rows), *profiles]) + "\n"
    print(report)
    (RESULTS / f"{mode.name}.md").write_text(report)
    (RESULTS / f"{mode.name}.json").write_text(
        json.dumps(
            {
                "mode": asdict(mode),
                "rows": [asdict(row) for row in rows],
                "clients": [c.key for c, _ in clients],
            },
            indent=2,
        )
    )
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
