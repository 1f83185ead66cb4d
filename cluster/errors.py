"""Error roots shared by every layer.

`ParseError` is the only exception a function named `*_untrusted` may raise.
`IkeError` subclasses carry the IKEv2 notify type that answers them on the wire.
"""

from __future__ import annotations


class ParseError(Exception):
    """Bytes from the network did not decode."""


class ConfigError(Exception):
    """Configuration is invalid; the message names file, key and reason."""


class IkeError(Exception):
    """A protocol failure that the peer is told about with a notify."""

    notify: int = 0  # set by subclasses; 0 means "no notify, drop silently"


class UnsupportedCriticalPayload(IkeError):
    notify = 1

    def __init__(self, payload_type: int) -> None:
        super().__init__(f"unsupported critical payload {payload_type}")
        self.payload_type = payload_type


class InvalidIkeSpi(IkeError):
    notify = 4


class InvalidMajorVersion(IkeError):
    notify = 5


class InvalidSyntax(IkeError):
    notify = 7


class InvalidMessageId(IkeError):
    notify = 9


class InvalidSpi(IkeError):
    notify = 11


class NoProposalChosen(IkeError):
    notify = 14


class InvalidKePayload(IkeError):
    notify = 17

    def __init__(self, group: int) -> None:
        super().__init__(f"initiator must use DH group {group}")
        self.group = group


class Redirected(IkeError):
    """RFC 5685 4: we send the initiator to another gateway instead of answering."""

    notify = 16407  # REDIRECT

    def __init__(self, data: bytes, gateway: str) -> None:
        super().__init__(f"redirected to {gateway}")
        self.data = data


class AuthenticationFailed(IkeError):
    notify = 24


class SinglePairRequired(IkeError):
    notify = 34


class NoAdditionalSas(IkeError):
    notify = 35


class InternalAddressFailure(IkeError):
    notify = 36


class FailedCpRequired(IkeError):
    notify = 37


class TsUnacceptable(IkeError):
    notify = 38


class InvalidSelectors(IkeError):
    notify = 39


class TemporaryFailure(IkeError):
    notify = 43


class ChildSaNotFound(IkeError):
    notify = 44


class IntegrityCheckFailed(IkeError):
    """SK payload did not authenticate: RFC 7296 2.21.2 says drop silently."""

    notify = 0


class NoKeyExchange(IkeError):
    """A CREATE_CHILD_SA without the KE payload its chosen proposal needs."""

    notify = 17
