"""Translation of botocore errors into :mod:`projections.errors`, by error code, in one place."""

from __future__ import annotations

from botocore.exceptions import BotoCoreError, ClientError, HTTPClientError
from botocore.exceptions import ConnectionError as BotoConnectionError

from projections.errors import (
    ChangeRejected,
    StoreError,
    StoreMisconfigured,
    StoreThrottled,
    StoreUnavailable,
)

THROTTLING_CODES = frozenset(
    {
        "ThrottlingException",
        "Throttling",
        "ThrottledException",
        "RequestLimitExceeded",
        "ProvisionedThroughputExceededException",
        "TooManyRequestsException",
        "TooManyUpdates",  # SSM: concurrent updates of one parameter
        "SlowDown",
    }
)
UNAVAILABLE_CODES = frozenset(
    {"InternalServerError", "InternalFailure", "ServiceUnavailable", "InternalError", "RequestTimeout"}
)
MISCONFIGURED_CODES = frozenset(
    {
        "ResourceNotFoundException",
        "AccessDeniedException",
        "AccessDenied",
        "UnrecognizedClientException",
        "InvalidSignatureException",
        "IncompleteSignature",
        "MissingAuthenticationToken",
        "ExpiredTokenException",
        "InvalidClientTokenId",
    }
)
REJECTED_CODES = frozenset(
    {
        "ValidationException",
        "SerializationException",
        "ItemCollectionSizeLimitExceededException",
        # SSM
        "ParameterLimitExceeded",
        "ParameterMaxVersionLimitExceeded",
        "HierarchyLevelLimitExceededException",
        "HierarchyTypeMismatchException",
        "InvalidAllowedPatternException",
        "UnsupportedParameterType",
        "ParameterPatternMismatchException",
    }
)


def error_code(error: ClientError) -> str:
    return str(error.response.get("Error", {}).get("Code", ""))


def translate(error: BotoCoreError | ClientError, *, store: str, operation: str) -> StoreError:
    """Our error for a botocore one; callers ``raise translate(e, …) from e``."""
    if isinstance(error, ClientError):
        code = error_code(error)
        status = int(error.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0) or 0)
        message = f"{store} {operation} failed: {code}: {error.response.get('Error', {}).get('Message', '')}"
        if code in THROTTLING_CODES:
            return StoreThrottled(message, store=store, operation=operation, code=code)
        if code in UNAVAILABLE_CODES or status >= 500:
            return StoreUnavailable(message, store=store, operation=operation, code=code)
        if code in MISCONFIGURED_CODES:
            return StoreMisconfigured(message, store=store, operation=operation, code=code)
        if code in REJECTED_CODES:
            return ChangeRejected(message, store=store, operation=operation, code=code)
        return StoreError(message, store=store, operation=operation, code=code)
    message = f"{store} {operation} failed: {type(error).__name__}: {error}"
    if isinstance(error, (HTTPClientError, BotoConnectionError)):
        return StoreUnavailable(message, store=store, operation=operation, code=type(error).__name__)
    return StoreError(message, store=store, operation=operation, code=type(error).__name__)
