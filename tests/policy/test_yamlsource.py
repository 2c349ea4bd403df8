"""YAML to plain values plus positions: `schemas.policy.yamlsource`."""

from __future__ import annotations

import yaml
from hypothesis import given, settings
from hypothesis import strategies as st

from schemas.policy import yamlsource
from schemas.policy.yamlsource import MAX_DEPTH, Position, parse_yaml

ROLE = """\
kind: role            # line 1
version: v5
metadata:
  name: dba
spec:
  allow:
    db_labels:
      env: [dev, "stage"]
    db_users:
      - alice
      - '*'
"""


def test_values_and_positions_of_every_path() -> None:
    parsed = parse_yaml(ROLE.encode(), "roles/dba.yaml")
    assert parsed.problems == []
    (doc,) = parsed.documents
    assert doc.value == {
        "kind": "role",
        "version": "v5",
        "metadata": {"name": "dba"},
        "spec": {"allow": {"db_labels": {"env": ["dev", "stage"]}, "db_users": ["alice", "*"]}},
    }
    assert doc.start == Position(1, 1)
    assert doc.key_position(("kind",)) == Position(1, 1)
    assert doc.value_position(("kind",)) == Position(1, 7)
    assert doc.key_position(("metadata", "name")) == Position(4, 3)
    assert doc.value_position(("metadata", "name")) == Position(4, 9)
    assert doc.key_position(("spec", "allow", "db_labels", "env")) == Position(8, 7)
    assert doc.value_position(("spec", "allow", "db_labels", "env", 1)) == Position(8, 18)
    assert doc.value_position(("spec", "allow", "db_users")) == Position(10, 7)
    assert doc.value_position(("spec", "allow", "db_users", 1)) == Position(11, 9)
    assert doc.key_position(("spec", "allow", "db_users", 1)) == Position(11, 9)
    assert doc.value_position(("spec", "deny")) is None


def test_several_documents_empty_ones_skipped() -> None:
    text = "---\n# only a comment\n---\nkind: a\n---\n\n---\nkind: b\n...\n"
    parsed = parse_yaml(text, "f.yaml")
    assert parsed.problems == []
    assert [(d.index, d.value, d.start) for d in parsed.documents] == [
        (1, {"kind": "a"}, Position(4, 1)),
        (3, {"kind": "b"}, Position(8, 1)),
    ]
    assert parse_yaml(b"", "f.yaml").documents == []
    assert parse_yaml(b"# nothing\n", "f.yaml").documents == []


def test_a_document_that_is_not_a_mapping_is_returned_as_is() -> None:
    (doc,) = parse_yaml("- a\n- b\n", "f.yaml").documents
    assert doc.value == ["a", "b"]


def test_duplicate_key_is_an_error_at_the_second_and_the_first_value_stays() -> None:
    parsed = parse_yaml("a: 1\nb:\n  c: x\n  c: y\na: 2\n", "f.yaml")
    assert [str(p) for p in parsed.problems] == [
        "f.yaml:4:3: duplicate key 'c': it is already set at line 3; keep one of the two",
        "f.yaml:5:1: duplicate key 'a': it is already set at line 1; keep one of the two",
    ]
    assert parsed.documents[0].value == {"a": 1, "b": {"c": "x"}}


def test_scalars_follow_yaml_1_1_but_keys_stay_text() -> None:
    (doc,) = parse_yaml(
        "yes: no\non: 0x1F\n1: 1.5\nnull: ~\nwhen: 2021-01-02\nstr: !!str 123\n", "f.yaml"
    ).documents
    assert doc.value == {
        "yes": False,
        "on": 31,
        "1": 1.5,
        "null": None,
        "when": "2021-01-02",  # timestamps stay the text written
        "str": "123",
    }


def test_aliases_and_merge_keys() -> None:
    text = "base: &b\n  env: dev\n  tier: web\nother:\n  <<: *b\n  tier: db\nlist: [*b]\n"
    (doc,) = parse_yaml(text, "f.yaml").documents
    assert doc.value["other"] == {"env": "dev", "tier": "db"}
    assert doc.value["list"] == [{"env": "dev", "tier": "web"}]
    # A merged key points where it was written (in the anchor); an own key where it is.
    assert doc.key_position(("other", "env")) == Position(2, 3)
    assert doc.key_position(("other", "tier")) == Position(6, 3)
    assert doc.value_position(("other", "tier")) == Position(6, 9)
    assert doc.key_position(("other",)) == Position(4, 1)


