"""ClientAuthenticator: SCRAM-SHA-256 against RFC 7677's test vector, MD5 against a value
computed with coreutils' md5sum, and a clear error for every way a login cannot proceed.

The SCRAM exchange is piped as bytes through the codec (client and server side decoders),
the way the agent will run it, with no network."""

from __future__ import annotations

import base64

import pytest

from dataplane.postgres import (
    BACKEND,
    FRONTEND,
    AuthenticationError,
    AuthenticationRejected,
    ClientAuthenticator,
    MessageDecoder,
    PasswordRequired,
    ServerVerificationFailed,
    UnsupportedAuthentication,
    encode,
    fatal,
)
from dataplane.postgres import messages as m
from dataplane.postgres.auth import md5_password, saslprep

# RFC 7677, section 3
RFC_NONCE = "rOprNGfwEbeRWgbNEkqO"
RFC_CLIENT_FIRST = b"n,,n=user,r=rOprNGfwEbeRWgbNEkqO"
RFC_SERVER_FIRST = (
    b"r=rOprNGfwEbeRWgbNEkqO%hvYDpWUa2RaTCAfuxFIlj)hNlF$k0,s=W22ZaJ0SNY7soEsUEjb6gQ==,i=4096"
)
RFC_CLIENT_FINAL = (
    b"c=biws,r=rOprNGfwEbeRWgbNEkqO%hvYDpWUa2RaTCAfuxFIlj)hNlF$k0,"
    b"p=dHzbZapWIk4jUhN+Ute9ytag9zjfMHgsqmmiz7AndVQ="
)
RFC_SERVER_FINAL = b"v=6rriTRBi23WpRR/wtup+mMhUZUn/dB5nLTJRsjl95G4="


class Wire:
    """Client and server ends of a login, joined by bytes only."""

    def __init__(self, auth: ClientAuthenticator) -> None:
        self.auth = auth
        self.at_client = MessageDecoder(BACKEND)
        self.at_server = MessageDecoder(FRONTEND)

    def server_sends(self, message: m.BackendMessage, expect: type | None = None) -> list[object]:
        """Deliver one server message; return what the client sent back, as the server reads it."""
        self.at_client.receive_data(encode(message))
        incoming = self.at_client.next_message()
        assert incoming == message
        replies = self.auth.receive(incoming)  # type: ignore[arg-type]
        if expect is not None:
            self.at_server.expect_auth_response(expect)
        self.at_server.receive_data(b"".join(encode(r) for r in replies))
        got = []
        while (msg := self.at_server.next_message()) is not None:
            got.append(msg)
        return got


def rfc_login(**kw: object) -> tuple[ClientAuthenticator, Wire]:
    auth = ClientAuthenticator("user", "pencil", nonce=RFC_NONCE, **kw)  # type: ignore[arg-type]
    wire = Wire(auth)
    first = wire.server_sends(m.AuthenticationSASL(("SCRAM-SHA-256",)), m.SASLInitialResponse)
    assert first == [m.SASLInitialResponse("SCRAM-SHA-256", RFC_CLIENT_FIRST)]
    return auth, wire


def test_scram_sha_256_matches_the_rfc_7677_test_vector() -> None:
    auth, wire = rfc_login()
    final = wire.server_sends(m.AuthenticationSASLContinue(RFC_SERVER_FIRST), m.SASLResponse)
    assert final == [m.SASLResponse(RFC_CLIENT_FINAL)]
    assert wire.server_sends(m.AuthenticationSASLFinal(RFC_SERVER_FINAL)) == []
    assert not auth.done
    assert wire.server_sends(m.AuthenticationOk()) == []
    assert auth.done and auth.method == "scram-sha-256"


def test_a_wrong_server_signature_fails_the_login() -> None:
    auth, wire = rfc_login()
    wire.server_sends(m.AuthenticationSASLContinue(RFC_SERVER_FIRST), m.SASLResponse)
    forged = b"v=" + base64.b64encode(b"\x00" * 32)
    with pytest.raises(ServerVerificationFailed, match="SCRAM signature is wrong"):
        auth.receive(m.AuthenticationSASLFinal(forged))
    assert not auth.done


def test_a_server_that_skips_the_scram_proof_is_refused() -> None:
    auth, wire = rfc_login()
    wire.server_sends(m.AuthenticationSASLContinue(RFC_SERVER_FIRST), m.SASLResponse)
    with pytest.raises(ServerVerificationFailed, match="never proved it knows the password"):
        auth.receive(m.AuthenticationOk())
    assert not auth.done


