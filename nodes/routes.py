"""HTTP routes for the web extension: list the server's streams, stop one."""

from __future__ import annotations

import logging

from . import comfy
from .streams import REGISTRY

log = logging.getLogger("infvsr")


def register_routes() -> None:
    """Add /infvsr/streams (GET) and /infvsr/streams/stop (POST) to ComfyUI's server, if it runs."""
    instance = comfy.server_instance()
    if instance is None or not hasattr(instance, "routes"):
        return
    from aiohttp import web

    routes = instance.routes

    @routes.get("/infvsr/streams")
    async def list_streams(request: web.Request) -> web.Response:
        return web.json_response({"streams": REGISTRY.summary()})

    @routes.post("/infvsr/streams/stop")
    async def stop_stream(request: web.Request) -> web.Response:
        try:
            body = await request.json()
        except ValueError:
            body = {}
        stream_name = str(body.get("stream_name") or "")
        if not stream_name:
            return web.json_response({"error": "give the stream's name (stream_name)"}, status=400)
        stopped = REGISTRY.request_stop(stream_name)
        return web.json_response({"stream_name": stream_name, "stopping": stopped})
