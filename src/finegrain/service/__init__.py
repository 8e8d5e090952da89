"""The HTTP service: a JSON search API and a web page over one index (``finegrain serve``).

``create_app(index_path, api_key=None, limits=None, reload_interval=1.0)``
returns a FastAPI app; run it with uvicorn. See ``docs/service.md``.
"""

from .app import ApiError, ServiceLimits, create_app

__all__ = ["create_app", "ServiceLimits", "ApiError"]
