"""The statements of the shared outbox (:mod:`.shared_outbox`), over the tables of the
store's migration 2 (:mod:`listener.cluster.schema`).

Every value travels as a parameter (``%(name)s``); a parameter that may be NULL carries a cast,
since PostgreSQL cannot infer the type of a bare NULL. Queries are assembled from this module's
own constants only (S608 is silenced for that reason).
"""

from __future__ import annotations

__all__ = [
    "ATTEMPT",
    "BURY",
    "CLAIM",
    "COMMIT",
    "COMMIT_LEASING",
    "COUNT_REPLAYABLE",
    "DEAD_LETTERS",
    "DISABLE",
    "ENABLE",
    "EVICT",
    "PENDING",
    "PRUNE",
    "RELEASE",
    "RELEASE_UNSURE",
    "RENEW",
    "REPLAY",
    "RESCHEDULE",
    "SELECT_ATTEMPTS",
    "STATS",
    "WHEREABOUTS",
]

_ROW = "d.outbox = %(outbox)s AND d.destination = %(destination)s"
_LEASE = "now() + make_interval(secs => %(ttl)s)"
# A pending row no instance holds (or whose holder's lease passed), of an enabled destination.
_FREE = f"""{_ROW} AND d.delivered_at IS NULL
    AND (d.lease_until IS NULL OR d.lease_until < now())"""
_ENABLED = """NOT EXISTS (
    SELECT 1 FROM sippet_destinations AS x
    WHERE x.outbox = d.outbox AND x.name = d.destination AND x.disabled_at IS NOT NULL)"""
# Per-call ordering: not while an earlier delivery of its call is pending, held or not,
# wherever it is held.
_IN_ORDER = """(d.call_key IS NULL OR NOT EXISTS (
    SELECT 1 FROM sippet_deliveries AS e
    WHERE e.outbox = d.outbox AND e.destination = d.destination AND e.call_key = d.call_key
        AND e.seq < d.seq AND e.delivered_at IS NULL))"""
_ELIGIBLE = {False: f"{_FREE} AND {_ENABLED}", True: f"{_FREE} AND {_ENABLED} AND {_IN_ORDER}"}
_DELIVERY = "d.seq, d.destination, d.msg_id, d.event, d.call_key, d.body, d.created_at, d.due_at"

# SKIP LOCKED: two instances claiming at once get disjoint rows and neither waits; the lease is
# set in the same statement, so a row is never locked past it. The statement's last row (its
# seq NULL) carries the earliest due time of the eligible rows left (those it took are held
# now, so not counted; ``picked``, read twice, is computed once). One statement in autocommit
# instead of a transaction of two: four round trips to the server became one, and a claim's
# p50 went from 1.90 to 0.88 ms (traced, one instance at 500 events/s; the end-to-end figure
# is at SharedOutbox.commit).
CLAIM = {
    per_call: f"""
WITH picked AS (
    SELECT d.seq FROM sippet_deliveries AS d
    WHERE {eligible} AND d.due_at <= %(now)s
    ORDER BY d.due_at, d.seq LIMIT %(limit)s
    FOR UPDATE OF d SKIP LOCKED),
taken AS (
    UPDATE sippet_deliveries AS d SET holder = %(holder)s, lease_until = {_LEASE}
    FROM picked WHERE d.seq = picked.seq
    RETURNING {_DELIVERY}, d.attempts)
SELECT *, NULL::float8 FROM taken
UNION ALL
SELECT NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, (
    SELECT min(d.due_at) FROM sippet_deliveries AS d
    WHERE {eligible} AND d.seq NOT IN (SELECT seq FROM picked))
"""  # noqa: S608
    for per_call, eligible in _ELIGIBLE.items()
}

# A batch's new rows and 2xx outcomes, as arrays (with no prepared statements, executemany
# parses and plans a statement once per row. Bought: a drain of 3,000 events to a loopback
# receiver went from 361-829/s to 569-1,762/s, three rounds side by side, a 2-core machine
# under a load of 10; the SQLite outbox 939-2,363/s in the same run), in one statement:
# atomic in autocommit, so a batch without failures needs no transaction around it (one
# round trip instead of four; the figure is at SharedOutbox.commit). A 2xx is a fact
# whoever holds the row now: it is delivered. The rows a 2xx concerns were committed before
# (claimed), so the update, which does not see this statement's inserts, finds them.
_INSERTED = """
    INSERT INTO sippet_deliveries
        (outbox, destination, msg_id, event, call_key, body, created_at, due_at)
    SELECT %(outbox)s, * FROM unnest(%(destination)s::text[], %(msg_id)s::text[],
        %(event)s::text[], %(call_key)s::text[], %(body)s::bytea[], %(created_at)s::float8[],
        %(due_at)s::float8[])
    ON CONFLICT DO NOTHING"""
