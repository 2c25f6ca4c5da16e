"""A small FastAPI app with pixels, wrapped the way the README tells users to.

Its own routes (a POST with a JSON body, a streaming answer, a websocket echo)
and its lifespan must work exactly as without the middleware. Records go to the
store named by ``PIXEL_STORE``; ``PIXEL_DURABLE=0`` answers before the commit.
"""

from __future__ import annotations

import os
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from typing import Any

from _lifespan_log import note
from fastapi import FastAPI, WebSocket
from fastapi.responses import PlainTextResponse, StreamingResponse

from pixel_middleware import PixelASGIMiddleware


@asynccontextmanager
async def lifespan(app: FastAPI) -> AsyncIterator[None]:
    note("startup")
    app.state.started = True
    yield
    note("shutdown")


app = FastAPI(lifespan=lifespan)


@app.get("/", response_class=PlainTextResponse)
async def index() -> str:
    return "Hello from FastAPI"


@app.get("/started")
async def started() -> dict[str, bool]:
    return {"started": bool(getattr(app.state, "started", False))}


@app.post("/orders", status_code=201)
async def create_order(order: dict[str, Any]) -> dict[str, Any]:
    return {"received": order}


@app.get("/stream")
async def stream() -> StreamingResponse:
    def chunks() -> Iterator[str]:
        yield from ("one,", "two,", "three")

    return StreamingResponse(chunks(), media_type="text/plain")


@app.websocket("/ws")
async def echo(websocket: WebSocket) -> None:
    await websocket.accept()
    text = await websocket.receive_text()
    await websocket.send_text(f"echo: {text}")
    await websocket.close()


app.add_middleware(
    PixelASGIMiddleware,
    write_keys={"fastapi-key"},
    durable=os.environ.get("PIXEL_DURABLE", "1") != "0",
)
