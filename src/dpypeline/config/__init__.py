"""The configuration: its typed model, the YAML file it is read from, and the trust checks
on what it names (task modules, credentials)."""
