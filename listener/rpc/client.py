"""The Sippet HTTP RPC client: ``POST /rpc/public/run`` and ``POST /rpc/public/validate``.

Every request is one JSON object, ``{"action": ..., <payload keys>}``, sent with the secret key in
``x-api-key``. Sippet answers HTTP 200 both when an action succeeds,
``{"success": true, "data": ...}``, and when it fails, ``{"success": false, "errors": [...]}``;
the latter becomes :class:`~listener.RpcActionError`. Any other answer, and any transport
failure that outlived its retries, becomes :class:`~listener.RpcError`.

Retries never repeat a side effect unasked. A request that certainly never left (connect errors,
connect and pool timeouts) is retried for every action. A request that may have reached Sippet
(read timeouts, dropped connections, HTTP 408/429/502/503/504) is retried only for pure reads (see
:attr:`listener.rpc.catalog.ActionSpec.mutating`), or when the caller passes ``retry_unsafe=True``
because the action is idempotent for them.

The API key is sent and never logged: log lines carry the action, path, status and attempt only.
"""

from __future__ import annotations

from collections.abc import AsyncGenerator, Mapping, Sequence
from dataclasses import dataclass
from types import TracebackType
from typing import Any, Self

import httpx
import structlog
from tenacity import (
    AsyncRetrying,
    RetryCallState,
    retry_if_exception,
    stop_after_attempt,
)

from listener.core.errors import RpcActionError, RpcError, RpcInputError
from listener.core.httputil import USER_AGENT
from listener.core.metrics import RPC_CALLS
from listener.core.retry import (
    AUTH_STATUSES,
    RETRYABLE_STATUSES,
    BackoffPolicy,
    TenacityWait,
    retry_after_seconds,
)
from listener.rpc.catalog import CATALOG, check_request

__all__ = ["RpcClient", "ValidationResult"]

log = structlog.get_logger(__name__)

_RUN = "/rpc/public/run"
_VALIDATE = "/rpc/public/validate"

# Raised before a byte of the request was written: resending cannot repeat anything.
_UNSENT = (httpx.ConnectError, httpx.ConnectTimeout, httpx.PoolTimeout)
# The request may have been written, even processed: resend only what is safe to repeat.
# (LocalProtocolError, ProxyError and UnsupportedProtocol are ours to fix; retrying won't help.)
_MAYBE_SENT = (httpx.TimeoutException, httpx.NetworkError, httpx.RemoteProtocolError)


@dataclass(frozen=True, slots=True)
class ValidationResult:
    """Sippet's verdict on a payload sent to ``/rpc/public/validate``.

    Attributes:
        ok: True when Sippet would accept the payload.
        errors: every ``AshRpcError`` object Sippet returned when ``ok`` is False, else empty.
    """

    ok: bool
    errors: list[dict[str, Any]]


class _StatusError(RpcError):
    """Sippet answered with a status worth retrying (408, 429, 502, 503, 504)."""

    def __init__(self, action: str, status: int, retry_after: float | None) -> None:
        super().__init__(f"rpc {action} failed: HTTP {status}")
        self.status = status
        self.retry_after = retry_after


