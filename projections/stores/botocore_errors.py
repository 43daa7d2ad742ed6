"""Translation of botocore errors into :mod:`projections.errors` (classified by :mod:`kernel.aws_errors`)."""

from __future__ import annotations

from botocore.exceptions import BotoCoreError, ClientError

from kernel.aws_errors import ErrorKind, classify, error_code
from projections.errors import (
    ChangeRejected,
    StoreError,
    StoreMisconfigured,
    StoreThrottled,
    StoreUnavailable,
)

_STORE_ERRORS = {
    ErrorKind.THROTTLED: StoreThrottled,
    ErrorKind.UNAVAILABLE: StoreUnavailable,
    ErrorKind.MISCONFIGURED: StoreMisconfigured,
    ErrorKind.REJECTED: ChangeRejected,
    ErrorKind.OTHER: StoreError,
}


def translate(error: BotoCoreError | ClientError, *, store: str, operation: str) -> StoreError:
    """Our error for a botocore one; callers ``raise translate(e, …) from e``."""
    failure = classify(error)
    detail = f"{failure.code}: {failure.message}" if isinstance(error, ClientError) else f"{failure.code}: {error}"
    message = f"{store} {operation} failed: {detail}"
    return _STORE_ERRORS[failure.kind](message, store=store, operation=operation, code=failure.code)


__all__ = ["error_code", "translate"]
