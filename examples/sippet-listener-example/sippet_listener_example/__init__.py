"""An example sippet-listener plugin: missed-call follow-up and a call summary line.

Installed, it offers two handlers by name (entry points of the ``sippet_listener.handlers``
group): ``use = "missed_calls"`` (:class:`MissedCalls`) and ``use = "call_summary"``
(:func:`call_summary`).
"""

from __future__ import annotations

from sippet_listener_example.missed import MissedCalls, MissedCallsConfig
from sippet_listener_example.summary import call_summary

__all__ = ["MissedCalls", "MissedCallsConfig", "call_summary"]