_MARKED = """
UPDATE sippet_deliveries AS d SET delivered_at = u.at, last_attempt_at = u.at,
    last_status = u.status, last_error = NULL, last_latency = u.latency,
    last_answer = u.answer, last_probe = u.probe, holder = NULL, lease_until = NULL
FROM unnest(%(delivered_destination)s::text[], %(delivered_msg_id)s::text[], %(at)s::float8[],
    %(status)s::integer[], %(latency)s::float8[], %(answer)s::bytea[], %(probe)s::boolean[])
    AS u (destination, msg_id, at, status, latency, answer, probe)
WHERE d.outbox = %(outbox)s AND d.destination = u.destination AND d.msg_id = u.msg_id
    AND d.delivered_at IS NULL"""
COMMIT = f"WITH inserted AS ({_INSERTED}){_MARKED}"
# The same, when some of the new rows may be leased to the caller (``take``: its worker has
# room, and the row is due): they are leased as they are inserted, as CLAIM would lease them
# right after: not while their destination is disabled, and with ``per_call``, not while a
# row of their call is pending (the caller lets only the first row of a call in the batch
# ask). The statement returns the rows it leased (of those inserted: a row already stored is
# skipped, and not leased). Each test is in a statement only where a batch needs it: the
# planning took 0.30-0.37 ms with the per-call one, 0.20-0.26 ms without, 0.10-0.13 ms for
# COMMIT (EXPLAIN ANALYZE, two new rows and two 2xx, side by side, three runs). The rows go
# in in the arrays' order (their seq, which per-call ordering follows: no join here, which
# could reorder them). The figure this bought is at SharedOutbox.commit.
_IN_CALL_ORDER = """
        AND (NOT n.per_call OR n.call_key IS NULL OR NOT EXISTS (
            SELECT 1 FROM sippet_deliveries AS e
            WHERE e.outbox = %(outbox)s AND e.destination = n.destination
                AND e.call_key = n.call_key AND e.delivered_at IS NULL))"""
COMMIT_LEASING = {
    per_call: f"""
WITH new AS (
    SELECT n.*, n.take AND NOT EXISTS (
            SELECT 1 FROM sippet_destinations AS x
            WHERE x.outbox = %(outbox)s AND x.name = n.destination
                AND x.disabled_at IS NOT NULL){_IN_CALL_ORDER if per_call else ""} AS leased
    FROM unnest(%(destination)s::text[], %(msg_id)s::text[], %(event)s::text[],
        %(call_key)s::text[], %(body)s::bytea[], %(created_at)s::float8[],
        %(due_at)s::float8[], %(take)s::boolean[], %(per_call)s::boolean[])
        AS n (destination, msg_id, event, call_key, body, created_at, due_at, take, per_call)),
inserted AS (
    INSERT INTO sippet_deliveries
        (outbox, destination, msg_id, event, call_key, body, created_at, due_at, holder,
        lease_until)
    SELECT %(outbox)s, destination, msg_id, event, call_key, body, created_at, due_at,
        CASE WHEN leased THEN %(holder)s::text END, CASE WHEN leased THEN {_LEASE} END
    FROM new
    ON CONFLICT DO NOTHING
    RETURNING seq, destination, msg_id, holder),
marked AS ({_MARKED})
SELECT seq, destination, msg_id FROM inserted WHERE holder IS NOT NULL
"""  # noqa: S608
    for per_call in (False, True)
}
ATTEMPT = """
INSERT INTO sippet_attempts
    (outbox, destination, msg_id, at, latency, status, error_class, error, answer, probe,
    counted)
VALUES (%(outbox)s, %(destination)s, %(msg_id)s, %(at)s, %(latency)s, %(status)s::integer,
    %(error_class)s::text, %(error)s, %(answer)s, %(probe)s, %(counted)s)
"""
# A failure moves the row only while this instance holds it: one taken over after its lease
# passed is the new holder's to schedule.
_HELD = """outbox = %(outbox)s AND destination = %(destination)s AND msg_id = %(msg_id)s
    AND delivered_at IS NULL AND holder = %(holder)s"""
RESCHEDULE = f"""
UPDATE sippet_deliveries SET due_at = %(due_at)s, attempts = %(attempts)s,
    last_attempt_at = %(at)s, last_status = %(status)s::integer, last_error = %(error)s,
    holder = NULL, lease_until = NULL
WHERE {_HELD}
"""  # noqa: S608
_DEAD_COLUMNS = """seq, outbox, destination, msg_id, event, call_key, body, created_at, attempts,
    last_attempt_at, last_status, last_error, dead_at, reason"""