class RpcClient:
    """A pooled, keep-alive client for Sippet's HTTP RPC API.

    Use it as ``async with RpcClient(...) as rpc:`` or call :meth:`aclose` when done. One client
    serves any number of concurrent calls.

    Args:
        base_url: Sippet's API origin, ``https://api.sippet.ai``; a trailing slash is ignored.
        api_key: the secret key sent as ``x-api-key``.
        timeout: seconds allowed for each HTTP attempt (connect, write, read and pool wait).
        http: an ``httpx.AsyncClient`` to send through; the caller keeps ownership and closes
            it. Without one the client creates and closes its own.
        max_attempts: attempts per call, first one included; 1 disables retries.
        backoff_initial: the delay ceiling before the second attempt, in seconds; it doubles per
            attempt up to *backoff_max*, and each delay is drawn at random below its ceiling.
        backoff_max: the largest backoff delay. A ``Retry-After`` is honoured up to four times it.

    Raises:
        ValueError: *max_attempts* is below 1.
    """

    def __init__(
        self,
        base_url: str,
        api_key: str,
        *,
        timeout: float = 15.0,
        http: httpx.AsyncClient | None = None,
        max_attempts: int = 4,
        backoff_initial: float = 0.2,
        backoff_max: float = 5.0,
    ) -> None:
        if max_attempts < 1:
            raise ValueError("max_attempts must be at least 1")
        self._base_url = base_url.rstrip("/")
        self._headers = {
            "content-type": "application/json",
            "x-api-key": api_key,
            "user-agent": USER_AGENT,
        }
        self._timeout = timeout
        self._owns_http = http is None
        self._http = httpx.AsyncClient(timeout=timeout) if http is None else http
        self._max_attempts = max_attempts
        # Full jitter: clients failing together do not retry together.
        # Honour Retry-After, but never sleep for minutes on a server's say-so.
        self._wait = TenacityWait(
            BackoffPolicy(initial=backoff_initial, cap=backoff_max, jitter=1.0),
            cap=backoff_max * 4,
        )

    def __repr__(self) -> str:
        return f"RpcClient({self._base_url!r})"

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        """Close the connection pool, unless it was passed in by the caller."""
        if self._owns_http:
            await self._http.aclose()

    async def run(
        self,
        action: str,
        *,
        input: Mapping[str, Any] | None = None,
        identity: Any = None,
        fields: Sequence[Any] | None = None,
        filter: Mapping[str, Any] | None = None,
        sort: str | None = None,
        page: Mapping[str, Any] | None = None,
        metadata_fields: Sequence[str] | None = None,
        retry_unsafe: bool = False,
        unchecked: bool = False,
    ) -> Any:
        """Run one action and return its result.

        Only the payload keys given (not None) are sent, under their wire names
        (``metadata_fields`` is sent as ``metadataFields``).

        Args:
            action: the action's wire name, ``list_contacts``.
            input: the input object, camelCase field names (``{"callUuid": ...}``).
            identity: the record to act on, usually its id.
            fields: the fields to return (field selections may nest objects).
            filter: the filter object.
            sort: the sort string (``"-insertedAt"``).
            page: ``{"limit", "offset", "count"}`` or ``{"limit", "after", "before"}``.
            metadata_fields: the metadata fields to return.
            retry_unsafe: also retry a mutating action after a failure that may have reached
                Sippet; pass it only when running the action twice is harmless.
            unchecked: send without checking the payload against the catalog, for actions
                Sippet added after this catalog was written. Unknown actions count as mutating.

        Returns:
            The envelope's ``data``, exactly as decoded from JSON.

        Raises:
            RpcInputError: the payload failed the catalog check; nothing was sent.
            RpcActionError: Sippet answered ``{"success": false}``.
            RpcError: the key was refused (HTTP 401/403), Sippet answered another non-2xx status
                or something that is not an RPC envelope, or the transport failed.
        """
        payload = _payload(action, identity, input, fields, filter, sort, page, metadata_fields)
        if not unchecked:
            check_request(action, payload)
        spec = CATALOG.get(action)
        retry_sent = retry_unsafe or (spec is not None and not spec.mutating)
        try:
            response = await self._post(action, _RUN, payload, retry_sent=retry_sent)
            body = _envelope(action, response)
        except RpcError:
            RPC_CALLS.labels(action=action, outcome="failed").inc()
            raise
        if not body["success"]:
            RPC_CALLS.labels(action=action, outcome="error").inc()
            error = RpcActionError(action, _errors(body))
            log.debug("rpc action error", action=action, type=error.type)
            raise error
        RPC_CALLS.labels(action=action, outcome="ok").inc()
        return body.get("data")

    async def validate(
        self,
        action: str,
        *,
        input: Mapping[str, Any] | None = None,
        identity: Any = None,
        fields: Sequence[Any] | None = None,
        filter: Mapping[str, Any] | None = None,
        sort: str | None = None,
        page: Mapping[str, Any] | None = None,
        metadata_fields: Sequence[str] | None = None,
        unchecked: bool = False,
    ) -> ValidationResult:
        """Ask Sippet whether it would accept a payload, without running the action.

        The payload is built as for :meth:`run`. Locally only the action name and the key names
        are checked: missing keys and input fields are exactly what Sippet's answer is for (and
        its validators take no ``fields``).

        Returns:
            ``ValidationResult(ok=True, errors=[])`` or ``ok=False`` with Sippet's errors.

        Raises:
            RpcInputError: unknown action or payload key (unless *unchecked*); nothing was sent.
            RpcError: as for :meth:`run`; a rejected payload is an answer, not an error.
        """
        payload = _payload(action, identity, input, fields, filter, sort, page, metadata_fields)
        if not unchecked:
            check_request(action, payload, complete=False)
        # Validation changes nothing on the server, so it is always safe to resend.
        response = await self._post(action, _VALIDATE, payload, retry_sent=True)
        body = _envelope(action, response)
        if body["success"]:
            return ValidationResult(ok=True, errors=[])
        return ValidationResult(ok=False, errors=_errors(body))

    async def pages(
        self,
        action: str,
        *,
        fields: Sequence[Any],
        input: Mapping[str, Any] | None = None,
        filter: Mapping[str, Any] | None = None,
        sort: str | None = None,
        page_size: int = 100,
        keyset: bool = False,
        unchecked: bool = False,
    ) -> AsyncGenerator[dict[str, Any], None]:
        """Yield every item of a list action, one page request at a time.

        Offset mode sends ``page: {limit, offset}``, advancing *offset* by the items received.
        Keyset mode sends ``page: {limit}``, then ``page: {limit, after: <nextPage>}``. Both stop
        when a page says ``hasMore: false``. An action that takes no ``page`` (``list_calls``) is
        run once and its plain list yielded, and so is a plain list returned for a page request.
        Each page is a :meth:`run` call, with its checks and retries.

        Args:
            action: a list action's wire name.
            fields: the fields to return for each item.
            input: the input object, for list actions that take one.
            filter: the filter object.
            sort: the sort string.
            page_size: the ``limit`` of each page request.
            keyset: use keyset (cursor) pagination instead of offsets.
            unchecked: as for :meth:`run`; an unknown action is asked for pages.

        Yields:
            Each item (a JSON object) in the order Sippet returned them.

        Raises:
            RpcInputError: *page_size* is below 1, or the catalog check failed.
            RpcError: a reply is not a list or page of objects, or a page claims more items but
                gives no way to fetch them; anything :meth:`run` raises.
        """
        if page_size < 1:
            raise RpcInputError(f"{action}: page_size must be at least 1, not {page_size}")
        spec = CATALOG.get(action)
        paginated = spec is None or spec.paginated
        page: dict[str, Any] = {"limit": page_size} if keyset else {"limit": page_size, "offset": 0}
        while True:
            data = await self.run(
                action,
                input=input,
                fields=fields,
                filter=filter,
                sort=sort,
                page=page if paginated else None,
                unchecked=unchecked,
            )
            if isinstance(data, list):
                for item in _items(action, data):
                    yield item
                return
            if not isinstance(data, dict):
                raise RpcError(f"rpc {action} failed: the reply is not a page")
            results = _items(action, data.get("results"))
            for item in results:
                yield item
            if not data.get("hasMore"):
                return
            page = _next_page(action, page, data, len(results))

    async def _post(
        self, action: str, path: str, payload: dict[str, Any], *, retry_sent: bool
    ) -> httpx.Response:
        """POST the request with retries; see the module docstring for what is retried."""

        def retryable(exc: BaseException) -> bool:
            if isinstance(exc, _UNSENT):
                return True
            return retry_sent and isinstance(exc, (_StatusError, *_MAYBE_SENT))

        def log_retry(state: RetryCallState) -> None:
            exc = state.outcome.exception() if state.outcome else None
            wait = state.next_action.sleep if state.next_action else 0.0
            log.info(
                "rpc retry",
                action=action,
                attempt=state.attempt_number,
                wait=round(wait, 3),
                reason=_describe(exc),
            )

        retrying = AsyncRetrying(
            stop=stop_after_attempt(self._max_attempts),
            wait=self._wait,
            retry=retry_if_exception(retryable),
            before_sleep=log_retry,
            reraise=True,
        )
        body = {"action": action, **payload}
        try:
            response: httpx.Response = await retrying(self._send, action, path, body)
        except httpx.HTTPError as exc:
            raise RpcError(f"rpc {action} failed: {_describe(exc)}") from exc
        return response

    async def _send(self, action: str, path: str, body: dict[str, Any]) -> httpx.Response:
        """Send one attempt; raise :class:`_StatusError` for a status worth retrying."""
        log.debug("> rpc", action=action, path=path)
        response = await self._http.post(
            self._base_url + path, json=body, headers=self._headers, timeout=self._timeout
        )
        log.debug("< rpc", action=action, path=path, status=response.status_code)
        # The explicit "not now" statuses only: another 5xx is the action's answer (it broke),
        # and sending it again would run it again.
        if response.status_code in RETRYABLE_STATUSES:
            raise _StatusError(action, response.status_code, retry_after_seconds(response.headers))
        return response


