"""Errors of input fetching: what was wrong with which input, and whether retrying can help."""

from __future__ import annotations

from shoal_common.errors import ShoalError


class InputError(ShoalError):
    """The job's input is wrong (bad CID, path outside the allow-list, too big): retrying
    the same job elsewhere would fail the same way."""

    code = "input_invalid"
    http_status = 400
    retryable = False


class InputUnavailable(ShoalError):
    """The input could not be fetched right now (unreachable URL or store): another attempt,
    perhaps on another node, may succeed."""

    code = "input_unavailable"
    http_status = 503
    retryable = True
