"""The original dpypeline's watcher API (``Akita``), kept so its users' scripts run unchanged."""
