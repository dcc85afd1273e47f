"""Errors the domain core raises, each tied to the gRPC status a client should see.

The core never imports grpc for its failures: it raises one of these, and the server
interceptor (shared.server.interceptors) turns it into `context.abort(code, message)`.
Anything else escaping a handler is a bug and becomes INTERNAL with the request id.
"""
from __future__ import annotations

import grpc


class ServiceError(Exception):
    """A failure with a definite gRPC status and a message meant for the caller."""

    code: grpc.StatusCode = grpc.StatusCode.INTERNAL

    def __init__(self, message: str) -> None:
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
