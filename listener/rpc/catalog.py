"""Every Sippet RPC action this client knows, as data, and the local request check.

Sippet documents two generations of its public RPC actions:

* ``legacy``: the older table of 38 actions with their input objects
  (``reference/rpc-actions-summary.txt``);
* ``current``: the 52 actions of the full function reference, each with its payload keys, an
  example body and its input type (``reference/rpc-actions-full.txt``).

:data:`CATALOG` is their union. An action found in both keeps the *current* payload keys and input
type and lists both generations. Payload keys are written as the references write them:
``fields, filter?, sort?, page?``, where ``?`` marks an optional key. Input fields use the same
notation with the camelCase names of the input types.

:func:`check_request` is pure: it looks at a payload before it is sent and raises
:class:`~listener.RpcInputError` for mistakes Sippet would reject anyway. It does not
reject *unknown input fields*: input types grow over time and Sippet judges those itself.
"""

from __future__ import annotations

import difflib
from collections.abc import Mapping
from dataclasses import dataclass
from types import MappingProxyType

from listener.core.errors import RpcInputError

__all__ = [
    "CATALOG",
    "CURRENT",
    "LEGACY",
    "PAYLOAD_KEYS",
    "ActionSpec",
    "check_request",
]

CURRENT = "current"
LEGACY = "legacy"

#: Every payload key of the RPC wire format besides ``action``, in the order the reference
#: example bodies use.
PAYLOAD_KEYS = ("identity", "input", "fields", "filter", "sort", "page", "metadataFields")


@dataclass(frozen=True, slots=True)
class ActionSpec:
    """What one RPC action accepts.

    Attributes:
        name: the wire name (``end_call``).
        keys: the payload keys it takes (``input``, ``identity``, ``fields``, ``filter``,
            ``sort``, ``page``, ``metadataFields``).
        required_keys: the keys it cannot do without.
        required_input: the ``input`` fields it cannot do without (camelCase); empty when the
            input type has none or is not documented.
        input_fields: every documented ``input`` field; empty when there is no input type.
        generations: ``{"current"}``, ``{"legacy"}`` or both.
        mutating: False only for pure reads, which are safe to send twice.
    """

    name: str
    keys: frozenset[str]
    required_keys: frozenset[str]
    required_input: frozenset[str]
    input_fields: frozenset[str]
    generations: frozenset[str]
    mutating: bool

    @property
    def paginated(self) -> bool:
        """Whether the action takes a ``page`` key (offset or keyset pagination)."""
        return "page" in self.keys


_BOTH = frozenset({CURRENT, LEGACY})
_NEW = frozenset({CURRENT})
_OLD = frozenset({LEGACY})

_PAGED = "fields, filter?, sort?, page?"
_LISTED = "fields, filter?, sort?"

