"""Identity and request signing against the official SDK's own code and recorded requests."""

from __future__ import annotations

import base64
import contextlib
import hashlib
import importlib
import json
import os
import stat
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
from Crypto.PublicKey import RSA
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from hypothesis import given, settings
from hypothesis import strategies as st

from shoal_common import signing
from shoal_common.signing import (
    MSG_BAD_ENVELOPE,
    MSG_BAD_PAYLOAD,
    MSG_BAD_SIGNATURE,
    MSG_CLIENT_ID_MISMATCH,
    MSG_NO_CLIENT_ID,
    MSG_NO_PAYLOAD,
    ClientKey,
    ClientKeyError,
    SignatureError,
    SignedEnvelopeError,
    client_id_of_public_key,
    raw_members,
    sign_envelope,
    verify_signed_envelope,
)

# ../shared beside the project holds the reference material (shared/README.md).
REFERENCE_DIR = Path(
    os.environ.get("SHOAL_REFERENCE_DIR")
    or Path(__file__).resolve().parents[3].parent / "shared" / "reference"
)
RECORDED = json.loads((REFERENCE_DIR / "recorded_requests.json").read_text(encoding="utf-8"))

SIGNED_EXCHANGES = [
    pytest.param(exchange, id=f"sdk{session['bacalhau-sdk']}-{index}-{exchange['check'][:40]}")
    for session in RECORDED["sessions"]
    for index, exchange in enumerate(session["exchanges"])
    if "signature" in exchange["request_body"]
]
REJECTED_BY_SIGNING = {MSG_BAD_SIGNATURE, MSG_CLIENT_ID_MISMATCH}


def _recorded_message(exchange: dict[str, Any]) -> str | None:
    body = exchange["response_body"]
    message = body.get("Message") if isinstance(body, dict) else None
    return message if message in REJECTED_BY_SIGNING else None


def _payload_client_id(payload: dict[str, Any]) -> str:
    # bacalhau-airflow sends lower-case keys.
    return str(payload.get("ClientID", payload.get("clientid")))


# ---------------------------------------------------------------------------------------------
# Recorded requests from the official SDK


@pytest.mark.parametrize("exchange", SIGNED_EXCHANGES)
def test_recorded_signed_request_verifies_as_the_reference_answered(
    exchange: dict[str, Any],
) -> None:
    body = exchange["request_body_raw"].encode("utf-8")
    expected_error = _recorded_message(exchange)

    if expected_error is not None:
        with pytest.raises(SignatureError) as caught:
            verify_signed_envelope(body)
        assert str(caught.value) == expected_error
        return

    verified = verify_signed_envelope(body)
    sent = exchange["request_body"]
    assert verified.payload == sent["payload"]
    assert verified.public_key_b64 == sent["client_public_key"]
    assert verified.signature == sent["signature"]
    assert verified.client_id == _payload_client_id(sent["payload"])
    assert verified.client_id == client_id_of_public_key(sent["client_public_key"])
    # The SDK signs json.dumps(payload) and sends json.dumps(envelope): same text.
    assert verified.payload_raw == json.dumps(sent["payload"])
    assert verified.payload_raw.encode("utf-8") in body


def test_exactly_the_tampered_requests_fail_the_signature_check() -> None:
    for session in RECORDED["sessions"]:
        failures = []
        for exchange in session["exchanges"]:
            if "signature" not in exchange["request_body"]:
                continue
            try:
                verify_signed_envelope(exchange["request_body_raw"].encode("utf-8"))
            except SignatureError as exc:
                failures.append((exchange["check"], str(exc)))
        assert failures == [
            ("submit_bad_signature_rejected (payload changed after signing)", MSG_BAD_SIGNATURE),
            ("submit_client_id_mismatch_rejected", MSG_CLIENT_ID_MISMATCH),
        ]


