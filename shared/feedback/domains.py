"""The domain a feedback record belongs to: its registered name, which is also its metric/log label.

Domains are plug-ins: a record names its domain by the name the domain registers
(FeedbackRecord.domain, feedback.proto), [a-z][a-z0-9_]{0,31}, e.g. "fraud". The runtime keeps
no list of them; the trainer checks the name against the domain plug-ins it loaded.
"""
from __future__ import annotations

import re

DOMAIN_NAME = re.compile(r"[a-z][a-z0-9_]{0,31}\Z")


def domain_value(domain: str) -> str:
    """FeedbackRecord.domain for a domain: its registered name, checked; ValueError when it is not one."""
    if not isinstance(domain, str) or not DOMAIN_NAME.match(domain):
        raise ValueError(f"domain {str(domain)[:40]!r}: expected a registered domain name, [a-z][a-z0-9_]{{0,31}}")
    return domain


def domain_label(value: str) -> str:
    """The `domain` label of the feedback metrics: the domain's name."""
    return value
