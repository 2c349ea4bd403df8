"""`tctl users` and `tctl tokens` through `tctl main()`, on the data dir of a running control
plane, with what they print used against the real API (signup, login, join)."""

from __future__ import annotations

import json
import re
from datetime import UTC, datetime
from pathlib import Path

import pytest
import yaml

from control import hosted
from control.state import Attempt, ReconcileState, save_state
from control.tctl import main as tctl
from control.tctl import users_cmd
from control.users import SecretsStore
from tests.api.conftest import PASSWORD, ApiCluster

Capture = pytest.CaptureFixture[str]


def _run(cluster: ApiCluster, capsys: Capture, *argv: str) -> tuple[int, str, str]:
    code = tctl([*argv, "--data-dir", str(cluster.data_dir)])
    out, err = capsys.readouterr()
    return code, out, err


def _signup_token(out: str, name: str) -> str:
    match = re.search(
        rf"tsh login --proxy=proxy\.example\.test:3080 --user={name} "
        rf"--ca-pin=sha256:[0-9a-f]{{64}} --signup-token=(\S+)\n",
        out,
    )
    assert match, out
    return match.group(1)


def _branch_head(cluster: ApiCluster) -> str:
    return hosted.git(["rev-parse", "refs/heads/main"], cwd=hosted.repo_path(cluster.data_dir))


def _wait_for_user(cluster: ApiCluster, name: str, present: bool) -> None:
    def check(_state: object) -> bool:
        bundle = cluster.running.plane.reconciler.current_bundle()  # type: ignore[union-attr]
        return bundle is not None and (name in bundle.users) == present

    cluster.running.wait_for(check)


# --- users -------------------------------------------------------------------------------------


def test_users_add_commits_the_user_and_prints_a_working_signup_line(
    cluster: ApiCluster, capsys: Capture
) -> None:
    code, out, _ = _run(
        cluster, capsys, "users", "add", "alice", "root", "--db-names=postgres",
        "--db-users=alice",
    )
    assert code == 0
    assert "User 'alice' added: users/alice.yaml" in out
    # tctl waited until the control plane put the commit in force: the user is in the
    # bundle already, so the printed tsh login line works at once.
    assert re.search(r"^In force: bundle serial \d+\.$", out, re.MULTILINE), out
    bundle = cluster.running.plane.reconciler.current_bundle()  # type: ignore[union-attr]
    assert bundle is not None and "alice" in bundle.users
    token = _signup_token(out, "alice")
    text = hosted.read_file(hosted.repo_path(cluster.data_dir), "users/alice.yaml")
    assert text is not None
    assert yaml.safe_load(text) == {
        "kind": "user",
        "version": "v2",
        "metadata": {"name": "alice"},
        "spec": {
            "roles": ["access"],
            "traits": {"logins": ["root"], "db_names": ["postgres"], "db_users": ["alice"]},
        },
    }
    cluster.call("POST", "/v1/signup", json={"token": token, "password": PASSWORD}
                 ).raise_for_error()
    cluster.login("alice")

    code, out, _ = _run(cluster, capsys, "users", "ls")
    assert code == 0
    row = next(line for line in out.splitlines() if line.startswith("alice "))
    assert "access" in row and " set " in f"{row} "

    code, _, err = _run(cluster, capsys, "users", "add", "alice")
    assert code == 2
    assert "already exists" in err and "tctl users reset alice" in err


def test_users_add_with_an_unknown_role_shows_the_lint_error_and_changes_nothing(
    cluster: ApiCluster, capsys: Capture
) -> None:
    before = _branch_head(cluster)
    code, out, err = _run(cluster, capsys, "users", "add", "mallory", "--roles=acess")
    assert code == 1
    assert out == ""
    assert "users/mallory.yaml" in err
    assert "role 'acess' does not exist; did you mean 'access'?" in err
    assert _branch_head(cluster) == before
    assert SecretsStore(cluster.data_dir).status("mallory").signup_expires is None


def test_users_add_warns_that_a_star_in_a_trait_is_literal(
    cluster: ApiCluster, capsys: Capture
) -> None:
    code, _, err = _run(cluster, capsys, "users", "add", "wanda", "--db-users=*,wanda")
    assert code == 0
    assert (
        "tctl: warning: users/wanda.yaml:"  # the hook's lint warning, at the value
    ) in err
    assert (
        "user/wanda: spec.traits.db_users[0]: '*' is taken literally: a role template never "
        "turns a trait into a wildcard or a regular expression"
    ) in err
    assert "'wanda' is taken literally" not in err


def test_users_add_refuses_a_bad_name(cluster: ApiCluster, capsys: Capture) -> None:
    code, _, err = _run(cluster, capsys, "users", "add", "../etc")
    assert code == 2
    assert "not a valid user name" in err


def test_users_reset_gives_a_new_token_and_clears_the_password(
    cluster: ApiCluster, capsys: Capture
) -> None:
    code, out, _ = _run(cluster, capsys, "users", "add", "rita", "--db-users=rita")
    assert code == 0
    _wait_for_user(cluster, "rita", True)
    first = _signup_token(out, "rita")
    cluster.call("POST", "/v1/signup", json={"token": first, "password": PASSWORD}
                 ).raise_for_error()
    code, out, _ = _run(cluster, capsys, "users", "reset", "rita")
    assert code == 0
    second = _signup_token(out, "rita")
    assert second != first
    response, _ = cluster.login_response("rita")
    assert response.status == 401
    code, out, _ = _run(cluster, capsys, "users", "ls", "--format=json")
    (rita,) = [u for u in json.loads(out)["users"] if u["name"] == "rita"]
    assert rita["password_set"] is False and rita["signup_expires"]
    cluster.call("POST", "/v1/signup", json={"token": second, "password": "a new password!"}
                 ).raise_for_error()
    cluster.login("rita", "a new password!")
    code, _, err = _run(cluster, capsys, "users", "reset", "nobody")
    assert code == 2 and "not on the policy branch" in err


