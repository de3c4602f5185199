"""Where a job's tasks run: in the service's own threads or on a Dask cluster, in store order."""
