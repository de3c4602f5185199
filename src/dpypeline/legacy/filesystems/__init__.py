"""The original dpypeline's object-store filesystem (``ObjectStoreS3``), for task code that
used it."""