@pytest.mark.parametrize(
    ("server_first", "problem"),
    [
        (b"r=someoneelse123,s=W22ZaJ0SNY7soEsUEjb6gQ==,i=4096", "nonce does not extend ours"),
        (b"r=rOprNGfwEbeRWgbNEkqO,s=W22ZaJ0SNY7soEsUEjb6gQ==,i=4096", "nonce does not extend ours"),
        (b"r=rOprNGfwEbeRWgbNEkqOxyz,s=@@@,i=4096", "salt is not valid base64"),
        (b"r=rOprNGfwEbeRWgbNEkqOxyz,s=AAAA,i=-1", "iteration count is not a number"),
        (b"r=rOprNGfwEbeRWgbNEkqOxyz,s=AAAA,i=0", "iteration count 0 is outside 1...1000000"),
        (b"r=rOprNGfwEbeRWgbNEkqOxyz,s=AAAA,i=2000000000", "raise max_scram_iterations"),
        (b"m=ext,r=rOprNGfwEbeRWgbNEkqOxyz,s=AAAA,i=1", "unsupported extension"),
        (b"s=AAAA,r=x,i=1", "expected r=...,s=...,i=..."),
        (b"r=\xff", "not ASCII"),
    ],
)
def test_a_malformed_or_hostile_server_first_message_is_refused(
    server_first: bytes, problem: str
) -> None:
    auth, _ = rfc_login()
    with pytest.raises(ServerVerificationFailed) as caught:
        auth.receive(m.AuthenticationSASLContinue(server_first))
    assert problem in str(caught.value)


def test_a_scram_error_from_the_server_is_reported() -> None:
    auth, wire = rfc_login()
    wire.server_sends(m.AuthenticationSASLContinue(RFC_SERVER_FIRST), m.SASLResponse)
    with pytest.raises(ServerVerificationFailed, match="ended SCRAM with error 'invalid-proof'"):
        auth.receive(m.AuthenticationSASLFinal(b"e=invalid-proof"))


def test_scram_messages_out_of_order_are_refused() -> None:
    auth = ClientAuthenticator("u", "p")
    with pytest.raises(ServerVerificationFailed, match="unexpected AuthenticationSASLContinue"):
        auth.receive(m.AuthenticationSASLContinue(RFC_SERVER_FIRST))
    auth2, _ = rfc_login()
    with pytest.raises(ServerVerificationFailed, match="unexpected AuthenticationSASLFinal"):
        auth2.receive(m.AuthenticationSASLFinal(RFC_SERVER_FINAL))


def test_random_nonces_differ_and_are_safe_to_embed() -> None:
    nonces = set()
    for _ in range(20):
        (first,) = ClientAuthenticator("u", "p").receive(m.AuthenticationSASL(("SCRAM-SHA-256",)))
        assert isinstance(first, m.SASLInitialResponse) and first.data is not None
        nonce = first.data.decode().split(",r=")[1]
        assert len(nonce) >= 24 and "," not in nonce
        nonces.add(nonce)
    assert len(nonces) == 20
    with pytest.raises(ValueError, match="printable ASCII without commas"):
        ClientAuthenticator("u", "p", nonce="a,b")


def test_user_names_are_escaped_in_scram() -> None:
    auth = ClientAuthenticator("a=b,c", "p", nonce="abc")
    (first,) = auth.receive(m.AuthenticationSASL(("SCRAM-SHA-256-PLUS", "SCRAM-SHA-256")))
    assert first == m.SASLInitialResponse("SCRAM-SHA-256", b"n,,n=a=3Db=2Cc,r=abc")


def test_md5_matches_a_value_computed_with_coreutils() -> None:
    # printf 'pencilalice' | md5sum  ->  ee69efad287c7423caf0b3229d71f567
    # printf '%s\x01\x02\x03\x04' ee69... | md5sum  ->  37cba386e8b90f1e3941a0e792722253
    expected = "md5" + "37cba386e8b90f1e3941a0e792722253"
    assert md5_password("alice", "pencil", b"\x01\x02\x03\x04") == expected
    auth = ClientAuthenticator("alice", "pencil")
    wire = Wire(auth)
    assert wire.server_sends(m.AuthenticationMD5Password(b"\x01\x02\x03\x04")) == [
        m.PasswordMessage(expected)
    ]
    wire.server_sends(m.AuthenticationOk())
    assert auth.done and auth.method == "md5"


