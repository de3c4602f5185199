"""The original dpypeline's event consumers: they start this dpypeline's service on an
``Akita``'s directory with a pipeline's jobs (``runner``)."""
