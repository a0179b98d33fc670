"""ComfyUI's prompt queue, as the stream registry needs it: re-queue the running prompt, ask a prompt's status.

A stream that spans queue runs re-queues its own prompt after each chunk with
a continuation marker on its loader node; these are the only places that know
the queue's internals (its tuples, its mutex, the server's prompt counter).
"""

from __future__ import annotations

import copy
import logging
import uuid
from typing import Any

log = logging.getLogger("infvsr")

MARKER_KEY = "infvsr_continue"
"""Input added to the loader node of a re-queued prompt: '<stream id>:<chunk index>'."""


class QueueBackend:
    """What the registry needs from ComfyUI's prompt queue; this base class is a queue of nothing."""

    def current_prompt_id(self) -> str | None:
        return None

    def requeue(self, node_id: str, marker: str) -> str | None:
        """Queue the running prompt again (front of the queue) with `marker` on `node_id`; its new id."""
        return None

    def status(self, prompt_id: str | None) -> str:
        """'pending', 'running', 'success', 'error' or 'unknown'."""
        return "unknown"

    def cancel(self, prompt_id: str) -> None:
        """Remove a queued (not yet running) prompt."""

    @property
    def live(self) -> bool:
        """True when runs really happen in the background (a watchdog is useful)."""
        return False


class ComfyQueue(QueueBackend):
    """ComfyUI's `PromptServer.instance.prompt_queue`."""

    def __init__(self, server: Any) -> None:
        self.server = server

    @property
    def live(self) -> bool:
        return True

    @property
    def queue(self) -> Any:
        return self.server.prompt_queue

    def current_prompt_id(self) -> str | None:
        return getattr(self.server, "last_prompt_id", None)

    def _running_item(self) -> tuple | None:
        current = self.current_prompt_id()
        with self.queue.mutex:
            items = list(self.queue.currently_running.values())
        for item in items:
            if item[1] == current:
                return item
        return items[0] if len(items) == 1 else None

    def requeue(self, node_id: str, marker: str) -> str | None:
        item = self._running_item()
        if item is None:
            log.warning("InfVSR stream: no running prompt found to queue the next chunk")
            return None
        prompt = copy.deepcopy(item[2])
        for node in prompt.values():
            node.pop("is_changed", None)
        prompt[node_id]["inputs"][MARKER_KEY] = marker
        with self.queue.mutex:
            number = -self.server.number  # negative: ahead of everything the user queued
            self.server.number += 1
        prompt_id = str(uuid.uuid4())
        rest = tuple(copy.deepcopy(x) for x in item[5:])
        self.queue.put((number, prompt_id, prompt, copy.deepcopy(item[3]), list(item[4]), *rest))
        return prompt_id

    def status(self, prompt_id: str | None) -> str:
        if prompt_id is None:
            return "unknown"
        queue = self.queue
        with queue.mutex:
            if any(item[1] == prompt_id for item in queue.currently_running.values()):
                return "running"
            if any(item[1] == prompt_id for item in queue.queue):
                return "pending"
            entry = queue.history.get(prompt_id)
        if entry is None:
            return "unknown"
        status = (entry.get("status") or {}).get("status_str")
        return "success" if status == "success" else "error"

    def cancel(self, prompt_id: str) -> None:
        try:
            self.queue.delete_queue_item(lambda item: item[1] == prompt_id)
        except Exception as e:  # noqa: BLE001
            log.debug("could not remove %s from the queue: %s", prompt_id, e)