def _payload(
    action: str,
    identity: Any,
    input: Mapping[str, Any] | None,
    fields: Sequence[Any] | None,
    filter: Mapping[str, Any] | None,
    sort: str | None,
    page: Mapping[str, Any] | None,
    metadata_fields: Sequence[str] | None,
) -> dict[str, Any]:
    """Return the payload keys that were given, by wire name, in the reference order.

    Raises:
        RpcInputError: *fields* or *metadata_fields* is a string, which would go out as letters.
    """
    for name, names in (("fields", fields), ("metadata_fields", metadata_fields)):
        if isinstance(names, str):
            raise RpcInputError(f"{action}: {name} must be a list of names, not a string")
    given = {
        "identity": identity,
        "input": None if input is None else dict(input),
        "fields": None if fields is None else list(fields),
        "filter": None if filter is None else dict(filter),
        "sort": sort,
        "page": None if page is None else dict(page),
        "metadataFields": None if metadata_fields is None else list(metadata_fields),
    }
    return {key: value for key, value in given.items() if value is not None}


def _envelope(action: str, response: httpx.Response) -> dict[str, Any]:
    """Return the decoded RPC envelope of a response, or raise :class:`RpcError`."""
    status = response.status_code
    if status in AUTH_STATUSES:
        raise RpcError(f"rpc {action} refused: HTTP {status}: the api key was not accepted")
    if not response.is_success:
        raise RpcError(f"rpc {action} failed: HTTP {status}")
    try:
        body = response.json()
    except ValueError as exc:
        raise RpcError(f"rpc {action} failed: HTTP {status}: the reply is not JSON") from exc
    if not isinstance(body, dict) or not isinstance(body.get("success"), bool):
        raise RpcError(f"rpc {action} failed: HTTP {status}: the reply is not an rpc envelope")
    return body


