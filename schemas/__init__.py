"""The contract both planes share: policy language, RBAC, bundle, identity, API bodies, audit.

Nothing here imports the rest of the project, does I/O on its own initiative, or keeps
process-wide state. Both the control plane and the data plane depend on this package.
"""
