"""`facelab serve`: an HTTP API (FastAPI) and a browser page over facelab's public functions."""

from facelab.serve.app import ServeConfig, create_app
from facelab.serve.security import ApiKeys, KeyConfigError

__all__ = ["ApiKeys", "KeyConfigError", "ServeConfig", "create_app"]