# A dead letter replaces one of the same id (the SQLite outbox's INSERT OR REPLACE).
_INTO_DEAD = f"""
INSERT INTO sippet_dead_letters ({_DEAD_COLUMNS})
SELECT seq, outbox, destination, msg_id, event, call_key, body, created_at, %s
FROM victims
ON CONFLICT (outbox, destination, msg_id) DO UPDATE SET seq = excluded.seq,
    event = excluded.event, call_key = excluded.call_key, body = excluded.body,
    created_at = excluded.created_at, attempts = excluded.attempts,
    last_attempt_at = excluded.last_attempt_at, last_status = excluded.last_status,
    last_error = excluded.last_error, dead_at = excluded.dead_at, reason = excluded.reason
"""  # noqa: S608
BURY = f"""
WITH victims AS (DELETE FROM sippet_deliveries WHERE {_HELD} RETURNING *)
{_INTO_DEAD % "%(attempts)s, %(at)s, %(status)s::integer, %(error)s, %(at)s, 'exhausted'"}
"""  # noqa: S608
# The bound: the oldest pending rows no instance holds (held ones are being attempted, and
# count towards max_pending); :limit NULL is every one older than :cutoff.
EVICT = f"""
WITH victims AS (
    DELETE FROM sippet_deliveries WHERE seq IN (
        SELECT d.seq FROM sippet_deliveries AS d
        WHERE {_FREE} AND d.created_at < %(cutoff)s
        ORDER BY d.seq LIMIT %(limit)s::bigint
        FOR UPDATE OF d SKIP LOCKED)
    RETURNING *)
{_INTO_DEAD % "attempts, last_attempt_at, last_status, last_error, %(now)s, %(reason)s"}
"""  # noqa: S608
RELEASE = """
UPDATE sippet_deliveries SET holder = NULL, lease_until = NULL
WHERE seq = ANY(%(seqs)s) AND holder = %(holder)s AND delivered_at IS NULL
"""
# The rows a commit whose answer was lost may have leased to this holder (SharedOutbox
# knows their ids, not their seqs).
RELEASE_UNSURE = """
UPDATE sippet_deliveries AS d SET holder = NULL, lease_until = NULL
FROM unnest(%(destinations)s::text[], %(msg_ids)s::text[]) AS u (destination, msg_id)
WHERE d.outbox = %(outbox)s AND d.destination = u.destination AND d.msg_id = u.msg_id
    AND d.holder = %(holder)s AND d.delivered_at IS NULL
"""
RENEW = f"""
UPDATE sippet_deliveries SET lease_until = {_LEASE}
WHERE seq = ANY(%(seqs)s) AND holder = %(holder)s AND delivered_at IS NULL
"""  # noqa: S608
PENDING = """
SELECT count(*) FROM sippet_deliveries
WHERE outbox = %(outbox)s AND destination = %(destination)s AND delivered_at IS NULL
"""
DISABLE = """
INSERT INTO sippet_destinations (outbox, name, disabled_at, disabled_reason)
VALUES (%(outbox)s, %(destination)s, %(at)s, %(reason)s)
ON CONFLICT (outbox, name) DO UPDATE SET disabled_at = excluded.disabled_at,
    disabled_reason = excluded.disabled_reason
WHERE sippet_destinations.disabled_at IS NULL
"""
ENABLE = """
UPDATE sippet_destinations SET disabled_at = NULL, disabled_reason = NULL
WHERE outbox = %(outbox)s AND name = %(destination)s AND disabled_at IS NOT NULL
"""
# Each destination's pending rows (``p``: count, oldest, failing), dead letters (``d``:
# count) and disabled state (``x``: when, why), in one statement: three round trips on the
# outbox's thread, which the commits wait behind, took the leader's thread 12.8 ms a second
# at 500 events/s, 19.6 ms at the longest (two instances traced).
STATS = """
SELECT 'p', destination, count(*), min(created_at), count(last_attempt_at), NULL::text
FROM sippet_deliveries WHERE outbox = %(outbox)s AND delivered_at IS NULL GROUP BY destination
UNION ALL
SELECT 'd', destination, count(*), NULL, NULL, NULL
FROM sippet_dead_letters WHERE outbox = %(outbox)s GROUP BY destination
UNION ALL
SELECT 'x', name, NULL, disabled_at, NULL, disabled_reason
FROM sippet_destinations WHERE outbox = %(outbox)s
"""