def test_recorded_client_ids_match_the_jobs_the_reference_created() -> None:
    checked = 0
    for session in RECORDED["sessions"]:
        for exchange in session["exchanges"]:
            job = exchange["response_body"].get("job")
            if exchange["path"] != "/requester/submit" or job is None:
                continue
            verified = verify_signed_envelope(exchange["request_body_raw"].encode("utf-8"))
            assert verified.client_id == job["Metadata"]["ClientID"]
            checked += 1
    assert checked >= 4


@pytest.mark.parametrize("exchange", SIGNED_EXCHANGES)
def test_recorded_keys_and_signatures_have_the_sdk_shape(exchange: dict[str, Any]) -> None:
    key = exchange["request_body"]["client_public_key"]
    assert len(key) == 360
    assert key.startswith("MIIBCgKCAQEA")
    assert len(exchange["request_body"]["signature"]) == 344


# ---------------------------------------------------------------------------------------------
# Our keys and envelopes


@pytest.fixture(scope="module")
def key() -> ClientKey:
    return ClientKey.generate()


@pytest.fixture(scope="module")
def other_key() -> ClientKey:
    return ClientKey.generate()


SUBMIT_PAYLOAD: dict[str, Any] = RECORDED["sessions"][0]["exchanges"][0]["request_body"]["payload"]


def _submit_payload(client_id: str) -> dict[str, Any]:
    return {**SUBMIT_PAYLOAD, "ClientID": client_id}


def test_generated_key_round_trips_through_sign_and_verify(key: ClientKey) -> None:
    payload = _submit_payload(key.client_id)
    body = sign_envelope(key, payload)

    verified = verify_signed_envelope(body)

    assert verified.payload == payload
    assert verified.client_id == key.client_id
    assert verified.public_key_b64 == key.public_key_b64
    assert body == json.dumps(
        {
            "client_public_key": key.public_key_b64,
            "payload": payload,
            "signature": verified.signature,
        }
    ).encode("utf-8")


def test_sign_envelope_escapes_non_ascii_like_the_sdk(key: ClientKey) -> None:
    payload = {"ClientID": key.client_id, "Note": "héllo <&> ☃ \U0001f41f"}
    body = sign_envelope(key, payload)

    assert body.isascii()
    assert verify_signed_envelope(body).payload == payload


def test_identity_shape(key: ClientKey) -> None:
    numbers = key.private_key.private_numbers().public_numbers
    assert key.private_key.key_size == 2048
    assert numbers.e == 65537
    assert key.client_id == hashlib.sha256(numbers.n.to_bytes(256, "big")).hexdigest()
    assert len(key.public_key_b64) == 360
    assert key.public_key_b64.startswith("MIIBCgKCAQEA")
    assert client_id_of_public_key(key.public_key_b64) == key.client_id
    assert len(key.sign(b"x")) == 344
    assert key.client_id in repr(key)
    assert "PRIVATE" not in repr(key)


def test_go_style_compact_payload_verifies_over_its_raw_bytes(key: ClientKey) -> None:
    # Go clients sign compact json.Marshal output with HTML escapes and raw UTF-8; re-serialising
    # in Python would not reproduce these bytes, the raw member does.
    payload_text = (
        '{"ClientID":"' + key.client_id + '","JobID":"j\\u003c1\\u003e","Reason":"café ☃"}'
    )
    body = (
        '{"payload":'
        + payload_text
        + ',"signature":"'
        + key.sign(payload_text.encode("utf-8"))
        + '","client_public_key":"'
        + key.public_key_b64
        + '"}\n'
    ).encode("utf-8")

    verified = verify_signed_envelope(body)

    assert verified.payload_raw == payload_text
    assert verified.payload == {"ClientID": key.client_id, "JobID": "j<1>", "Reason": "café ☃"}


def _envelope(
    payload_text: str,
    *,
    key: ClientKey,
    signed_text: str | None = None,
    public_key: str | None = None,
    signature: Any = None,
    payload_key: str = "payload",
) -> bytes:
    if signature is None:
        signature = key.sign((payload_text if signed_text is None else signed_text).encode())
    members = [
        f'"client_public_key": {json.dumps(public_key or key.public_key_b64)}',
        f'"{payload_key}": {payload_text}',
        f'"signature": {json.dumps(signature)}',
    ]
    return ("{" + ", ".join(members) + "}").encode("utf-8")