# One row per action: (name, generations, payload keys, input fields). For an action in both
# generations the row holds the current keys and input type; where the legacy ones differ, the
# comment on the row says how.
_TABLE: tuple[tuple[str, frozenset[str], str, str], ...] = (
    # Calls.
    ("list_calls", _BOTH, _LISTED, ""),
    (
        "create_call",
        _BOTH,
        "input, fields?",
        "direction, fromNumber, toNumber, sipUsername?, callUuid, callSource?,"
        " outboundTrunkSource?, status?, conversationId?, startedAt?, answeredAt?,"
        " mediaQualifiedAt?, callerSpokeAt?",
    ),
    ("flag_call_for_review", _NEW, "identity, fields?", ""),
    ("clear_call_review_flag", _NEW, "identity, fields?", ""),
    ("call_codec", _BOTH, "input", "callUuid"),
    ("barge_call", _BOTH, "input", "callUuid"),
    ("issue_operator_media_access", _NEW, "input", "callUuid"),
    ("resume_ai_call", _BOTH, "input", "callUuid"),
    ("transfer_call_to_queue", _NEW, "input", "callUuid"),
    ("leave_call", _NEW, "input", "callUuid, reason?"),
    ("end_call", _BOTH, "input", "callUuid"),
    # Legacy: "input" was required, with contactId and aiAgentId.
    ("start_outbound_call", _BOTH, "input?", "contactId?, phoneNumber?, aiAgentId?"),
    (
        "start_bulk_outbound_call",
        _NEW,
        "input?",
        "contactIds?, groupId?, aiAgentId?, concurrency?, contactLimit?, contactRangeStart?,"
        " contactRangeEnd?",
    ),
    ("list_bulk_outbound_calls", _NEW, _PAGED, ""),
    ("list_bulk_outbound_call_entries", _NEW, _PAGED, ""),
    ("list_call_participants", _BOTH, _PAGED, ""),
    ("list_call_transcripts", _BOTH, _PAGED, ""),
    # Legacy: also took "page".
    ("list_call_ai_audit_events", _BOTH, _LISTED, ""),
    ("list_call_classifications", _NEW, _LISTED, ""),
    ("override_call_classification", _NEW, "identity, input, fields?", "label"),
    ("clear_call_classification_override", _NEW, "identity, fields?", ""),
    ("issue_sip_access", _OLD, "input", "callUuid"),
    ("revoke_sip_access", _OLD, "input", "callUuid, reason?"),
    ("list_gateways", _OLD, _PAGED, ""),
    ("list_phone_numbers", _OLD, _PAGED, ""),
    # Queues.
    ("list_queues", _OLD, _PAGED, ""),
    ("list_call_queue_entries", _BOTH, _PAGED, ""),
    # Legacy: "identity, input, fields?" with a required input.operatorName.
    ("accept_call_queue_entry", _BOTH, "identity, fields?", ""),
    ("get_call_queue_entry", _BOTH, "input, fields", "id"),
    # Operators.
    ("list_operator_statuses", _BOTH, _PAGED, ""),
    ("set_operator_status", _BOTH, "input, fields?", "sipUserId, status?, source?"),
    ("list_operator_status_events", _OLD, _PAGED, ""),
    ("issue_operator_access_token", _NEW, "input", "operatorEmail"),
    ("issue_operator_sip_access", _OLD, "none", ""),
    # Conversations.
    ("list_conversations", _BOTH, _PAGED, ""),
    ("create_conversation", _OLD, "input?, fields?", "channel?, mode?, metadata?, aiAgentId?"),
    (
        "update_conversation",
        _OLD,
        "identity, input?, fields?",
        "status?, mode?, metadata?, aiAgentId?",
    ),
    ("list_conversation_items", _OLD, _PAGED, ""),
    ("list_conversation_items_by_public_id", _OLD, "input, fields, filter?, sort?", "publicId"),
    ("list_conversation_events", _NEW, _LISTED, ""),
    # Contacts.
    ("list_contacts", _BOTH, _PAGED, ""),
    (
        "create_contact",
        _BOTH,
        "input, fields?",
        "fullName, email?, emailVerifiedAt?, dateOfBirth?, phoneE164?, phoneVerifiedAt?,"
        " defaultLanguage?, languages?, metadata?, privateMetadataKeys?",
    ),
    (
        "update_contact",
        _BOTH,
        "identity, input, fields?",
        "fullName?, email?, emailVerifiedAt?, dateOfBirth?, phoneE164?, phoneVerifiedAt?,"
        " defaultLanguage?, languages?, metadata?, privateMetadataKeys?",
    ),
    ("archive_contact", _NEW, "identity, fields?", ""),
    # Legacy: "identity" only.
    ("delete_contact", _BOTH, "input, fields", "contactId"),
    # Campaigns.
    ("list_campaigns", _NEW, "none", ""),
    ("get_campaign", _NEW, "input", "id"),
    # AI agents.
    ("list_ai_agents", _BOTH, _PAGED, ""),
    # Email.
    ("list_email_classifications", _NEW, _LISTED, ""),
    ("list_email_mailboxes", _NEW, _PAGED, ""),
    (
        "create_email_mailbox",
        _NEW,
        "input, fields?",
        "inboundDomain, mxTarget?, listenerEnabled?, listenerStatus?, listenerHost?,"
        " listenerPort?, tlsMode?, maxSessions?, lastInboundAt?, metadata?, organisationId",
    ),
    (
        "update_email_mailbox",
        _NEW,
        "identity, input, fields?",
        "inboundDomain?, mxTarget?, listenerEnabled?, listenerStatus?, listenerHost?,"
        " listenerPort?, tlsMode?, maxSessions?, lastInboundAt?, metadata?",
    ),
    ("delete_email_mailbox", _NEW, "identity", ""),
    (
        "import_inbound_email",
        _NEW,
        "input, fields",
        "recipientAddress, rawMime?, structuredPayload?, receivedAt?",
    ),
    ("list_email_templates", _NEW, _PAGED, ""),
    (
        "create_email_template",
        _NEW,
        "input, fields?",
        "model, name, subject, body, variables?, active?",
    ),
    (
        "update_email_template",
        _NEW,
        "identity, input, fields?",
        "model?, name?, subject?, body?, variables?, active?",
    ),
    ("delete_email_template", _NEW, "identity", ""),
    ("list_email_identities", _NEW, _PAGED, ""),
    (
        "create_email_identity",
        _NEW,
        "input, fields?",
        "ownerType, ownerId, localPart, domain, displayName?, active?, defaultOutbound?,"
        " metadata?, emailMailboxId?, organisationId",
    ),
    (
        "update_email_identity",
        _NEW,
        "identity, input, fields?",
        "ownerType?, ownerId?, localPart?, domain?, displayName?, active?, defaultOutbound?,"
        " metadata?, emailMailboxId?",
    ),
    ("delete_email_identity", _NEW, "identity", ""),
    # Account, team and wallet.
    ("who_am_i", _BOTH, "fields", ""),
    ("sign_in_with_password", _OLD, "input, fields, metadataFields?", "email, password"),
    ("confirm_email", _OLD, "input", "token"),
    ("logout", _OLD, "none", ""),
    (
        "accept_team_invitation",
        _OLD,
        "input",
        "token, fullName?, password?, passwordConfirmation?",
    ),
    ("organisation_wallet_summary", _OLD, "none", ""),
)

