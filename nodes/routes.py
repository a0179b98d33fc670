"""HTTP routes for the web extension: list the server's streams, stop one; where InfVSR's weights are."""

from __future__ import annotations

import logging

from . import comfy
from .comfy_memory import memory_report
from .streams import REGISTRY

log = logging.getLogger("infvsr")


def register_routes() -> None:
    """Add /infvsr/streams (GET), /infvsr/streams/stop (POST) and /infvsr/memory (GET) to ComfyUI's server, if it
    runs."""
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

    @routes.get("/infvsr/memory")
    async def memory(request: web.Request) -> web.Response:
        """ComfyUI's loaded models, and for each loaded InfVSR model where its networks' weights are (whether
        ComfyUI holds them, how often it loaded and unloaded them)."""
        return web.json_response(memory_report())