def _spki_b64(key: ClientKey) -> str:
    der = key.private_key.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return base64.b64encode(der).decode()


def _cid(key: ClientKey) -> str:
    return json.dumps({"ClientID": key.client_id})


# Each case builds a body from (key, other_key) and names the message Go answered with.
ERROR_CASES: dict[str, tuple[Callable[[ClientKey, ClientKey], bytes], str]] = {
    "not json": (lambda k, o: b"not json", MSG_BAD_ENVELOPE),
    "not an object": (lambda k, o: b"[1, 2]", MSG_BAD_ENVELOPE),
    "truncated": (lambda k, o: _envelope(_cid(k), key=k)[:-1], MSG_BAD_ENVELOPE),
    "trailing data": (lambda k, o: _envelope(_cid(k), key=k) + b"x", MSG_BAD_ENVELOPE),
    "invalid utf-8": (lambda k, o: b'{"payload": "\xff"}', MSG_BAD_ENVELOPE),
    "duplicate payload": (
        lambda k, o: _envelope(_cid(k), key=k)[:-1] + b', "payload": {}}',
        MSG_BAD_ENVELOPE,
    ),
    "payload in two casings": (
        lambda k, o: _envelope(_cid(k), key=k)[:-1] + b', "Payload": {}}',
        MSG_BAD_ENVELOPE,
    ),
    "signature not a string": (
        lambda k, o: _envelope(_cid(k), key=k, signature=5),
        MSG_BAD_ENVELOPE,
    ),
    "no payload": (
        lambda k, o: json.dumps({"client_public_key": k.public_key_b64, "signature": "x"}).encode(),
        MSG_NO_PAYLOAD,
    ),
    "null payload": (lambda k, o: _envelope("null", key=k, signed_text="null"), MSG_NO_PAYLOAD),
    "tampered": (
        lambda k, o: _envelope(_cid(k), key=k, signed_text=_cid(k).replace(": ", ":")),
        MSG_BAD_SIGNATURE,
    ),
    "signed by another key": (
        lambda k, o: _envelope(_cid(k), key=k, signature=o.sign(_cid(k).encode())),
        MSG_BAD_SIGNATURE,
    ),
    "signature not base64": (
        lambda k, o: _envelope(_cid(k), key=k, signature="not base64!"),
        MSG_BAD_SIGNATURE,
    ),
    "signature not ascii": (
        lambda k, o: _envelope(_cid(k), key=k, signature="☃☃☃☃"),
        MSG_BAD_SIGNATURE,
    ),
    "signature missing": (
        lambda k, o: json.dumps({"client_public_key": k.public_key_b64, "payload": {}}).encode(),
        MSG_BAD_SIGNATURE,
    ),
    "public key missing": (
        lambda k, o: json.dumps({"payload": {}, "signature": k.sign(b"{}")}).encode(),
        MSG_BAD_SIGNATURE,
    ),
    "public key as SubjectPublicKeyInfo": (
        lambda k, o: _envelope(_cid(k), key=k, public_key=_spki_b64(k)),
        MSG_BAD_SIGNATURE,
    ),
    "public key garbage": (
        lambda k, o: _envelope(_cid(k), key=k, public_key="AAAA"),
        MSG_BAD_SIGNATURE,
    ),
    # Order: a tampered payload fails on the signature even though its client id is wrong too.
    "tampered and wrong client id": (
        lambda k, o: _envelope(_cid(o), key=k, signed_text=_cid(k)),
        MSG_BAD_SIGNATURE,
    ),
    "payload not an object": (lambda k, o: _envelope("[1, 2]", key=k), MSG_BAD_PAYLOAD),
    "client id not a string": (lambda k, o: _envelope('{"ClientID": 5}', key=k), MSG_BAD_PAYLOAD),
    "client id in two casings": (
        lambda k, o: _envelope(
            json.dumps({"ClientID": k.client_id, "clientid": k.client_id}), key=k
        ),
        MSG_BAD_PAYLOAD,
    ),
    "no client id": (lambda k, o: _envelope('{"JobID": "j"}', key=k), MSG_NO_CLIENT_ID),
    "empty client id": (lambda k, o: _envelope('{"ClientID": ""}', key=k), MSG_NO_CLIENT_ID),
    "null client id": (lambda k, o: _envelope('{"ClientID": null}', key=k), MSG_NO_CLIENT_ID),
    "client id of another key": (lambda k, o: _envelope(_cid(o), key=k), MSG_CLIENT_ID_MISMATCH),
    "client id upper-case": (
        lambda k, o: _envelope(json.dumps({"ClientID": k.client_id.upper()}), key=k),
        MSG_CLIENT_ID_MISMATCH,
    ),
}


