"""Finding files: watch events, scans, the settle delay and the patterns that select files."""
