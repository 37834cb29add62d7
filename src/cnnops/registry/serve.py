"""`cnnops serve`: MLflow's scoring server for `models:/<name>@<alias>`, raw pixels enforced.

MLflow's JSON parser casts every number to the signature's dtype, so normalized floats (0.42)
would silently become pixel 0. A thin ASGI guard in front of MLflow's own app refuses them
with a 400 before the cast; everything else (routes, formats, errors) is MLflow's server.
"""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable, MutableMapping
from typing import TYPE_CHECKING, Any

import numpy as np

from cnnops.registry.model import image_shape
from cnnops.registry.store import connect, load_model

if TYPE_CHECKING:
    from cnnops.config import Config

Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]


def pixel_problem(body: bytes, shape: tuple[int, ...] | None = None) -> str | None:
    """Why a JSON `inputs`/`instances` payload is not raw uint8 pixels; None when it is."""
    try:
        payload = json.loads(body)
    except ValueError:
        return None  # not JSON: MLflow's parser gives its own answer
    data = payload.get("inputs", payload.get("instances")) if isinstance(payload, dict) else None
    stack = [data] if isinstance(data, list) else []
    while stack:
        item = stack.pop()
        if isinstance(item, list):
            stack.extend(item)
        elif isinstance(item, bool) or not isinstance(item, int) or not 0 <= item <= 255:
            return (
                f"expected raw uint8 images: integer pixel values 0..255 in (N, C, H, W) "
                f"lists, got {item!r}; send pixels as they are, not normalized"
            )
    if shape is None or not isinstance(data, list):
        return None
    try:
        got = np.asarray(data, dtype=np.int64).shape
    except ValueError:
        got = ("ragged",)
    if len(got) != 4 or got[1:] != shape:
        # MLflow would answer too, but with the whole payload pasted into its message.
        return f"expected images of shape (N, {', '.join(map(str, shape))}); got {got}"
    return None


class RawPixelsOnly:
    """ASGI middleware: a 400 for non-uint8 pixels or wrong image shapes posted to /invocations."""

    def __init__(
        self,
        app: Callable[[Message, Receive, Send], Awaitable[None]],
        shape: tuple[int, ...] | None = None,
    ) -> None:
        self.app, self.shape = app, shape

    async def __call__(self, scope: Message, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"] != "/invocations" or scope["method"] != "POST":
            await self.app(scope, receive, send)
            return
        body, more = b"", True
        while more:
            message = await receive()
            body += message.get("body", b"")
            more = message.get("more_body", False)
        problem = pixel_problem(body, self.shape)
        if problem is not None:
            await _reply(send, 400, {"error_code": "BAD_REQUEST", "message": problem})
            return
        replayed = False

        async def replay() -> Message:
            nonlocal replayed
            if replayed:
                return await receive()
            replayed = True
            return {"type": "http.request", "body": body, "more_body": False}

        await self.app(scope, replay, send)


async def _reply(send: Send, status: int, content: dict[str, str]) -> None:
    body = json.dumps(content).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


def serve(config: Config, alias: str, host: str, port: int) -> None:
    """Load `name@alias` from the registry and answer /invocations until stopped."""
    import uvicorn
    from mlflow.pyfunc import scoring_server

    client = connect(config.mlflow)
    model, version = load_model(client, config.registry.model_name, alias)
    print(
        f"serving models:/{config.registry.model_name}@{alias} (version {version.version}) "
        f"on http://{host}:{port}/invocations",
        flush=True,
    )
    shape = image_shape(model.unwrap_python_model().model)
    app = RawPixelsOnly(scoring_server.init(model), shape)
    uvicorn.run(app, host=host, port=port, log_level="warning")