@pytest.mark.parametrize("case", list(ERROR_CASES))
def test_verification_fails_with_the_reference_message(
    case: str, key: ClientKey, other_key: ClientKey
) -> None:
    build, message = ERROR_CASES[case]

    with pytest.raises(SignatureError) as caught:
        verify_signed_envelope(build(key, other_key))

    assert str(caught.value) == message
    assert caught.value.message == message
    assert caught.value.http_status == 400


def test_legacy_payload_key_is_accepted(key: ClientKey) -> None:
    body = _envelope(_cid(key), key=key, payload_key="job_create_payload")

    assert verify_signed_envelope(body).client_id == key.client_id


def test_payload_key_wins_over_the_legacy_key(key: ClientKey) -> None:
    body = _envelope(_cid(key), key=key)[:-1] + b', "job_create_payload": null}'

    assert verify_signed_envelope(body).client_id == key.client_id


def test_custom_payload_key(key: ClientKey) -> None:
    body = _envelope(_cid(key), key=key, payload_key="data")

    assert verify_signed_envelope(body, payload_key="data").client_id == key.client_id
    with pytest.raises(SignatureError, match=MSG_NO_PAYLOAD):
        verify_signed_envelope(body)


def test_envelope_and_client_id_keys_match_case_insensitively_like_go(key: ClientKey) -> None:
    payload_text = json.dumps({"clientID": key.client_id})
    body = json.dumps(
        {
            "Client_Public_Key": key.public_key_b64,
            "PAYLOAD": json.loads(payload_text),
            "Signature": key.sign(payload_text.encode()),
        }
    ).encode()

    assert verify_signed_envelope(body).client_id == key.client_id


def test_public_keys_are_parsed_once(key: ClientKey) -> None:
    body = sign_envelope(key, {"ClientID": key.client_id})
    verify_signed_envelope(body)
    before = signing._parse_public_key.cache_info()

    for _ in range(3):
        verify_signed_envelope(body)

    after = signing._parse_public_key.cache_info()
    assert after.misses == before.misses
    assert after.hits > before.hits


@pytest.mark.parametrize("value", ["", "AAAA", "not base64", "☃", "MIIBCgKCAQEA"])
def test_client_id_of_bad_public_key(value: str) -> None:
    with pytest.raises(ClientKeyError):
        client_id_of_public_key(value)


def test_client_id_of_spki_public_key_is_refused(key: ClientKey) -> None:
    with pytest.raises(ClientKeyError, match="PKCS#1"):
        client_id_of_public_key(_spki_b64(key))


# ---------------------------------------------------------------------------------------------
# Key files, with pycryptodome (what the SDK uses) on the other side


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def _sdk_public_key_b64(rsa_key: RSA.RsaKey) -> str:
    # bacalhau_sdk.config.get_client_public_key, reproduced: SPKI PEM minus its 32-char prefix.
    pem = rsa_key.publickey().export_key("PEM").decode()
    body = pem.replace("-----BEGIN PUBLIC KEY-----", "").replace("-----END PUBLIC KEY-----", "")
    return body.replace("\n", "")[32:]


