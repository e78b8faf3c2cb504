"""The one table from Kiln's domain errors to gRPC status codes, used at the protocol edge.

``status_code(err)`` looks up the most specific class of ``err`` in ``STATUS_CODES``; the
servicer's error decorator and the gateway both use it, so an error means the same everywhere.
"""

from __future__ import annotations

import grpc

from core import errors

STATUS_CODES: dict[type[errors.KilnError], grpc.StatusCode] = {
    errors.KilnError: grpc.StatusCode.INTERNAL,
    errors.InvalidInputError: grpc.StatusCode.INVALID_ARGUMENT,
    errors.NotFoundError: grpc.StatusCode.NOT_FOUND,
    errors.UnavailableError: grpc.StatusCode.UNAVAILABLE,
    errors.ResourceExhaustedError: grpc.StatusCode.RESOURCE_EXHAUSTED,
    errors.MissingDependencyError: grpc.StatusCode.FAILED_PRECONDITION,
    errors.RepositoryError: grpc.StatusCode.FAILED_PRECONDITION,
    errors.AccuracyGateError: grpc.StatusCode.FAILED_PRECONDITION,
    errors.IncompatibleEngineError: grpc.StatusCode.FAILED_PRECONDITION,
    errors.PermissionDeniedError: grpc.StatusCode.PERMISSION_DENIED,
    errors.UnauthenticatedError: grpc.StatusCode.UNAUTHENTICATED,
    errors.ConflictError: grpc.StatusCode.FAILED_PRECONDITION,
}


def status_code(err: BaseException) -> grpc.StatusCode:
    """gRPC status code of the most specific Kiln error class of ``err`` (INTERNAL otherwise)."""
    for cls in type(err).__mro__:
        code = STATUS_CODES.get(cls)  # type: ignore[call-overload]
        if code is not None:
            return code
    return grpc.StatusCode.INTERNAL
