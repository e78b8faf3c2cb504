"""Kiln's domain errors: one small hierarchy shared by builders/ and server/.

Each class maps to one gRPC status code (``server/status.py``) and one CLI exit code
(``server/cli``). Messages say what failed, show the offending value and say what to do.
"""

from __future__ import annotations


class KilnError(Exception):
    """Base of every error Kiln raises on purpose."""


class InvalidInputError(KilnError):
    """The caller gave something unusable: a bad model file, argument, tensor or config."""


class NotFoundError(KilnError):
    """A model, version, route, file or other named thing does not exist."""


class UnavailableError(KilnError):
    """Something exists but cannot serve right now (loading, upstream down, draining)."""


class ResourceExhaustedError(KilnError):
    """A size, queue or capacity limit was hit."""


class MissingDependencyError(KilnError):
    """An optional dependency (TensorRT, Polygraphy, a GPU) is absent on this machine."""


class RepositoryError(KilnError):
    """The model repository is unwritable, inconsistent or fails verification."""


class AccuracyGateError(KilnError):
    """A candidate engine lost more accuracy than allowed, so it was not published."""


class IncompatibleEngineError(KilnError):
    """An engine was built for another TensorRT version or GPU than this machine has."""


class PermissionDeniedError(KilnError):
    """A control-plane request lacked valid credentials."""


class UnauthenticatedError(PermissionDeniedError):
    """The request carried no credentials, or wrong ones (HTTP 401, gRPC UNAUTHENTICATED)."""


class ConflictError(KilnError):
    """The request conflicts with current state (e.g. a rollout already running)."""


ALL_ERRORS: tuple[type[KilnError], ...] = (
    KilnError,
    InvalidInputError,
    NotFoundError,
    UnavailableError,
    ResourceExhaustedError,
    MissingDependencyError,
    RepositoryError,
    AccuracyGateError,
    IncompatibleEngineError,
    PermissionDeniedError,
    UnauthenticatedError,
    ConflictError,
)