@pytest.fixture(scope="module")
def sdk_style_key() -> RSA.RsaKey:
    # Exactly what bacalhau_sdk.config.__ensure_user_id_key does.
    return RSA.generate(2048)


def test_key_file_written_by_us(tmp_path: Path) -> None:
    config_dir = tmp_path / "home" / ".bacalhau"

    created = ClientKey.load_or_create(config_dir)

    key_file = config_dir / "user_id.pem"
    pem = key_file.read_bytes()
    assert pem.startswith(b"-----BEGIN RSA PRIVATE KEY-----\n")
    assert pem.rstrip().endswith(b"-----END RSA PRIVATE KEY-----")
    assert _mode(key_file) == 0o600
    assert _mode(config_dir) == 0o700
    assert sorted(p.name for p in config_dir.iterdir()) == ["user_id.pem"]

    imported = RSA.import_key(pem)
    assert imported.has_private()
    assert imported.size_in_bits() == 2048
    assert imported.e == 65537
    n = imported.n
    assert created.client_id == hashlib.sha256(n.to_bytes(256, "big")).hexdigest()
    assert created.public_key_b64 == _sdk_public_key_b64(imported)


def test_load_or_create_keeps_an_existing_key(tmp_path: Path) -> None:
    first = ClientKey.load_or_create(tmp_path)
    before = (tmp_path / "user_id.pem").read_bytes()

    second = ClientKey.load_or_create(tmp_path)

    assert second.client_id == first.client_id
    assert (tmp_path / "user_id.pem").read_bytes() == before


def test_concurrent_load_or_create_agrees_on_one_key(tmp_path: Path) -> None:
    with ThreadPoolExecutor(max_workers=8) as pool:
        keys = list(pool.map(lambda _: ClientKey.load_or_create(tmp_path), range(8)))

    assert len({k.client_id for k in keys}) == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["user_id.pem"]


def test_load_or_create_ignores_the_umask(tmp_path: Path) -> None:
    old = os.umask(0o277)
    try:
        ClientKey.load_or_create(tmp_path / "d")
    finally:
        os.umask(old)

    assert _mode(tmp_path / "d") == 0o700
    assert _mode(tmp_path / "d" / "user_id.pem") == 0o600


def test_key_generated_like_the_sdk_is_readable(tmp_path: Path, sdk_style_key: RSA.RsaKey) -> None:
    (tmp_path / "user_id.pem").write_bytes(sdk_style_key.export_key("PEM", pkcs=1))

    loaded = ClientKey.load_or_create(tmp_path)

    n = sdk_style_key.n
    assert loaded.client_id == hashlib.sha256(n.to_bytes(256, "big")).hexdigest()
    assert loaded.public_key_b64 == _sdk_public_key_b64(sdk_style_key)


@pytest.mark.parametrize("pkcs", [1, 8])
def test_first_pem_block_is_used(tmp_path: Path, sdk_style_key: RSA.RsaKey, pkcs: int) -> None:
    other = ClientKey.generate()
    key_file = tmp_path / "user_id.pem"
    key_file.write_bytes(
        b"comment line\n" + sdk_style_key.export_key("PEM", pkcs=pkcs) + b"\n" + other.to_pem()
    )

    assert ClientKey.load(key_file).public_key_b64 == _sdk_public_key_b64(sdk_style_key)


def _ec_pem() -> bytes:
    return ec.generate_private_key(ec.SECP256R1()).private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def _encrypted_pem() -> bytes:
    return rsa.generate_private_key(65537, 2048).private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.BestAvailableEncryption(b"secret"),
    )


@pytest.mark.parametrize(
    "make_pem",
    [
        lambda: b"",
        lambda: b"-----BEGIN RSA PRIVATE KEY-----\nAAAA\n-----END RSA PRIVATE KEY-----\n",
        _ec_pem,
        _encrypted_pem,
    ],
    ids=["empty", "garbage", "ec", "encrypted"],
)
def test_unusable_key_files_are_refused(make_pem: Callable[[], bytes]) -> None:
    with pytest.raises(ClientKeyError):
        ClientKey.from_pem(make_pem())


