"""`tsh`: the user's command line: log in, list databases, get database certificates."""
