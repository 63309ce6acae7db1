"""The OpenAI-compatible image server (`ditserve serve`): FastAPI app, engine worker, metrics.

    from ditserve.server import ServerConfig, create_app, run_server

See `app.py` for the endpoints, `worker.py` for the queue and batching, `metrics.py` for /metrics.
"""

from ditserve.server.app import create_app, run_server
from ditserve.server.config import DEFAULT_HOST, DEFAULT_PORT, ServerConfig

__all__ = ["DEFAULT_HOST", "DEFAULT_PORT", "ServerConfig", "create_app", "run_server"]
