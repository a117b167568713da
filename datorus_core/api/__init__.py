"""The customer REST API (CONTRACT.md section 5, "Accounts").

``create_app(settings)`` builds the FastAPI application; the gateway serves it as a
task in mitmproxy's event loop (``addons/api_server.py``) and ``datorus api`` serves
it standalone. Both share the SQLite ledger.
"""

from .app import create_app

__all__ = ["create_app"]