def test_cleartext_password_and_trust() -> None:
    auth = ClientAuthenticator("alice", "s3cret")
    assert auth.receive(m.AuthenticationCleartextPassword()) == [m.PasswordMessage("s3cret")]
    auth.receive(m.AuthenticationOk())
    assert auth.done and auth.method == "password"
    cert = ClientAuthenticator("alice", None)  # certificate auth: the server says Ok at once
    assert cert.receive(m.NoticeResponse({"M": "hi"})) == []
    assert cert.receive(m.AuthenticationOk()) == []
    assert cert.done and cert.method == "trust"
    with pytest.raises(AuthenticationError, match="ParameterStatus is for the caller"):
        cert.receive(m.ParameterStatus("server_version", "15"))


@pytest.mark.parametrize(
    ("request_", "method"),
    [
        (m.AuthenticationCleartextPassword(), "(password)"),
        (m.AuthenticationMD5Password(b"salt"), "(md5)"),
        (m.AuthenticationSASL(("SCRAM-SHA-256",)), "(SCRAM-SHA-256)"),
    ],
)
def test_a_password_request_without_a_password_says_so(
    request_: m.BackendMessage, method: str
) -> None:
    with pytest.raises(PasswordRequired) as caught:
        ClientAuthenticator("bob", None).receive(request_)
    text = str(caught.value)
    assert method in text and "'bob'" in text and "none is configured" in text


@pytest.mark.parametrize(
    ("request_", "problem"),
    [
        (m.AuthenticationGSS(), "Kerberos/GSSAPI, which is not supported"),
        (m.AuthenticationKerberosV5(), "Kerberos/GSSAPI"),
        (m.AuthenticationGSSContinue(b"x"), "Kerberos/GSSAPI"),
        (m.AuthenticationSSPI(), "SSPI, which is not supported"),
        (
            m.AuthenticationSASL(("SCRAM-SHA-256-PLUS",)),
            "requires SCRAM-SHA-256-PLUS (channel binding)",
        ),
        (m.AuthenticationSASL(("OAUTHBEARER",)), "offers SASL mechanisms OAUTHBEARER"),
    ],
)
def test_unsupported_methods_are_named(request_: m.BackendMessage, problem: str) -> None:
    with pytest.raises(UnsupportedAuthentication) as caught:
        ClientAuthenticator("bob", "pw").receive(request_)
    assert problem in str(caught.value)


def test_a_server_error_is_passed_on_with_its_sqlstate() -> None:
    auth = ClientAuthenticator("bob", "wrong")
    auth.receive(m.AuthenticationCleartextPassword())
    error = fatal("28P01", 'password authentication failed for user "bob"')
    with pytest.raises(AuthenticationRejected) as caught:
        auth.receive(error)
    assert caught.value.sqlstate == "28P01" and caught.value.error == error
    assert 'password authentication failed for user "bob"' in str(caught.value)


def test_confused_exchanges_are_refused_and_never_show_the_password() -> None:
    auth = ClientAuthenticator("bob", "hunter2")
    auth.receive(m.AuthenticationCleartextPassword())
    with pytest.raises(ServerVerificationFailed, match="asked for authentication again") as again:
        auth.receive(m.AuthenticationMD5Password(b"salt"))
    with pytest.raises(AuthenticationError, match="unexpected DataRow") as odd:
        ClientAuthenticator("bob", "hunter2").receive(m.DataRow(()))
    for problem in (again.value, odd.value):
        assert "hunter2" not in str(problem)
    assert "hunter2" not in repr(auth)


def test_saslprep_follows_rfc_4013_and_falls_back_like_postgresql() -> None:
    assert saslprep("pencil") == b"pencil"
    assert saslprep("I\u00adX") == b"IX"  # soft hyphen maps to nothing
    assert saslprep("\u00aa") == b"a"  # NFKC
    assert saslprep("\u2168") == b"IX"  # ROMAN NUMERAL NINE, NFKC
    assert saslprep("a\u00a0b") == b"a b"  # non-ASCII space maps to space
    # prohibited or bidi-invalid: PostgreSQL then uses the raw bytes, and so do we
    assert saslprep("a\u0007\u00e9") == "a\u0007\u00e9".encode()
    assert saslprep("\u0627\u0031") == "\u0627\u0031".encode()
