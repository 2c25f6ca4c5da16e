"""A small Starlette app with pixels: the middleware given to Starlette's constructor.

Same routes as the FastAPI site, in plain Starlette. Records go to the store
named by ``PIXEL_STORE``; ``PIXEL_DURABLE=0`` answers before the commit.
"""

from __future__ import annotations

import os
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager

from _lifespan_log import note
from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, StreamingResponse
from starlette.routing import Route, WebSocketRoute
from starlette.websockets import WebSocket

from pixel_middleware import PixelASGIMiddleware


@asynccontextmanager
async def lifespan(app: Starlette) -> AsyncIterator[None]:
    note("startup")
    app.state.started = True
    yield
    note("shutdown")


async def index(request: Request) -> PlainTextResponse:
    return PlainTextResponse("Hello from Starlette")


async def started(request: Request) -> JSONResponse:
    return JSONResponse({"started": bool(getattr(request.app.state, "started", False))})


async def create_order(request: Request) -> JSONResponse:
    return JSONResponse({"received": await request.json()}, status_code=201)


async def stream(request: Request) -> StreamingResponse:
    def chunks() -> Iterator[str]:
        yield from ("one,", "two,", "three")

    return StreamingResponse(chunks(), media_type="text/plain")


async def echo(websocket: WebSocket) -> None:
    await websocket.accept()
    text = await websocket.receive_text()
    await websocket.send_text(f"echo: {text}")
    await websocket.close()


app = Starlette(
    routes=[
        Route("/", index),
        Route("/started", started),
        Route("/orders", create_order, methods=["POST"]),
        Route("/stream", stream),
        WebSocketRoute("/ws", echo),
    ],
    middleware=[
        Middleware(
            PixelASGIMiddleware,
            write_keys={"starlette-key"},
            durable=os.environ.get("PIXEL_DURABLE", "1") != "0",
        )
    ],
    lifespan=lifespan,
)
