"""Every domain error maps to exactly one intended gRPC status code."""

from __future__ import annotations

import grpc
import pytest

from core import errors
from server.status import STATUS_CODES, status_code


@pytest.mark.parametrize("cls", errors.ALL_ERRORS, ids=lambda c: c.__name__)
def test_every_error_class_is_in_the_table(cls: type[errors.KilnError]) -> None:
    assert cls in STATUS_CODES
    assert status_code(cls("boom")) is STATUS_CODES[cls]
    assert status_code(cls("boom")) is not grpc.StatusCode.OK


@pytest.mark.parametrize(
    ("cls", "code"),
    [
        (errors.InvalidInputError, grpc.StatusCode.INVALID_ARGUMENT),
        (errors.NotFoundError, grpc.StatusCode.NOT_FOUND),
        (errors.UnavailableError, grpc.StatusCode.UNAVAILABLE),
        (errors.ResourceExhaustedError, grpc.StatusCode.RESOURCE_EXHAUSTED),
        (errors.PermissionDeniedError, grpc.StatusCode.PERMISSION_DENIED),
        (errors.ConflictError, grpc.StatusCode.FAILED_PRECONDITION),
        (errors.MissingDependencyError, grpc.StatusCode.FAILED_PRECONDITION),
        (errors.KilnError, grpc.StatusCode.INTERNAL),
    ],
)
def test_codes_are_the_documented_ones(cls: type[errors.KilnError], code: grpc.StatusCode) -> None:
    assert status_code(cls("x")) is code


def test_subclass_uses_its_nearest_mapped_ancestor() -> None:
    class DrainingError(errors.UnavailableError):
        pass

    assert status_code(DrainingError("draining")) is grpc.StatusCode.UNAVAILABLE


def test_non_kiln_exception_is_internal() -> None:
    assert status_code(RuntimeError("bug")) is grpc.StatusCode.INTERNAL
