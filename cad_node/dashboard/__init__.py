"""The admin dashboard: server-rendered pages over the job database, and the Prometheus endpoint."""

from cad_node.dashboard.app import create_app

__all__ = ["create_app"]