# The filters of listing and replaying dead and delivered rows; NULL means any. Times are
# the event's (when it was enqueued).
_FILTER = """outbox = %(outbox)s
    AND (%(destination)s::text IS NULL OR destination = %(destination)s::text)
    AND (%(since)s::float8 IS NULL OR created_at >= %(since)s::float8)
    AND (%(until)s::float8 IS NULL OR created_at < %(until)s::float8)
    AND (%(msg_ids)s::text[] IS NULL OR msg_id = ANY(%(msg_ids)s::text[]))"""
_DELIVERED = f"delivered_at IS NOT NULL AND {_FILTER}"
DEAD_LETTERS = f"""
SELECT seq, destination, msg_id, event, call_key, body, created_at, attempts, last_status,
    last_error, dead_at, reason
FROM sippet_dead_letters WHERE {_FILTER} ORDER BY seq LIMIT %(limit)s::bigint
"""  # noqa: S608
# A delivered row's 2xx, in the columns of an attempt.
_SUCCESS = """destination, msg_id, delivered_at, last_latency, last_status, NULL::text, '',
    coalesce(last_answer, ''::bytea), coalesce(last_probe, false), false"""
REPLAY = {
    "dead": (
        f"""
INSERT INTO sippet_deliveries
    (seq, outbox, destination, msg_id, event, call_key, body, created_at, due_at, attempts)
SELECT seq, outbox, destination, msg_id, event, call_key, body, created_at, %(now)s, 0
FROM sippet_dead_letters WHERE {_FILTER}
ON CONFLICT DO NOTHING
""",  # noqa: S608
        f"DELETE FROM sippet_dead_letters WHERE {_FILTER}",  # noqa: S608
    ),
    "delivered": (
        f"""
INSERT INTO sippet_attempts
    (outbox, destination, msg_id, at, latency, status, error_class, error, answer, probe,
    counted)
SELECT outbox, {_SUCCESS} FROM sippet_deliveries
WHERE last_latency IS NOT NULL AND {_DELIVERED}
""",  # noqa: S608
        f"""
UPDATE sippet_deliveries SET delivered_at = NULL, due_at = %(now)s, attempts = 0,
    last_attempt_at = NULL, last_status = NULL, last_error = NULL, last_latency = NULL,
    last_answer = NULL, last_probe = NULL, holder = NULL, lease_until = NULL
WHERE {_DELIVERED}
""",  # noqa: S608
    ),
}
COUNT_REPLAYABLE = {
    "dead": f"SELECT count(*) FROM sippet_dead_letters WHERE {_FILTER}",  # noqa: S608
    "delivered": f"SELECT count(*) FROM sippet_deliveries WHERE {_DELIVERED}",  # noqa: S608
}
# Failures on record and a delivered row's 2xx, in time order (a 2xx last among attempts of
# the same instant).
SELECT_ATTEMPTS = f"""
SELECT destination, msg_id, at, latency, status, error_class, error, answer, probe, counted
FROM (
    SELECT destination, msg_id, at, latency, status, error_class, error, answer, probe,
        counted, 0 AS kind, id
    FROM sippet_attempts WHERE outbox = %(outbox)s AND msg_id = %(msg_id)s
    UNION ALL
    SELECT {_SUCCESS}, 1, seq FROM sippet_deliveries
    WHERE outbox = %(outbox)s AND msg_id = %(msg_id)s AND delivered_at IS NOT NULL
        AND last_latency IS NOT NULL) AS timeline
ORDER BY at, kind, id
"""  # noqa: S608
WHEREABOUTS = """
SELECT CASE WHEN delivered_at IS NULL THEN 'pending' ELSE 'delivered' END, delivered_at
FROM sippet_deliveries
WHERE outbox = %(outbox)s AND destination = %(destination)s AND msg_id = %(msg_id)s
UNION ALL
SELECT 'dead', dead_at FROM sippet_dead_letters
WHERE outbox = %(outbox)s AND destination = %(destination)s AND msg_id = %(msg_id)s
"""
# Oldest first, at most :limit of each a call; rows another instance is pruning are skipped.
PRUNE = (
    """DELETE FROM sippet_attempts WHERE id IN (
        SELECT id FROM sippet_attempts WHERE outbox = %(outbox)s AND at < %(before)s
        ORDER BY at LIMIT %(limit)s FOR UPDATE SKIP LOCKED)""",
    """DELETE FROM sippet_deliveries WHERE seq IN (
        SELECT seq FROM sippet_deliveries
        WHERE outbox = %(outbox)s AND delivered_at < %(before)s
        ORDER BY delivered_at LIMIT %(limit)s FOR UPDATE SKIP LOCKED)""",
)
