"""One classification of botocore errors, by code, for every AWS adapter."""

from __future__ import annotations

import pytest
from botocore.exceptions import ClientError, EndpointConnectionError, NoCredentialsError

from kernel.aws_errors import ErrorKind, classify


def client_error(code: str, status: int = 400) -> ClientError:
    return ClientError({"Error": {"Code": code, "Message": "m"}, "ResponseMetadata": {"HTTPStatusCode": status}}, "Op")


@pytest.mark.parametrize(
    ("code", "status", "kind"),
    [
        ("ProvisionedThroughputExceededException", 400, ErrorKind.THROTTLED),
        ("ThrottlingException", 400, ErrorKind.THROTTLED),
        ("LimitExceededException", 400, ErrorKind.THROTTLED),
        ("InternalFailure", 500, ErrorKind.UNAVAILABLE),
        ("SomethingNew", 503, ErrorKind.UNAVAILABLE),
        ("ResourceNotFoundException", 400, ErrorKind.MISCONFIGURED),
        ("ValidationException", 400, ErrorKind.REJECTED),
        ("SomethingNew", 400, ErrorKind.OTHER),
    ],
)
def test_client_errors_by_code(code: str, status: int, kind: ErrorKind) -> None:
    failure = classify(client_error(code, status))
    assert (failure.kind, failure.code, failure.status) == (kind, code, status)
    assert failure.retryable == (kind in (ErrorKind.THROTTLED, ErrorKind.UNAVAILABLE))


def test_transport_errors_are_unavailable_others_are_not_retried() -> None:
    assert classify(EndpointConnectionError(endpoint_url="http://127.0.0.1:9")).kind is ErrorKind.UNAVAILABLE
    assert classify(NoCredentialsError()).kind is ErrorKind.OTHER
