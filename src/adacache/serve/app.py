"""The Ray Serve deployment: HTTP in front of :class:`adacache.serve.generation.Generator`.

Each replica compiles the model once; requests run in the replica's threads (Ray Serve
runs a deployment's synchronous work off its event loop), each with its own adacache
session, so concurrent requests never share a cache. ``max_ongoing_requests`` bounds what a
replica accepts at once; Ray Serve queues the rest at the proxy.
"""

from __future__ import annotations

import asyncio
from typing import Any

from ..errors import InputError
from .generation import Generator


class GenerationDeployment:
    """One replica: a compiled generator answering JSON POSTs (see :func:`build_app`)."""

    def __init__(self, policy: str, threads: int | None = None) -> None:
        self.generator = Generator(policy, threads=threads)

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
        result = await asyncio.to_thread(self.generator.generate, parsed)
        return JSONResponse(result.to_json())


def build_app(policy: str = "FORA(interval=3)", *, replicas: int = 1, max_ongoing_requests: int = 8,
              cpus_per_replica: float = 1.0, threads: int | None = None) -> Any:
    """A Ray Serve application of the reference model compiled with ``policy``, ready for
    ``serve.run``: ``replicas`` copies, each accepting up to ``max_ongoing_requests`` at once."""
    from ray import serve

    deployment = serve.deployment(
        GenerationDeployment,
        name="adacache",
        num_replicas=replicas,
        max_ongoing_requests=max_ongoing_requests,
        ray_actor_options={"num_cpus": cpus_per_replica},
    )
    return deployment.bind(policy, threads)


def start(policy: str = "FORA(interval=3)", *, host: str = "127.0.0.1", port: int = 8000, replicas: int = 1,
          max_ongoing_requests: int = 8, cpus_per_replica: float = 1.0, threads: int | None = None,
          num_cpus: int | None = None) -> str:
    """Start Ray (locally, unless one is already connected), Serve on ``host:port`` and the
    application; return its URL. Stop it with :func:`stop`."""
    import ray
    from ray import serve

    if not ray.is_initialized():
        ray.init(num_cpus=num_cpus, include_dashboard=False, log_to_driver=False)
    serve.start(http_options={"host": host, "port": port})
    serve.run(build_app(policy, replicas=replicas, max_ongoing_requests=max_ongoing_requests,
                        cpus_per_replica=cpus_per_replica, threads=threads), name="adacache", route_prefix="/")
    return f"http://{host}:{port}/"


def stop() -> None:
    """Stop Serve and the local Ray that :func:`start` began."""
    import ray
    from ray import serve

    serve.shutdown()
    ray.shutdown()
