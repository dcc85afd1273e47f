"""Errors the domain core raises, each tied to the gRPC status a client should see.

The core never imports grpc for its failures: it raises one of these, and the server
interceptor (shared.server.interceptors) turns it into `context.abort(code, message)`.
Anything else escaping a handler is a bug and becomes INTERNAL with the request id.
"""
from __future__ import annotations

import grpc


# The longest status message a caller is sent. Messages travel in trailing metadata, which
# gRPC bounds (16 KiB by default, all headers together): a message over it reaches the client
# as RESOURCE_EXHAUSTED, which clients retry, instead of the real status. Echoing a client's
# input (10,000 unknown feature names) must never get there, whatever a handler puts in it.
MAX_MESSAGE_CHARS = 1024
# How much of one client-provided value (a name, a list of names, a value) a message echoes.
MAX_ECHO_CHARS = 200


def shorten(text: object, limit: int = MAX_ECHO_CHARS) -> str:
    """str(text), cut to at most `limit` characters with a marker saying how much was left out."""
    s = text if isinstance(text, str) else str(text)
    if len(s) <= limit:
        return s
    marker = f"... ({len(s) - limit} more characters)"
    return s[: max(0, limit - len(marker))] + marker if limit > len(marker) else s[:limit]


def echo_names(names, limit: int = 5, each: int = 64) -> str:
    """A few client-provided names for a message: the count, then at most `limit` of them,
    each cut to `each` characters ("3 names: 'a', 'b', 'c'")."""
    names = list(names)
    shown = ", ".join(repr(shorten(n, each)) for n in names[:limit])
    more = f", ... ({len(names) - limit} more)" if len(names) > limit else ""
    return f"{len(names)}: {shown}{more}"


class ServiceError(Exception):
    """A failure with a definite gRPC status and a message meant for the caller.

    The message is capped at MAX_MESSAGE_CHARS here, once for every handler: callers should
    still shorten() what they echo, so that the cap never cuts the useful part."""

    code: grpc.StatusCode = grpc.StatusCode.INTERNAL

    def __init__(self, message: str) -> None:
        message = shorten(message, MAX_MESSAGE_CHARS)
        super().__init__(message)
        self.message = message


class InvalidArgument(ServiceError):
    code = grpc.StatusCode.INVALID_ARGUMENT


class NotFound(ServiceError):
    code = grpc.StatusCode.NOT_FOUND


class Unavailable(ServiceError):
    code = grpc.StatusCode.UNAVAILABLE


class ResourceExhausted(ServiceError):
    code = grpc.StatusCode.RESOURCE_EXHAUSTED


class DeadlineExceeded(ServiceError):
    code = grpc.StatusCode.DEADLINE_EXCEEDED


class FailedPrecondition(ServiceError):
    code = grpc.StatusCode.FAILED_PRECONDITION


class ModelOutputError(ServiceError):
    """The model produced no trustworthy answer for this request: a non-finite value (NaN,
    +inf) or a value outside the range the service declares for that output.

    UNAVAILABLE, not INTERNAL: it is not a bug in a handler, and the request itself passed
    validation, so INVALID_ARGUMENT would blame the caller for the model. What a caller
    should do is what it does for an unavailable replica: use its fallback (for fraud:
    never treat it as ALLOW), or retry with backoff, which may reach a replica or version
    that answers (a version producing such outputs is a candidate for rollback). Counted in
    storefront_model_output_errors_total.
    """

    code = grpc.StatusCode.UNAVAILABLE
