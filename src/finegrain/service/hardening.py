"""Small hardening wrappers for the service's static files."""

from __future__ import annotations

from starlette.staticfiles import StaticFiles


class StaticFilesNoRange(StaticFiles):
    """``StaticFiles`` that ignores ``Range`` headers.

    The page's few small files never need partial responses, and Starlette
    answers a malformed ``Range`` with a plain-text 400; without the header
    every answer is the whole file (or a JSON error from the app).
    """

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] == "http":
            headers = [(k, v) for k, v in scope.get("headers", ()) if k.lower() != b"range"]
            scope = {**scope, "headers": headers}
        await super().__call__(scope, receive, send)
