"""pg_service.conf editing: our sections in, our sections out, the user's bytes untouched.

The last tests hand the files we write to the real libpq (psql) to check that it reads our
sections, and that it still reads the user's own sections after we edited around them."""

from __future__ import annotations

import os
import stat
import subprocess
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from dataplane.tsh.pgservice import (
    ServiceFile,
    ServiceFileError,
    newline_of,
    read_section,
    remove_sections,
    section_names,
    service_file_path,
    split_lines,
    upsert_section,
)

AURORA = [
    ("host", "localhost"),
    ("port", "3080"),
    ("sslmode", "verify-full"),
    ("sslrootcert", "/home/alice/.tsh/profiles/localhost_3080/host-ca.pem"),
    ("sslcert", "/home/alice/.tsh/profiles/localhost_3080/db/aurora.crt"),
    ("sslkey", "/home/alice/.tsh/profiles/localhost_3080/db/aurora.key"),
    ("gssencmode", "disable"),
    ("user", "alice"),
    ("dbname", "postgres"),
]
METRICS = [("host", "proxy.example.com"), ("port", "3080"), ("user", "bob"), ("dbname", "m")]

# A user's file with everything that must survive: comments before, inside and between
# sections, blank lines (some holding spaces), odd spacing around `=` and brackets, trailing
# whitespace, a section with a name close to ours, and a header with text after `]`.
FOREIGN = (
    b"# my services\n"
    b"\n"
    b"[prod]\n"
    b"host=db.prod.internal   \n"
    b"  port = 5432\n"
    b"# comment inside prod\n"
    b"dbname=app\t\n"
    b"   \n"
    b"\n"
    b"# the next one is for reports\n"
    b"  [root-aurora-old]  \n"
    b"host=old\n"
    b"[staging] trailing text\n"
    b"host=stage\n"
    b"\n"
)


def test_split_lines_keeps_every_byte() -> None:
    data = b"a\r\nb\n\nc\rd"
    assert split_lines(data) == [b"a\r\n", b"b\n", b"\n", b"c\rd"]
    assert b"".join(split_lines(FOREIGN)) == FOREIGN
    assert split_lines(b"") == []


def test_add_to_an_empty_or_missing_file() -> None:
    added = upsert_section(b"", "root-aurora", AURORA)
    assert added.startswith(b"[root-aurora]\nhost=localhost\nport=3080\nsslmode=verify-full\n")
    assert added.endswith(b"gssencmode=disable\nuser=alice\ndbname=postgres\n")
    assert read_section(added, "root-aurora") == dict(AURORA)
    assert remove_sections(added, ["root-aurora"]) == b""


def test_foreign_sections_are_kept_byte_for_byte_when_adding_two() -> None:
    one = upsert_section(FOREIGN, "root-aurora", AURORA)
    two = upsert_section(one, "root-metrics", METRICS)
    assert two.startswith(FOREIGN)
    assert section_names(two) == [
        "prod", "root-aurora-old", "staging", "root-aurora", "root-metrics"
    ]
    assert read_section(two, "root-aurora") == dict(AURORA)
    assert read_section(two, "root-metrics") == dict(METRICS)
    # The user's sections read the same as before.
    for name in ("prod", "root-aurora-old", "staging"):
        assert read_section(two, name) == read_section(FOREIGN, name)


def test_remove_one_then_all() -> None:
    both = upsert_section(upsert_section(FOREIGN, "root-aurora", AURORA), "root-metrics", METRICS)
    only_metrics = remove_sections(both, ["root-aurora"])
    assert only_metrics == upsert_section(FOREIGN, "root-metrics", METRICS)
    assert section_names(only_metrics)[-1] == "root-metrics"
    assert remove_sections(only_metrics, ["root-metrics"]) == FOREIGN
    assert remove_sections(both, ["root-aurora", "root-metrics"]) == FOREIGN


def test_removing_a_section_that_is_not_there_changes_nothing() -> None:
    assert remove_sections(FOREIGN, ["root-aurora"]) == FOREIGN
    # "root-aurora" is not "root-aurora-old": a prefix is not a match.
    assert read_section(FOREIGN, "root-aurora") is None


def test_a_section_in_the_middle_is_replaced_in_place() -> None:
    data = upsert_section(FOREIGN, "root-aurora", AURORA) + b"[after]\nhost=x\n"
    changed = [*AURORA[:-1], ("dbname", "metrics")]
    updated = upsert_section(data, "root-aurora", changed)
    assert updated == data.replace(b"dbname=postgres\n", b"dbname=metrics\n")
    assert section_names(updated)[-2:] == ["root-aurora", "after"]


def test_removing_a_section_in_the_middle_keeps_the_comments_of_the_next() -> None:
    data = (
        b"[a]\nhost=a\n"
        b"\n[root-aurora]\nhost=localhost\n"
        b"\n# about b\n[b]\nhost=b\n"
    )
    assert remove_sections(data, ["root-aurora"]) == b"[a]\nhost=a\n\n# about b\n[b]\nhost=b\n"


def test_duplicates_of_our_section_are_folded_into_the_first() -> None:
    data = b"[root-aurora]\nhost=one\n[x]\nk=v\n\n[root-aurora]\nhost=two\n[y]\nk=w\n"
    updated = upsert_section(data, "root-aurora", [("host", "three")])
    assert updated == b"[root-aurora]\nhost=three\n[x]\nk=v\n[y]\nk=w\n"
    assert remove_sections(data, ["root-aurora"]) == b"[x]\nk=v\n[y]\nk=w\n"


