"""What a botocore error means for the caller, decided by error code in one place.

Every adapter that calls AWS (the read-model stores, the tailer's publisher, the config
server's stream reader) classifies failures here and raises its own error type from the
result, never matching message text.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

from botocore.exceptions import BotoCoreError, ClientError, HTTPClientError
from botocore.exceptions import ConnectionError as BotoConnectionError


class ErrorKind(enum.Enum):
    #: Slow down and retry: the service is protecting itself.
    THROTTLED = "throttled"
    #: Retry: the service or the network failed, not the request.
    UNAVAILABLE = "unavailable"
    #: Retrying cannot help until someone fixes the setup (a missing table, credentials).
    MISCONFIGURED = "misconfigured"
    #: This request can never succeed as sent.
    REJECTED = "rejected"
    OTHER = "other"


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
        "LimitExceededException",  # Kinesis and DynamoDB: too many concurrent requests
        "KMSThrottlingException",
    }
)
UNAVAILABLE_CODES = frozenset(
    {
        "InternalServerError",
        "InternalFailure",
        "InternalFailureException",
        "ServiceUnavailable",
        "ServiceUnavailableException",
        "InternalError",
        "RequestTimeout",
        "RequestTimeoutException",
    }
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
        "InvalidArgumentException",
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


@dataclass(frozen=True, slots=True)
class AwsFailure:
    """A classified botocore error: its kind, the service's code, the HTTP status and message."""

    kind: ErrorKind
    code: str
    status: int
    message: str

    @property
    def retryable(self) -> bool:
        return self.kind in (ErrorKind.THROTTLED, ErrorKind.UNAVAILABLE)


def error_code(error: ClientError) -> str:
    return str(error.response.get("Error", {}).get("Code", ""))


def classify(error: BotoCoreError | ClientError) -> AwsFailure:
    """The meaning of a botocore error, by its code (or its class, for transport errors)."""
    if isinstance(error, ClientError):
        code = error_code(error)
        status = int(error.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0) or 0)
        message = str(error.response.get("Error", {}).get("Message", ""))
        if code in THROTTLING_CODES:
            kind = ErrorKind.THROTTLED
        elif code in UNAVAILABLE_CODES or status >= 500:
            kind = ErrorKind.UNAVAILABLE
        elif code in MISCONFIGURED_CODES:
            kind = ErrorKind.MISCONFIGURED
        elif code in REJECTED_CODES:
            kind = ErrorKind.REJECTED
        else:
            kind = ErrorKind.OTHER
        return AwsFailure(kind, code, status, message)
    kind = ErrorKind.UNAVAILABLE if isinstance(error, HTTPClientError | BotoConnectionError) else ErrorKind.OTHER
    return AwsFailure(kind, type(error).__name__, 0, str(error))
