"""How the service is seen from outside: logs, Prometheus metrics and systemd's STATUS."""