def test_a_file_without_a_final_newline() -> None:
    data = b"[prod]\nhost=db  "  # no line ending, and trailing spaces
    added = upsert_section(data, "root-aurora", AURORA)
    assert added.startswith(data + b"\n\n[root-aurora]\n")
    assert read_section(added, "prod") == {"host": "db"}
    assert remove_sections(added, ["root-aurora"]) == data + b"\n"


def test_a_crlf_file_gets_crlf_sections() -> None:
    data = b"# windows\r\n[prod]\r\nhost=db\r\n"
    added = upsert_section(data, "root-aurora", AURORA)
    assert added.startswith(data + b"\r\n[root-aurora]\r\nhost=localhost\r\n")
    assert b"\n" not in added.replace(b"\r\n", b"")
    assert read_section(added, "root-aurora") == dict(AURORA)
    assert remove_sections(added, ["root-aurora"]) == data


def test_values_libpq_cannot_read_back_are_refused() -> None:
    with pytest.raises(ServiceFileError, match="line breaks"):
        upsert_section(b"", "root-aurora", [("sslcert", "/tmp/a\nhost=evil")])
    with pytest.raises(ServiceFileError, match="leading/trailing spaces"):
        upsert_section(b"", "root-aurora", [("sslcert", "/tmp/a ")])
    with pytest.raises(ServiceFileError, match="service name"):
        upsert_section(b"", "root]-x", AURORA)


_line = st.one_of(
    st.sampled_from([b"", b"  ", b"# note", b"[prod]", b" [x] y", b"host=a ", b"k = v", b"[]"]),
    st.binary(max_size=12).filter(lambda b: b"\n" not in b),
)


@settings(max_examples=300, deadline=None)
@given(
    lines=st.lists(_line, max_size=12),
    crlf=st.booleans(),
    final_newline=st.booleans(),
)
def test_add_then_remove_gives_back_the_file(
    lines: list[bytes], crlf: bool, final_newline: bool
) -> None:
    ending = b"\r\n" if crlf else b"\n"
    data = ending.join(lines) + (ending if final_newline and lines else b"")
    if b"root-" in data:
        return
    added = upsert_section(data, "root-aurora", AURORA)
    added = upsert_section(added, "root-metrics", METRICS)
    restored = remove_sections(added, ["root-metrics", "root-aurora"])
    expected = data if not data or data.endswith(b"\n") else data + newline_of(data)
    assert restored == expected
    assert added.startswith(data)


# --- the file on disk ------------------------------------------------------------------------


def test_service_file_path_follows_pgservicefile(tmp_path: Path) -> None:
    assert service_file_path({"PGSERVICEFILE": str(tmp_path / "x.conf")}) == tmp_path / "x.conf"
    assert service_file_path({"HOME": "/home/alice"}) == Path("/home/alice/.pg_service.conf")


def test_writes_keep_the_mode_and_follow_a_symlink(tmp_path: Path) -> None:
    real = tmp_path / "dotfiles" / "pg_service.conf"
    real.parent.mkdir()
    real.write_bytes(FOREIGN)
    os.chmod(real, 0o640)
    link = tmp_path / ".pg_service.conf"
    link.symlink_to(real)
    ServiceFile(link).upsert("root-aurora", AURORA)
    assert link.is_symlink()
    assert stat.S_IMODE(real.stat().st_mode) == 0o640
    assert real.read_bytes().startswith(FOREIGN)
    assert ServiceFile(link).remove(["root-aurora"]) is True
    assert real.read_bytes() == FOREIGN
    assert ServiceFile(link).remove(["root-aurora"]) is False


def test_a_new_file_is_private(tmp_path: Path) -> None:
    path = tmp_path / "new.conf"
    ServiceFile(path).upsert("root-aurora", AURORA)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert ServiceFile(tmp_path / "absent.conf").remove(["root-aurora"]) is False


def _libpq_sees(path: Path, service: str) -> str:
    """What libpq resolves for `service` from `path`: psql's error for an unreachable host
    names the host and port it tried, which come from the service file."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PG")}
    env["PGSERVICEFILE"] = str(path)
    done = subprocess.run(
        ["psql", "-X", "-w", "-c", "select 1", f"service={service} connect_timeout=1"],
        capture_output=True, text=True, env=env, timeout=30, check=False,
    )
    assert done.returncode != 0
    return done.stderr


@pytest.mark.parametrize("crlf", [False, True])
def test_libpq_reads_our_section_and_the_users_sections(tmp_path: Path, crlf: bool) -> None:
    foreign = (
        b"# mine\n[prod]\nhost=/nonexistent/prod-socket\nport=6001\n\n"
        b"[root-aurora-old]\nhost=/nonexistent/old\n"
    )
    if crlf:
        foreign = foreign.replace(b"\n", b"\r\n")
    path = tmp_path / "pg_service.conf"
    path.write_bytes(foreign)
    ours = [("host", "/nonexistent/ours"), ("port", "6002"), ("user", "alice")]
    ServiceFile(path).upsert("root-aurora", ours)
    ServiceFile(path).upsert("root-metrics", [("host", "/nonexistent/metrics")])
    ServiceFile(path).remove(["root-metrics"])
    seen = _libpq_sees(path, "root-aurora")
    assert "/nonexistent/ours/.s.PGSQL.6002" in seen
    assert "/nonexistent/prod-socket/.s.PGSQL.6001" in _libpq_sees(path, "prod")
    assert "definition of service \"root-metrics\" not found" in _libpq_sees(path, "root-metrics")