# ---------------------------------------------------------------------------------------------
# The SDK's own code agrees with ours


@pytest.fixture
def sdk_config(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[ModuleType]:
    """bacalhau_sdk.config pointed at a fresh directory; its process-wide globals restored."""
    monkeypatch.setenv("BACALHAU_DIR", str(tmp_path))
    config = importlib.import_module("bacalhau_sdk.config")
    saved = (config.get_user_id_key(), config.get_client_id())
    try:
        yield config
    finally:
        config.set_user_id_key(saved[0])
        config.set_client_id(saved[1])


def test_sdk_generated_key_gives_the_same_identity(tmp_path: Path, sdk_config: ModuleType) -> None:
    sdk_config.init_config()  # generates <BACALHAU_DIR>/user_id.pem with the SDK's code

    ours = ClientKey.load_or_create(tmp_path)

    convert = getattr(sdk_config, "__convert_to_client_id")
    assert ours.client_id == sdk_config.get_client_id()
    assert ours.client_id == convert(sdk_config.get_user_id_key())
    assert ours.public_key_b64 == sdk_config.get_client_public_key()
    assert ours.sign(b'{"a": 1}') == sdk_config.sign_for_client(b'{"a": 1}')


def test_sdk_reads_the_key_we_create(tmp_path: Path, sdk_config: ModuleType) -> None:
    ours = ClientKey.load_or_create(tmp_path)

    sdk_config.init_config()

    assert sdk_config.get_client_id() == ours.client_id
    assert sdk_config.get_client_public_key() == ours.public_key_b64


class _Captured(Exception):
    pass


def test_sign_envelope_sends_the_sdks_exact_bytes(
    tmp_path: Path, sdk_config: ModuleType, monkeypatch: pytest.MonkeyPatch
) -> None:
    ours = ClientKey.load_or_create(tmp_path)
    sdk_config.init_config()
    api = importlib.import_module("bacalhau_sdk.api")  # its import-time init reads BACALHAU_DIR
    sdk_config.set_user_id_key(RSA.import_key(ours.to_pem()))
    sdk_config.set_client_id(ours.client_id)
    sent: list[bytes] = []

    def capture(method: str, url: str, *, body: str, **_: Any) -> None:
        sent.append(body.encode("utf-8"))
        raise _Captured

    monkeypatch.setattr(api.client.rest_client.pool_manager, "request", capture)
    payload = _submit_payload(ours.client_id)
    with pytest.raises(_Captured):
        api.submit(payload)
    with pytest.raises(_Captured):
        api.cancel("78e3155a-abb6-43eb-976a-1b998d503c01")

    assert sent == [
        sign_envelope(ours, payload),
        sign_envelope(
            ours, {"ClientID": ours.client_id, "JobID": "78e3155a-abb6-43eb-976a-1b998d503c01"}
        ),
    ]
    for body in sent:
        assert verify_signed_envelope(body).client_id == ours.client_id


# ---------------------------------------------------------------------------------------------
# raw_members


def test_raw_members_keeps_exact_text() -> None:
    body = ' \r\n{ "a" :\t{"x": [1,  2]} ,"b":"caf\\u00e9 ☃","c" : -1.5e3 , "d":null}\n'

    assert raw_members(body) == {
        "a": '{"x": [1,  2]}',
        "b": '"caf\\u00e9 ☃"',
        "c": "-1.5e3",
        "d": "null",
    }
    assert raw_members(body.encode("utf-8")) == raw_members(body)
    assert raw_members("{}") == {}
    assert raw_members(" { } ") == {}


@pytest.mark.parametrize(
    "body",
    [
        "",
        " ",
        "[]",
        "null",
        "{",
        "}",
        '{"a"}',
        '{"a":}',
        '{"a":1,}',
        '{"a":1 "b":2}',
        "{a:1}",
        "{'a':1}",
        '{"a":1}}',
        '{"a":1} {}',
        '{"a":NaN}',
        '{"a":Infinity}',
        '{"a":-Infinity}',
        '{"a":"\x01"}',
        '{"a":1,"a":2}',
        '{"a":{"b":1,"b":2}}',
        '{"a":[{"b":1,"b":1}]}',
        '{"a":"\\x"}',
        '{"a":01}',
        '\ufeff{"a":1}',
        '{"a":' + "[" * 100_000 + "]" * 100_000 + "}",
        '{"a":' + "1" * 10_000 + "}",
    ],
)
def test_raw_members_rejects_malformed_text(body: str) -> None:
    with pytest.raises(SignedEnvelopeError):
        raw_members(body)


def test_raw_members_rejects_invalid_utf8() -> None:
    with pytest.raises(SignedEnvelopeError, match="UTF-8"):
        raw_members(b'{"a": "\xc3"}')


JSON_SCALARS = (
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text()
)
JSON_VALUES = st.recursive(
    JSON_SCALARS,
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(), children, max_size=4)
    ),
    max_leaves=20,
)
JSON_OBJECTS = st.dictionaries(st.text(), JSON_VALUES, max_size=6)
SEPARATORS = st.sampled_from([(",", ":"), (", ", ": "), (" ,\n", " :\t"), ("\r\n,  ", "\n:\n")])
PADDING = st.text(alphabet=" \t\r\n", max_size=3)


