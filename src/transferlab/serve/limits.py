"""The upload size cap, enforced before and while the body streams in.

Starlette parses a multipart body before the endpoint runs, so the cap sits in the ASGI receive path: a
declared ``Content-Length`` above it is answered with 413 at once, without reading the body; a body that
grows past it (no or a false Content-Length) stops being read and is answered with 413 by the app's
exception handler. (Starlette's own body limit answers in plain text; every error of this API is JSON.)
"""

from __future__ import annotations

import json

from starlette.exceptions import HTTPException


class UploadTooLarge(HTTPException):
    def __init__(self) -> None:
        super().__init__(status_code=413, detail="upload too large")


class UploadLimit:
    def __init__(self, app, max_bytes: int, message: str):
        self.app, self.max_bytes, self.message = app, max_bytes, message

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        declared = dict(scope.get("headers") or []).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_bytes:
            return await self._refuse(send)
        seen = 0

        async def counted():
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.max_bytes:
                    raise UploadTooLarge
            return message

        await self.app(scope, counted, send)

    async def _refuse(self, send) -> None:
        body = json.dumps({"detail": self.message}).encode()
        await send({"type": "http.response.start", "status": 413,
                    "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                                (b"connection", b"close")]})
        await send({"type": "http.response.body", "body": body})
