"""The domain a feedback record belongs to: its proto value and its metric/log label.

The one place that maps a domain name to `FeedbackRecord.domain` and back, so a change of
how the record names its domain (an enum today) touches only this file.
"""
from __future__ import annotations

from protos.feedback.v1 import feedback_pb2


def domain_value(domain: int | str) -> int:
    """A feedback_pb2.Domain value from the value itself, its name, or the short name ("fraud")."""
    if isinstance(domain, str):
        name = domain.upper()
        if not name.startswith("DOMAIN_"):
            name = "DOMAIN_" + name
        try:
            value = feedback_pb2.Domain.Value(name)
        except ValueError:
            raise ValueError(f"unknown domain {domain!r}") from None
    else:
        value = int(domain)
        if value not in feedback_pb2.Domain.values():
            raise ValueError(f"unknown domain {domain!r}")
    if value == feedback_pb2.DOMAIN_UNSPECIFIED:
        raise ValueError("domain must not be DOMAIN_UNSPECIFIED")
    return value


def domain_label(value: int) -> str:
    """The short name of a domain_value ("fraud"): the `domain` label of the feedback metrics."""
    return feedback_pb2.Domain.Name(value)[len("DOMAIN_"):].lower()