def test_merge_key_first_listed_wins() -> None:
    text = "a: &a {x: 1}\nb: &b {x: 2, y: 2}\nc:\n  <<: [*a, *b]\n"
    (doc,) = parse_yaml(text, "f.yaml").documents
    assert doc.value["c"] == {"x": 1, "y": 2}


def test_recursive_alias_and_alias_bomb_fail_cleanly() -> None:
    parsed = parse_yaml("a: &x [1, *x]\n", "f.yaml")
    assert parsed.documents == []
    assert [p.rule for p in parsed.problems] == ["yaml-alias"]
    bomb = "a: &a [x, x, x, x, x, x, x, x, x, x]\n" + "".join(
        f"{chr(98 + i)}: &{chr(98 + i)} [{', '.join(['*' + chr(97 + i)] * 10)}]\n" for i in range(8)
    )
    parsed = parse_yaml(bomb, "f.yaml")
    assert parsed.documents == []
    assert [(p.line, p.rule) for p in parsed.problems] == [(1, "yaml-alias")]


def test_deep_nesting_never_crashes_the_process() -> None:
    # libyaml's composer recurses in C: 100k levels used to overflow the C stack.
    for depth in (MAX_DEPTH + 1, 100_000):
        parsed = parse_yaml("[" * depth + "]" * depth, "f.yaml")
        assert parsed.documents == []
        assert [p.rule for p in parsed.problems] == ["yaml-syntax"]
        assert f"deeper than {MAX_DEPTH} levels" in parsed.problems[0].message


def test_syntax_error_keeps_the_documents_before_it() -> None:
    parsed = parse_yaml("kind: a\n---\nkind: [b\n", "f.yaml")
    assert [d.value for d in parsed.documents] == [{"kind": "a"}]
    (problem,) = parsed.problems
    assert (problem.line, problem.rule) == (4, "yaml-syntax")


def test_encodings() -> None:
    bom = parse_yaml("\ufeffkind: a\n".encode(), "f.yaml")
    assert bom.documents[0].value == {"kind": "a"}
    assert bom.documents[0].start == Position(1, 1)
    (problem,) = parse_yaml(b"a: 1\nb: \xc3\x28\n", "f.yaml").problems
    assert str(problem) == "f.yaml:2:4: not valid UTF-8 (byte 0xc3); save the file as UTF-8"
    (problem,) = parse_yaml("a: 1\nb: \u00e9\u0001\n".encode(), "f.yaml").problems
    assert str(problem) == "f.yaml:2:5: control character U+0001 is not allowed in YAML; remove it"
    (problem,) = parse_yaml("kind: a".encode("utf-32"), "f.yaml").problems
    assert problem.message == "the file is UTF-32; save it as UTF-8"


def test_columns_count_characters_not_bytes() -> None:
    (doc,) = parse_yaml("d: \u00e9\u00e9\u00e9\nx: [\u00e9, y]\n".encode(), "f.yaml").documents
    assert doc.value_position(("x", 1)) == Position(2, 8)


def test_huge_integer_is_a_problem_not_a_crash() -> None:
    parsed = parse_yaml("a: 1" + "0" * 5000 + "\n", "f.yaml")
    assert [p.rule for p in parsed.problems] == ["yaml-syntax"]
    assert len(parsed.problems[0].message) < 200


# --- libyaml and the pure-Python composer agree ------------------------------------------

keys = st.text(alphabet="abcdefghijklmnopqrstuvwxyz_-", min_size=1, max_size=8)
scalars = st.one_of(
    st.text(max_size=12),
    st.integers(-(10**6), 10**6),
    st.booleans(),
    st.none(),
    st.floats(allow_nan=False, allow_infinity=False),
)
values = st.recursive(
    scalars,
    lambda children: st.one_of(
        st.lists(children, max_size=4), st.dictionaries(keys, children, max_size=4)
    ),
    max_leaves=20,
)


@settings(max_examples=150, deadline=None)
@given(st.dictionaries(keys, values, min_size=1, max_size=5), st.booleans())
def test_values_round_trip_and_both_composers_agree(data: dict, flow: bool) -> None:
    text = yaml.safe_dump(data, default_flow_style=flow, allow_unicode=True)
    fast = parse_yaml(text, "f.yaml")
    assert fast.problems == []
    assert fast.documents[0].value == yaml.safe_load(text)
    original = yamlsource._Loader
    yamlsource._Loader = yamlsource._PyLoader
    try:
        slow = parse_yaml(text, "f.yaml")
    finally:
        yamlsource._Loader = original
    assert slow.documents[0].value == fast.documents[0].value
    assert slow.documents[0].marks == fast.documents[0].marks
