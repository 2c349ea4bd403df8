"""Hypothesis strategies: one for every message class of dataplane.postgres.messages."""

from __future__ import annotations

import itertools

from hypothesis import strategies as st

from dataplane.postgres import messages as m

# Text as the codec sees it: any UTF-8 without NUL, plus arbitrary non-UTF-8 bytes
# (another client_encoding) carried through surrogateescape.
_utf8_text = st.text(
    alphabet=st.characters(blacklist_characters="\0", blacklist_categories=("Cs",)), max_size=20
)
_raw_text = (
    st.binary(max_size=20)
    .filter(lambda b: b"\0" not in b)
    .map(lambda b: b.decode("utf-8", "surrogateescape"))
)
text = st.one_of(_utf8_text, _raw_text)
nonempty_text = text.filter(bool)

int8 = st.integers(-128, 127)
int16 = st.integers(-(2**15), 2**15 - 1)
int32 = st.integers(-(2**31), 2**31 - 1)
uint32 = st.integers(0, 2**32 - 1)
data = st.binary(max_size=40)
value = st.one_of(st.none(), data)


def tuples(strategy: st.SearchStrategy, max_size: int = 4) -> st.SearchStrategy:
    return st.lists(strategy, max_size=max_size).map(tuple)


kind = st.sampled_from(["S", "P"])
error_fields = st.dictionaries(st.characters(min_codepoint=1, max_codepoint=255), text, max_size=6)

STARTUP = {
    m.StartupMessage: st.builds(
        m.StartupMessage,
        st.dictionaries(nonempty_text, text, max_size=5),
        st.sampled_from([0, 0, 1, 2, 0xFFFF]),
    ),
    m.SSLRequest: st.builds(m.SSLRequest),
    m.GSSENCRequest: st.builds(m.GSSENCRequest),
    m.CancelRequest: st.builds(m.CancelRequest, uint32, uint32),
}

FRONTEND = {
    m.Query: st.builds(m.Query, text),
    m.Parse: st.builds(m.Parse, text, text, tuples(uint32)),
    m.Bind: st.builds(m.Bind, text, text, tuples(int16), tuples(value), tuples(int16)),
    m.Execute: st.builds(m.Execute, text, int32),
    m.Describe: st.builds(m.Describe, kind, text),
    m.Close: st.builds(m.Close, kind, text),
    m.Sync: st.builds(m.Sync),
    m.Flush: st.builds(m.Flush),
    m.Terminate: st.builds(m.Terminate),
    m.CopyData: st.builds(m.CopyData, data),
    m.CopyDone: st.builds(m.CopyDone),
    m.CopyFail: st.builds(m.CopyFail, text),
    m.FunctionCall: st.builds(m.FunctionCall, uint32, tuples(int16), tuples(value), int16),
}

# The three 'p' messages: which one a 'p' is depends on the authentication state.
AUTH_RESPONSES = {
    m.PasswordMessage: st.builds(m.PasswordMessage, text),
    m.SASLInitialResponse: st.builds(m.SASLInitialResponse, text, value),
    m.SASLResponse: st.builds(m.SASLResponse, data),
}

BACKEND = {
    m.AuthenticationOk: st.builds(m.AuthenticationOk),
    m.AuthenticationKerberosV5: st.builds(m.AuthenticationKerberosV5),
    m.AuthenticationCleartextPassword: st.builds(m.AuthenticationCleartextPassword),
    m.AuthenticationMD5Password: st.builds(
        m.AuthenticationMD5Password, st.binary(min_size=4, max_size=4)
    ),
    m.AuthenticationGSS: st.builds(m.AuthenticationGSS),
    m.AuthenticationGSSContinue: st.builds(m.AuthenticationGSSContinue, data),
    m.AuthenticationSSPI: st.builds(m.AuthenticationSSPI),
    m.AuthenticationSASL: st.builds(m.AuthenticationSASL, tuples(nonempty_text)),
    m.AuthenticationSASLContinue: st.builds(m.AuthenticationSASLContinue, data),
    m.AuthenticationSASLFinal: st.builds(m.AuthenticationSASLFinal, data),
    m.ParameterStatus: st.builds(m.ParameterStatus, text, text),
    m.BackendKeyData: st.builds(m.BackendKeyData, uint32, uint32),
    m.ReadyForQuery: st.builds(m.ReadyForQuery, st.sampled_from(["I", "T", "E"])),
    m.ErrorResponse: st.builds(m.ErrorResponse, error_fields),
    m.NoticeResponse: st.builds(m.NoticeResponse, error_fields),
    m.CommandComplete: st.builds(m.CommandComplete, text),
    m.RowDescription: st.builds(
        m.RowDescription,
        tuples(st.builds(m.FieldDescription, text, uint32, int16, uint32, int16, int32, int16)),
    ),
    m.DataRow: st.builds(m.DataRow, tuples(value, max_size=6)),
    m.EmptyQueryResponse: st.builds(m.EmptyQueryResponse),
    m.ParseComplete: st.builds(m.ParseComplete),
    m.BindComplete: st.builds(m.BindComplete),
    m.CloseComplete: st.builds(m.CloseComplete),
    m.NoData: st.builds(m.NoData),
    m.PortalSuspended: st.builds(m.PortalSuspended),
    m.ParameterDescription: st.builds(m.ParameterDescription, tuples(uint32)),
    m.CopyInResponse: st.builds(m.CopyInResponse, int8, tuples(int16)),
    m.CopyOutResponse: st.builds(m.CopyOutResponse, int8, tuples(int16)),
    m.CopyBothResponse: st.builds(m.CopyBothResponse, int8, tuples(int16)),
    m.NotificationResponse: st.builds(m.NotificationResponse, uint32, text, text),
    m.NegotiateProtocolVersion: st.builds(m.NegotiateProtocolVersion, int32, tuples(text)),
    m.FunctionCallResponse: st.builds(m.FunctionCallResponse, value),
    m.CopyData: st.builds(m.CopyData, data),
    m.CopyDone: st.builds(m.CopyDone),
}

frontend_message = st.one_of(*FRONTEND.values())
backend_message = st.one_of(*BACKEND.values())


@st.composite
def split(draw: st.DrawFn, stream: bytes) -> list[bytes]:
    """`stream` cut into chunks at arbitrary points (empty chunks excluded)."""
    if not stream:
        return []
    cuts = sorted(set(draw(st.lists(st.integers(1, max(1, len(stream) - 1)), max_size=8))))
    bounds = [0, *[c for c in cuts if c < len(stream)], len(stream)]
    return [stream[a:b] for a, b in itertools.pairwise(bounds) if b > a]
