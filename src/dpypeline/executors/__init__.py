"""Where a job's tasks run: in the service's own threads or on a Dask cluster, committing to
each resource in queue order (:mod:`dpypeline.ordering`)."""
