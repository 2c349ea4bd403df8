"""`schemas.policy.loader.load_policy`: files in, a Policy or positioned problems out."""

from __future__ import annotations

from schemas.policy.loader import MAX_FILE_BYTES, field_path, load_policy, policy_kind
from schemas.policy.models import Policy
from schemas.policy.problems import Problem
from tests.policy.conftest import EXAMPLES

EXAMPLE_FILES = {str(p.relative_to(EXAMPLES)): p.read_bytes() for p in EXAMPLES.rglob("*.yaml")}
CLUSTER = b"kind: cluster\nversion: v1\nmetadata:\n  name: root\n"


def test_the_example_repository_loads_into_a_policy() -> None:
    result = load_policy(EXAMPLE_FILES)
    assert result.problems == []
    assert result.files == 8
    policy = result.policy
    assert isinstance(policy, Policy)
    assert policy.cluster.name == "root"
    assert policy.cluster.spec.disconnect_expired_cert is True
    assert sorted(policy.roles) == ["access", "dba", "developer"]
    assert sorted(policy.users) == ["alice", "bob"]
    assert sorted(policy.databases) == ["aurora", "local"]
    alice = policy.users["alice"]
    assert alice.spec.roles == ["access"]
    assert alice.spec.traits == {"db_names": ["postgres"], "db_users": ["alice"]}
    access = policy.roles["access"].spec.allow
    assert access.db_users == ["{{internal.db_users}}"]
    assert access.db_names == ["{{internal.db_names}}"]
    dba = policy.roles["dba"].spec
    assert dba.allow.db_labels == {"*": ["*"]}
    assert dba.deny.db_labels == {"env": ["prod"]}
    assert (dba.deny.db_users, dba.deny.db_names) == (["postgres"], ["postgres"])
    assert policy.roles["developer"].spec.allow.db_labels == {"env": ["dev", "stage"]}
    aurora = policy.databases["aurora"]
    assert aurora.spec.aws is not None and aurora.spec.aws.region == "us-west-1"
    assert aurora.spec.uri.startswith("postgres-aurora-instance-1.")
    assert aurora.metadata.labels == {"env": "dev"}
    assert policy.databases["local"].metadata.labels == {"env": "dev"}


def test_layout() -> None:
    assert policy_kind("cluster.yaml") == "cluster"
    assert policy_kind("cluster.yml") == "cluster"
    assert policy_kind("roles/a/b/c.yml") == "role"
    assert policy_kind("users/x.yaml") == "user"
    assert policy_kind("databases/x.yaml") == "db"
    for ignored in ("README.md", "roles/x.json", "roles.yaml", "other/x.yaml", "sub/cluster.yaml"):
        assert policy_kind(ignored) is None


def test_other_files_are_ignored_and_not_counted() -> None:
    files = {**EXAMPLE_FILES, "README.md": b"\xff", "roles/notes.txt": b"- x", ".ci/x.yaml": b"["}
    result = load_policy(files)
    assert result.problems == []
    assert result.files == 8


def test_one_error_means_no_policy_warnings_do_not() -> None:
    files = dict(EXAMPLE_FILES)
    files["roles/extra.yaml"] = (
        b"kind: role\nversion: v5\nmetadata:\n  name: extra\nspec:\n  allow:\n"
        b"    db_labels: {env: dev}\n    db_users: ['*']\n"
    )
    result = load_policy(files)
    assert result.policy is not None
    assert [str(p) for p in result.warnings] == [
        "roles/extra.yaml:4:9: role/extra: metadata.name: no user has this role: give it to "
        "a user in users/, or remove it",
        "roles/extra.yaml:8:16: role/extra: spec.allow.db_users: allows every database user "
        "('*') and denies none: add spec.deny.db_users (e.g. [postgres]) so superuser "
        "accounts stay out of reach",
    ]
    assert result.errors == []
    files["users/bob.yaml"] = files["users/bob.yaml"].replace(b"dba]", b"dbb]")
    result = load_policy(files)
    assert result.policy is None
    assert [str(p) for p in result.errors] == [
        "users/bob.yaml:8:22: user/bob: spec.roles[1]: role 'dbb' does not exist; "
        "did you mean 'dba'?"
    ]


def test_problems_are_sorted_by_path_line_col() -> None:
    files = {
        "cluster.yaml": CLUSTER,
        "users/b.yaml": b"kind: user\nversion: v2\nmetadata: {name: b}\nspec: {roles: [x, y]}\n",
        "users/a.yaml": b"kind: user\nversion: v2\nmetadata: {name: a}\nspec: {roles: [z]}\n",
        "roles/a.yaml": b"kind: role\nversion: v5\nmetadata: {name: r}\nspec: {bad: 1}\n",
    }
    problems = load_policy(files).problems
    keys = [(p.path, p.line, p.col) for p in problems]
    assert keys == sorted(keys)
    assert [p.path for p in problems] == [
        "roles/a.yaml",
        "users/a.yaml",
        "users/b.yaml",
        "users/b.yaml",
    ]


def test_cluster_yml_alone_is_fine() -> None:
    files = {("cluster.yml" if k == "cluster.yaml" else k): v for k, v in EXAMPLE_FILES.items()}
    assert load_policy(files).policy is not None


def test_a_cluster_file_without_a_cluster() -> None:
    files = {**EXAMPLE_FILES, "cluster.yaml": b"# to do\n"}
    assert [str(p) for p in load_policy(files).problems] == [
        "cluster.yaml: the file holds no cluster resource: write kind: cluster, version: v1, "
        "metadata.name",
    ]


def test_oversized_file_is_not_parsed() -> None:
    files = {**EXAMPLE_FILES, "roles/big.yaml": b"#" * (MAX_FILE_BYTES + 1)}
    result = load_policy(files)
    assert [(p.path, p.rule) for p in result.problems] == [("roles/big.yaml", "file-too-large")]


def test_unread_files_silence_guesses_about_their_kind() -> None:
    files = dict(EXAMPLE_FILES)
    del files["roles/dba.yaml"]
    assert [p.rule for p in load_policy(files).problems] == ["unknown-role"]
    assert load_policy(files, unread=["roles/dba.yaml"]).problems == []
    del files["cluster.yaml"]
    assert load_policy(files, unread=["cluster.yaml", "roles/dba.yaml"]).problems == []


def test_a_role_with_errors_still_counts_as_existing() -> None:
    files = dict(EXAMPLE_FILES)
    files["roles/dba.yaml"] = files["roles/dba.yaml"].replace(
        b"db_names: [postgres]", b"db_name: x"
    )
    rules = [p.rule for p in load_policy(files).problems]
    assert rules == ["unknown-field"]


def test_field_path() -> None:
    assert field_path(("spec", "roles", 0)) == "spec.roles[0]"
    assert field_path(("spec", "allow", "db_labels", "env")) == "spec.allow.db_labels.env"
    assert field_path(()) == ""


def test_problem_text_leaves_out_empty_parts() -> None:
    full = Problem("roles/a.yaml", 3, 5, "error", "role/a", "spec.allow", "bad", "invalid-value")
    assert str(full) == "roles/a.yaml:3:5: role/a: spec.allow: bad"
    assert full.render(severity=True) == "roles/a.yaml:3:5: error: role/a: spec.allow: bad"
    bare = Problem("cluster.yaml", 0, 0, "warning", "", "", "gone", "cluster-missing")
    assert str(bare) == "cluster.yaml: gone"
    assert Problem("a.yaml", 2, 0, "error", "", "", "m", "yaml-syntax").location == "a.yaml:2"