def test_users_rm_removes_the_file_and_the_secrets(cluster: ApiCluster, capsys: Capture) -> None:
    code, out, _ = _run(cluster, capsys, "users", "add", "otto", "--db-users=otto")
    assert code == 0
    _wait_for_user(cluster, "otto", True)
    token = _signup_token(out, "otto")
    cluster.call("POST", "/v1/signup", json={"token": token, "password": PASSWORD}
                 ).raise_for_error()
    cluster.login("otto")
    code, out, _ = _run(cluster, capsys, "users", "rm", "otto")
    assert code == 0 and "removed" in out
    assert hosted.read_file(hosted.repo_path(cluster.data_dir), "users/otto.yaml") is None
    assert not SecretsStore(cluster.data_dir).status("otto").password_set
    _wait_for_user(cluster, "otto", False)
    response, _ = cluster.login_response("otto")
    assert response.json()["error"]["message"] == "invalid user name or password"
    code, _, err = _run(cluster, capsys, "users", "rm", "otto")
    assert code == 2 and "not on the policy branch" in err


# --- tokens ----------------------------------------------------------------------------------


def test_tokens_add_prints_the_seed_command_and_the_token_joins(
    cluster: ApiCluster, capsys: Capture
) -> None:
    code, out, _ = _run(
        cluster, capsys, "tokens", "add", "--type=db", "--db-name=test", "--db-protocol=postgres",
        "--db-uri=db.example.com:5432",
    )
    assert code == 0
    token = re.search(r"The invite token: ([0-9a-f]{32})\n", out)
    assert token, out
    pin = re.search(r"--ca-pin=(sha256:[0-9a-f]{64})", out)
    assert pin
    assert (
        "teleport start \\\n"
        "   --roles=db \\\n"
        f"   --token={token.group(1)} \\\n"
        f"   --ca-pin={pin.group(1)} \\\n"
        "   --auth-server=proxy.example.test:3080 \\\n"
        "   --db-name=test \\\n"
        "   --db-protocol=postgres \\\n"
        "   --db-uri=db.example.com:5432\n"
    ) in out
    assert pin.group(1) == cluster.call("GET", "/v1/ping").json()["ca_fingerprints"]["host"]
    cluster.join("db", token.group(1))
    cluster.join("db", token.group(1))  # not single-use: joins until it expires

    code, out, _ = _run(cluster, capsys, "tokens", "ls")
    assert code == 0
    assert "cbde…" in out and "static" in out
    assert token.group(1) not in out
    code, out, _ = _run(cluster, capsys, "tokens", "ls", "--format=json")
    (listed,) = [t for t in json.loads(out)["dynamic"] if t["db_name"] == "test"]

    code, out, _ = _run(cluster, capsys, "tokens", "rm", listed["id"])
    assert code == 0 and listed["id"] in out
    response, _ = cluster.join_response("db", token.group(1))
    assert response.status == 401


def test_tokens_add_single_use_and_proxy(cluster: ApiCluster, capsys: Capture) -> None:
    code, out, _ = _run(
        cluster, capsys, "tokens", "add", "--type=proxy", "--single-use", "--ttl=5m",
        "--format=json",
    )
    assert code == 0
    made = json.loads(out)
    assert made["roles"] == ["proxy"] and made["single_use"] is True
    assert "--roles=proxy" in made["command"]
    assert "--auth-server=auth.example.test:3025" in made["command"]
    cluster.join("proxy", made["token"])
    assert cluster.join_response("proxy", made["token"])[0].status == 401


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["tokens", "add", "--type=node"], "only db and proxy"),
        (["tokens", "add", "--type=db", "--ttl=soon"], "--ttl"),
        (["tokens", "add", "--type=db", "--db-uri=nohost"], "need --db-name"),
        (["tokens", "add", "--type=db", "--db-name=x", "--db-uri=nohost"], "host:port"),
        (["tokens", "rm", "cbdeeab9-6f88-436d-a673-44d14bd86bb7"], "static token"),
        (["tokens", "rm", "0000000000"], "no dynamic token"),
    ],
)
def test_tokens_usage_errors(
    cluster: ApiCluster, capsys: Capture, argv: list[str], message: str
) -> None:
    code, _, err = _run(cluster, capsys, *argv)
    assert code == 2
    assert message in err


def test_commands_on_a_data_dir_never_started_say_so(
    tmp_path: Path, capsys: Capture
) -> None:
    for argv in (["users", "ls"], ["users", "add", "amy"], ["tokens", "add", "--type=db"]):
        assert tctl([*argv, "--data-dir", str(tmp_path)]) == 2
        assert "has no control.json" in capsys.readouterr().err


def test_in_force_note_says_how_a_commit_fared(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    assert "not running" in users_cmd.in_force_note(tmp_path, "c" * 40)
    monkeypatch.setattr(users_cmd, "control_plane_running", lambda _data_dir: True)
    state = ReconcileState()
    state.record(Attempt(commit="f" * 40, at=datetime.now(UTC), result="failed",
                         error_count=2))
    save_state(tmp_path / "state.json", state)
    assert users_cmd.in_force_note(tmp_path, "f" * 40) == (
        f"NOT in force: the control plane refused commit {'f' * 12} (2 error(s)); "
        "`tctl status` shows them."
    )
    note = users_cmd.in_force_note(tmp_path, "a" * 40, timeout=0.2)
    assert note.startswith("Not in force yet after 0 s")
