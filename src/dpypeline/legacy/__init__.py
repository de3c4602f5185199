"""The compatibility layer: the original dpypeline's Python API, its tagged YAML and the
conversion to today's config, all running on this engine.

Nothing outside this package imports it but the command line (``dpypeline migrate`` and the
original's ``-i``) and the thin modules at the original's import paths
(``dpypeline.akita``, ``dpypeline.etl_pipeline``, ``dpypeline.event_consumer``), which
re-export what lives here.
"""
