"""The client loads CA certificates only when a request could use TLS (they cost ~50 ms)."""

from __future__ import annotations

import ssl

import pytest

from shoal_client.client import _tls_for


@pytest.fixture(autouse=True)
def _no_proxy(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("http_proxy", "https_proxy", "all_proxy"):
        monkeypatch.delenv(name, raising=False)
        monkeypatch.delenv(name.upper(), raising=False)


def test_an_https_requester_gets_httpx_default_verification() -> None:
    assert _tls_for("https://requester.example:1234") is True


def test_a_plain_http_requester_gets_a_context_that_trusts_nothing() -> None:
    context = _tls_for("http://127.0.0.1:1234")
    assert isinstance(context, ssl.SSLContext)
    assert context.verify_mode is ssl.CERT_REQUIRED
    assert context.check_hostname
    assert context.get_ca_certs() == []


@pytest.mark.parametrize("name", ["HTTPS_PROXY", "http_proxy", "ALL_PROXY"])
def test_behind_a_proxy_the_default_verification_stays(
    monkeypatch: pytest.MonkeyPatch, name: str
) -> None:
    monkeypatch.setenv(name, "https://proxy.example:3128")
    assert _tls_for("http://127.0.0.1:1234") is True
