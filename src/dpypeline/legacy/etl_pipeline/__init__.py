"""The original dpypeline's jobs and pipelines API, on this dpypeline's ``Job`` and ``Task``."""
