"""The policy language: roles, users, databases and the cluster, as YAML in a git repository."""