# Pure reads: every list_* and get_* action, plus three whose names do not say so. who_am_i and
# organisation_wallet_summary only report. call_codec takes nothing but a callUuid, so it has no
# value it could set: it reports the call's codec. Everything else (and any action this catalog
# does not know) counts as mutating, so that a retry cannot end, bill or create twice.
_READ_PREFIXES = ("list_", "get_")
_OTHER_READS = frozenset({"who_am_i", "organisation_wallet_summary", "call_codec"})


def _parse(notation: str) -> tuple[frozenset[str], frozenset[str]]:
    """Split ``"a, b?"`` into (all names, required names)."""
    if notation in ("", "none"):
        return frozenset(), frozenset()
    names = [part.strip() for part in notation.split(",")]
    return (
        frozenset(name.rstrip("?") for name in names),
        frozenset(name for name in names if not name.endswith("?")),
    )


def _build(row: tuple[str, frozenset[str], str, str]) -> ActionSpec:
    """Turn one table row into an :class:`ActionSpec`."""
    name, generations, keys_text, input_text = row
    keys, required_keys = _parse(keys_text)
    input_fields, required_input = _parse(input_text)
    return ActionSpec(
        name=name,
        keys=keys,
        required_keys=required_keys,
        required_input=required_input,
        input_fields=input_fields,
        generations=generations,
        mutating=not (name.startswith(_READ_PREFIXES) or name in _OTHER_READS),
    )


#: Every known action by wire name, read-only.
CATALOG: Mapping[str, ActionSpec] = MappingProxyType({row[0]: _build(row) for row in _TABLE})


def check_request(
    action: str, payload_keys: Mapping[str, object], *, complete: bool = True
) -> None:
    """Check an RPC payload against the catalog before it is sent.

    Args:
        action: the action's wire name.
        payload_keys: the payload as it will be sent, by wire key (``input``,
            ``metadataFields``, ...), without ``action``. A key whose value is None counts as
            absent, and so does an ``input`` field set to None.
        complete: when False, only the action name and the key names are checked; missing keys
            and input fields are left to the server (``/rpc/public/validate`` answers those).

    Raises:
        RpcInputError: the action is unknown (the message suggests close names), the payload has
            a key the action does not take, or lacks a required key or ``input`` field.
    """
    spec = CATALOG.get(action)
    if spec is None:
        raise RpcInputError(_unknown_action(action))
    given = {key for key, value in payload_keys.items() if value is not None}
    extra = sorted(given - spec.keys)
    if extra:
        raise RpcInputError(_unknown_key(spec, extra[0]))
    if not complete:
        return
    missing = [key for key in PAYLOAD_KEYS if key in spec.required_keys and key not in given]
    if missing:
        raise RpcInputError(f"{action}: {_join(missing)} {_are(missing)} required")
    value = payload_keys.get("input")
    if value is None:
        return
    if not isinstance(value, Mapping):
        raise RpcInputError(f"{action}: input must be an object, not {type(value).__name__}")
    absent = sorted(f"input.{name}" for name in spec.required_input if value.get(name) is None)
    if absent:
        raise RpcInputError(f"{action}: {_join(absent)} {_are(absent)} required")


def _unknown_action(action: str) -> str:
    """Say that *action* is unknown, with close names and the escape hatch."""
    close = difflib.get_close_matches(action, CATALOG, n=3)
    hint = f" (did you mean {_join([repr(c) for c in close], 'or')}?)" if close else ""
    return f"unknown rpc action {action!r}{hint}; pass unchecked=True to send it anyway"


def _unknown_key(spec: ActionSpec, key: str) -> str:
    """Say that *spec* does not take payload key *key*."""
    taken = [name for name in PAYLOAD_KEYS if name in spec.keys]
    takes = f"it takes {', '.join(taken)}" if taken else "it takes no keys"
    if key in PAYLOAD_KEYS:
        return f"{spec.name}: payload key {key!r} is not taken by this action; {takes}"
    close = difflib.get_close_matches(key, PAYLOAD_KEYS, n=1)
    hint = f" (did you mean {close[0]!r}?)" if close else ""
    return f"{spec.name}: {key!r} is not a payload key{hint}; {takes}"


def _join(names: list[str], last: str = "and") -> str:
    """Join names for a message: ``a``, ``a and b``, ``a, b and c``."""
    if len(names) == 1:
        return names[0]
    return f"{', '.join(names[:-1])} {last} {names[-1]}"


def _are(names: list[str]) -> str:
    """Return the verb agreeing with *names*."""
    return "is" if len(names) == 1 else "are"
