"""`cnnops serve`: MLflow's scoring server for `models:/<name>@<alias>`, raw pixels enforced.

A thin ASGI guard in front of MLflow's own app answers a JSON request that is not raw pixels of
the model's shape with a 400 and the model's own one-line message (`images_problem`), before
MLflow sees it: MLflow would paste the whole payload into its error, and a model registered with
an input schema would have its JSON numbers cast to uint8 (normalized 0.42 silently becoming
pixel 0). Everything else (routes, formats, errors) is MLflow's server.
"""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable, MutableMapping
from typing import TYPE_CHECKING, Any

import numpy as np

from cnnops.registry.model import expected_input, image_shape, images_problem
from cnnops.registry.store import connect, load_model

if TYPE_CHECKING:
    from cnnops.config import Config

Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]


def pixel_problem(body: bytes, shape: tuple[int, ...]) -> str | None:
    """Why a JSON `inputs`/`instances` payload is not raw images of `shape` (C, H, W), in the
    words `predict` would use for the same pixels as an array; None when it is, or when the
    body is another format (MLflow's parser answers those)."""
    try:
        payload = json.loads(body)
    except ValueError:
        return None  # not JSON: MLflow's parser gives its own answer
    data = payload.get("inputs", payload.get("instances")) if isinstance(payload, dict) else None
    if not isinstance(data, list):
        return None
    odd = first_non_pixel(data)
    if odd is None:  # integers 0..255 only: the uint8 array a Python caller would send
        try:
            return images_problem(np.asarray(data, dtype=np.uint8), shape)
        except ValueError:
            return images_problem(data, shape)  # ragged
    # As numpy reads the values (float64, bool, int64...); a true among integers reads as 1.
    return images_problem(data, shape) or (
        f"expected {expected_input(shape)}; got {odd!r} among the pixel values"
    )


def first_non_pixel(data: list) -> Any:
    """The first value in nested lists that is not an integer 0..255 (a bool is not); None."""
    stack = [data]
    while stack:
        item = stack.pop()
        if isinstance(item, list):
            stack.extend(reversed(item))
        elif isinstance(item, bool) or not isinstance(item, int) or not 0 <= item <= 255:
            return item
    return None


class RawPixelsOnly:
    """ASGI middleware: a 400 for anything but raw images of `shape` posted to /invocations."""

    def __init__(
        self,
        app: Callable[[Message, Receive, Send], Awaitable[None]],
        shape: tuple[int, ...],
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
