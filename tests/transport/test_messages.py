"""The pieces without sockets: headers, entity-tags, targets, error shapes and messages.
Property tests check that nothing a peer sends makes them raise anything unexpected."""

from __future__ import annotations

import json

import pydantic
import pytest
from hypothesis import given
from hypothesis import strategies as st

from transport.http import (
    ApiError,
    Headers,
    describe_validation_error,
    error_response,
    etag_matches,
    json_response,
)
from transport.http._messages import format_location, parse_json_body, split_target


def test_headers_are_case_insensitive_ordered_and_combine_repeats() -> None:
    h = Headers([(b"Content-Type", b"application/json"), (b"x-a", b"1"), (b"X-A", b"2")])
    assert h["content-type"] == h["CONTENT-TYPE"] == "application/json"
    assert h["x-a"] == "1, 2"
    assert h.get_all("X-a") == ["1", "2"]
    assert "x-A" in h
    assert "missing" not in h
    assert h.get("missing", "d") == "d"
    with pytest.raises(KeyError):
        h["missing"]
    assert list(h) == [("content-type", "application/json"), ("x-a", "1"), ("x-a", "2")]
    assert Headers({"A": "b"}) == Headers([("a", "b")])
    assert len(h.without("X-A")) == 1
    assert h.with_fields(("ETag", '"1"'))["etag"] == '"1"'


@pytest.mark.parametrize(("header", "etag", "matches"), [
    ('"17"', '"17"', True),
    ('"16", "17"', '"17"', True),
    ('W/"17"', '"17"', True),          # If-None-Match compares weakly
    ('"17"', 'W/"17"', True),
    ("*", '"anything"', True),
    ('"a,b", "c"', '"a,b"', True),     # commas inside a tag do not split it
    ('"18"', '"17"', False),
    ("17", '"17"', False),             # unquoted is malformed
    ("", '"17"', False),
    (None, '"17"', False),
    ('"17"', "17", False),
])
def test_etag_matches(header: str | None, etag: str, matches: bool) -> None:
    assert etag_matches(header, etag) is matches


@given(st.text(max_size=200), st.text(max_size=30))
def test_etag_matching_never_raises(header: str, etag: str) -> None:
    assert etag_matches(header, etag) in (True, False)


@pytest.mark.parametrize(("target", "path", "query"), [
    ("/v1/ping", "/v1/ping", {}),
    ("/v1/db%20ls?x=1&x=2&y=", "/v1/db ls", {"x": ["1", "2"], "y": [""]}),
    ("/a?q=%C3%A9", "/a", {"q": ["é"]}),
    ("/a#frag", "/a", {}),
])
def test_split_target(target: str, path: str, query: dict[str, list[str]]) -> None:
    assert split_target(target) == (path, query)


@given(st.text(alphabet=st.characters(min_codepoint=0x21, max_codepoint=0x7E), max_size=300))
def test_split_target_raises_only_api_errors(target: str) -> None:
    try:
        path, query = split_target(target)
    except ApiError as exc:
        assert exc.status == 400
    else:
        assert isinstance(path, str)
        assert len(query) <= 64


@given(st.binary(max_size=300))
def test_parse_json_body_raises_only_400(body: bytes) -> None:
    try:
        parse_json_body(body, "request body")
    except ApiError as exc:
        assert exc.status == 400
        assert exc.code == "malformed_json"


def test_error_response_has_the_one_error_shape() -> None:
    response = error_response(403, "access_denied", "no role allows db user postgres")
    assert response.status == 403
    assert ("content-type", "application/json") in response.headers
    assert json.loads(response.body) == {
        "error": {"code": "access_denied", "message": "no role allows db user postgres"}}
    assert ApiError(404, "not_found", "x").to_response().status == 404


def test_json_response_renders_models_and_data_holding_models() -> None:
    class Db(pydantic.BaseModel):
        model_config = pydantic.ConfigDict(populate_by_name=True)
        name: str
        labels_: dict[str, str] = pydantic.Field(alias="labels")

    db = Db(name="aurora", labels={"env": "dev"})
    assert json.loads(json_response(db).body) == {"name": "aurora", "labels": {"env": "dev"}}
    listed = json_response({"databases": [db]}, headers={"ETag": '"3"'})
    assert json.loads(listed.body) == {"databases": [{"name": "aurora",
                                                      "labels": {"env": "dev"}}]}
    assert ("etag", '"3"') in listed.headers


def test_validation_messages_name_paths_and_never_values() -> None:
    class Item(pydantic.BaseModel):
        port: int

    class Body(pydantic.BaseModel):
        password: int
        items: list[Item]

    with pytest.raises(pydantic.ValidationError) as caught:
        Body.model_validate({"password": "correct horse", "items": [{"port": "x"}] * 12})
    text = describe_validation_error(caught.value, limit=3)
    assert text.startswith("password: Input should be a valid integer, unable to parse "
                           "string as an integer; items[0].port: ")
    assert text.endswith("and 10 more")
    assert "correct horse" not in text
    assert format_location(()) == "(body)"
    assert format_location(("spec", "roles", 0, "name")) == "spec.roles[0].name"
