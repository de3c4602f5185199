"""Built-in tasks. Each is registered by its short name in the ``dpypeline.tasks``
entry-point group (``pyproject.toml``), as an installed package registers its own."""
