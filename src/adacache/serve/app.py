"""The Ray Serve deployment: HTTP in front of :class:`adacache.serve.generation.Generator`.

Each replica compiles (and captures) the model once at start-up. A replica runs one call of
the model at a time, in a worker thread off its event loop, each call in an adacache session
of its own, so no request ever reads another's cache; the requests that arrive while it runs
wait, and are handed over together as the next batch (``@serve.batch``). More replicas serve
more calls at once. ``max_ongoing_requests`` bounds what a replica accepts; Ray Serve queues
the rest at the proxy.
"""

from __future__ import annotations

import asyncio
from typing import Any

from ray import serve

from ..errors import InputError
from .generation import GenerationRequest, GenerationResult, Generator


class GenerationDeployment:
    """One replica: a compiled generator answering JSON POSTs (see :func:`build_app`).

    Requests that arrive within ``batch_wait_s`` of each other (up to ``max_batch_size``)
    are handed to the generator together, which runs compatible ones as one call of the
    model only where that changes no request's images
    (:meth:`~adacache.serve.generation.Generator.generate_many`)."""

    def __init__(self, policy: str, threads: int | None = None, max_batch_size: int = 1, batch_wait_s: float = 0.0) -> None:
        self.generator = Generator(policy, threads=threads)
        self._answer.set_max_batch_size(max_batch_size)
        self._answer.set_batch_wait_timeout_s(batch_wait_s)

    @serve.batch(max_batch_size=1, batch_wait_timeout_s=0.0)
    async def _answer(self, requests: list[GenerationRequest]) -> list[GenerationResult]:
        return await asyncio.to_thread(self.generator.generate_many, requests)

    async def __call__(self, request: Any) -> Any:
        from starlette.responses import JSONResponse

        try:
            body = await request.json()
        except ValueError:
            return JSONResponse({"error": "the request body is not JSON; send a JSON object such as "
                                          "{\"class_labels\": [3], \"seeds\": [0], \"num_inference_steps\": 50}"}, status_code=400)
        try:
            parsed = self.generator.parse(body)
        except InputError as exc:
            return JSONResponse({"error": str(exc)}, status_code=400)
        result = await self._answer(parsed)
        return JSONResponse(result.to_json())


def build_app(policy: str = "FORA(interval=3)", *, replicas: int = 1, max_ongoing_requests: int = 8,
              cpus_per_replica: float = 1.0, threads: int | None = None, max_batch_size: int = 1, batch_wait_s: float = 0.0) -> Any:
    """A Ray Serve application of the reference model compiled with ``policy``, ready for
    ``serve.run``: ``replicas`` copies, each accepting up to ``max_ongoing_requests`` at once
    and batching up to ``max_batch_size`` requests that arrive within ``batch_wait_s``."""
    deployment = serve.deployment(
        GenerationDeployment,
        name="adacache",
        num_replicas=replicas,
        max_ongoing_requests=max_ongoing_requests,
        ray_actor_options={"num_cpus": cpus_per_replica},
    )
    return deployment.bind(policy, threads, max_batch_size, batch_wait_s)


def start(policy: str = "FORA(interval=3)", *, host: str = "127.0.0.1", port: int = 8000, replicas: int = 1,
          max_ongoing_requests: int = 8, cpus_per_replica: float = 1.0, threads: int | None = None,
          max_batch_size: int = 1, batch_wait_s: float = 0.0, num_cpus: int | None = None) -> str:
    """Start Ray (locally, unless one is already connected), Serve on ``host:port`` and the
    application; return its URL. Stop it with :func:`stop`."""
    import ray

    if not ray.is_initialized():
        ray.init(num_cpus=num_cpus, include_dashboard=False, log_to_driver=False)
    serve.start(http_options={"host": host, "port": port})
    serve.run(build_app(policy, replicas=replicas, max_ongoing_requests=max_ongoing_requests, cpus_per_replica=cpus_per_replica,
                        threads=threads, max_batch_size=max_batch_size, batch_wait_s=batch_wait_s),
              name="adacache", route_prefix="/")
    return f"http://{host}:{port}/"


def stop() -> None:
    """Stop Serve and the local Ray that :func:`start` began."""
    import ray

    serve.shutdown()
    ray.shutdown()