def _errors(body: dict[str, Any]) -> list[dict[str, Any]]:
    """Return the error objects of a ``success: false`` envelope."""
    raw = body.get("errors")
    return [error for error in raw if isinstance(error, dict)] if isinstance(raw, list) else []


def _items(action: str, data: object) -> list[dict[str, Any]]:
    """Return *data* as a list of objects, or raise :class:`RpcError`."""
    items = [item for item in data if isinstance(item, dict)] if isinstance(data, list) else []
    if not isinstance(data, list) or len(items) != len(data):
        raise RpcError(f"rpc {action} failed: the reply is not a list of objects")
    return items


def _next_page(
    action: str, page: dict[str, Any], data: dict[str, Any], received: int
) -> dict[str, Any]:
    """Return the ``page`` key for the page after *data*, which said ``hasMore: true``."""
    if "offset" in page:
        # Advancing by what arrived, not by the limit, loses nothing if Sippet caps the limit;
        # an empty page that claims more would loop for ever.
        if received == 0:
            raise RpcError(f"rpc {action} failed: an empty page says it has more")
        return {"limit": page["limit"], "offset": page["offset"] + received}
    cursor = data.get("nextPage")
    if not isinstance(cursor, str) or not cursor or cursor == page.get("after"):
        raise RpcError(
            f"rpc {action} failed: a keyset page says it has more but gives no new nextPage"
        )
    return {"limit": page["limit"], "after": cursor}


def _describe(exc: BaseException | None) -> str:
    """Describe a failure in a few words, for messages and logs."""
    if isinstance(exc, _StatusError):
        return f"HTTP {exc.status}"
    text = str(exc)
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__
