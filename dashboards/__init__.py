"""Grafana dashboards as code, generated into provisioning/ by ``python -m dashboards``."""
