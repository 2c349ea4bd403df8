"""The control plane: reads policy from git, lints, compiles, signs and publishes bundles,
acts as certificate authority and serves the API. Never imports the data plane."""
