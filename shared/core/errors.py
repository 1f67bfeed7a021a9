"""Why a request is refused. Each class is one row of the seed's response table; the edges
(REST and SOAP) turn them into their own wire format and status (api/errors.py), so the
wording lives here once and no HTTP status lives here at all."""

from __future__ import annotations

UNAUTHORIZED_CODE = "0x7000000"
UNAUTHORIZED_MESSAGE = "Request is unauthorized, missing or wrong credentials"
MORE_INFO_URL = "http://support.uniphore.com"
PROVIDER_NOT_DEFINED = (
    "Your Telephony provider is not defined, please contact Uniphore Support "
    "and read the following +link+"
)


class RequestRefused(Exception):
    """A request the service answers with a documented error, never with a stack trace."""

    @property
    def text(self) -> str:
        """What the caller is told (the seed's wording)."""
        return str(self)

    @property
    def detail(self) -> str:
        """Why, for the log: more specific than what the caller is told."""
        return self.text


class InvalidParameter(RequestRefused):
    """A header, path or body field is missing or cannot be used."""

    def __init__(self, parameter: str) -> None:
        self.parameter = parameter
        super().__init__(f"missing or invalid parameter {parameter}")


class Unauthenticated(RequestRefused):
    """Credentials missing or wrong. `reason` goes to the Unauthenticated-Reason header."""

    def __init__(self, reason: str) -> None:
        self.reason = reason
        super().__init__(UNAUTHORIZED_MESSAGE)

    @property
    def detail(self) -> str:
        return self.reason


class TokenExpired(RequestRefused):
    """The interaction token expired, or the campaign is inactive or outside its validity."""

    def __init__(self, why: str) -> None:
        self.why = why
        super().__init__("Token expired")

    @property
    def detail(self) -> str:
        return self.why


class CampaignNotFound(RequestRefused):
    """No campaign with that id in the account's environment."""

    def __init__(self, campaign_id: str) -> None:
        self.campaign_id = campaign_id
        super().__init__(f"Campaign {campaign_id} was not found")


class MessageNotFound(RequestRefused):
    """No message with that sid in the caller's account."""

    def __init__(self, sid: str) -> None:
        super().__init__(f"Message {sid} was not found")


class BatchNotFound(RequestRefused):
    """No bulk batch with that id in the caller's account."""

    def __init__(self, batch_id: str) -> None:
        super().__init__(f"Batch {batch_id} was not found")


class BodyTooLarge(RequestRefused):
    """A body past a route's own limit (the bulk send's), in the words of the API's 413."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        super().__init__(f"request body too large: at most {limit} bytes")


class TooManyRecipients(RequestRefused):
    """A bulk request past SMSD_BULK_MAX_RECIPIENTS: nothing of it is stored."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        super().__init__(f"too many recipients: at most {limit} in one request")


class ProviderNotDefined(RequestRefused):
    """The account (and the system account) has no usable telephony provider settings."""

    def __init__(self, why: str) -> None:
        self.why = why
        super().__init__(PROVIDER_NOT_DEFINED)

    @property
    def detail(self) -> str:
        return self.why


class IdempotencyConflict(RequestRefused):
    """An Idempotency-Key was reused with a different request."""

    def __init__(self) -> None:
        super().__init__("Idempotency-Key was already used with a different request")