@given(
    obj=JSON_OBJECTS,
    separators=SEPARATORS,
    indent=st.sampled_from([None, 0, 2, "\t"]),
    ensure_ascii=st.booleans(),
    before=PADDING,
    after=PADDING,
)
def test_raw_members_round_trips_any_object(
    obj: dict[str, Any],
    separators: tuple[str, str],
    indent: int | str | None,
    ensure_ascii: bool,
    before: str,
    after: str,
) -> None:
    text = (
        before
        + json.dumps(obj, separators=separators, indent=indent, ensure_ascii=ensure_ascii)
        + after
    )

    members = raw_members(text)

    assert list(members) == list(obj)
    for name, raw in members.items():
        assert json.loads(raw) == obj[name]
        if indent is None:
            expected = json.dumps(obj[name], separators=separators, ensure_ascii=ensure_ascii)
            assert raw == expected
    assert raw_members(text.encode("utf-8")) == members


def _only_envelope_errors(body: bytes | str) -> None:
    with contextlib.suppress(SignedEnvelopeError):
        raw_members(body)


@given(st.binary() | st.text())
def test_raw_members_on_garbage_raises_only_its_own_error(body: bytes | str) -> None:
    _only_envelope_errors(body)


MUTATION_CHARS = st.text(
    alphabet='{}[]",:\\ \n0123456789-+.eEtruefalsn\x00\u00e9\ud800', max_size=4
)


@given(obj=JSON_OBJECTS, data=st.data())
def test_raw_members_on_mutated_json_raises_only_its_own_error(
    obj: dict[str, Any], data: st.DataObject
) -> None:
    text = json.dumps(obj)
    start = data.draw(st.integers(0, len(text)))
    stop = data.draw(st.integers(start, min(len(text), start + 4)))
    mutated = text[:start] + data.draw(MUTATION_CHARS) + text[stop:]

    _only_envelope_errors(mutated)
    _only_envelope_errors(mutated.encode("utf-8", "surrogatepass"))


@settings(max_examples=50)
@given(data=st.data())
def test_verify_on_mutated_envelopes_raises_only_signature_errors(data: st.DataObject) -> None:
    body = RECORDED["sessions"][0]["exchanges"][0]["request_body_raw"]
    start = data.draw(st.integers(0, len(body)))
    stop = data.draw(st.integers(start, min(len(body), start + 4)))
    mutated = body[:start] + data.draw(MUTATION_CHARS) + body[stop:]

    with contextlib.suppress(SignatureError):
        verify_signed_envelope(mutated.encode("utf-8", "surrogatepass"))
