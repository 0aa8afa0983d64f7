"""Serving (issue 18): what a request means and answers, batching that changes no request's
images, then ``adacache serve`` driven as a user does — a server on 127.0.0.1 that stops by
itself, concurrent requests batched and each getting the images it would get alone, a bad
request answered 400 with what was wrong."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request

import pytest
import torch

import adacache
from adacache.reference import load_reference_model, sample
from adacache.serve import GenerationRequest, Generator

POLICY = "FORA(interval=3)"


@pytest.mark.parametrize("body, message", [
    ([3], "JSON object"),
    ({"class_labels": [3], "prompt": "a cat"}, r"unknown field\(s\) \['prompt'\]"),
    ({"class_labels": []}, "class_labels must be"),
    ({"class_labels": [10]}, r"each in 0\.\.9"),
    ({"class_labels": [1, 2], "seeds": [0]}, "one non-negative integer per class label"),
    ({"class_labels": [1], "num_inference_steps": 0}, "num_inference_steps"),
    ({"class_labels": [1], "guidance_scale": "4"}, "guidance_scale"),
    ({"class_labels": [1], "output": "jpeg"}, "output must be one of"),
])
def test_a_bad_request_is_refused_naming_the_field(body, message):
    with pytest.raises(adacache.InputError, match=message):
        GenerationRequest.from_json(body, num_classes=10)


def test_a_request_gets_the_images_of_its_own_generation():
    generator = Generator(POLICY)
    request = generator.parse({"class_labels": 4, "seeds": 7, "num_inference_steps": 6, "output": "tensor"})
    result = generator.generate(request)
    expected = sample(adacache.compile(load_reference_model(), adacache.FORA(interval=3)), [4], seeds=[7], num_steps=6)
    assert torch.equal(torch.tensor(result.tensor), expected)
    assert result.stats["steps"] == 6 and result.stats["reused_steps"] == 4 and result.stats["hit_rate"] == pytest.approx(4 / 6)
    # The statistics are the request's own, not those of the requests before it on this thread.
    longer = generator.generate(generator.parse({"class_labels": [2, 3], "num_inference_steps": 10, "output": "tensor"}))
    assert longer.stats["steps"] == 10 and longer.stats["reused_steps"] == 6 and longer.stats["hit_rate"] == pytest.approx(6 / 10)
    png = generator.generate(generator.parse({"class_labels": [4], "seeds": [7], "num_inference_steps": 6}))
    assert len(png.images) == 1 and png.images[0].startswith("iVBOR")  # base64 of the PNG signature


@pytest.mark.parametrize("policy, batched", [("FORA(interval=3)", True), ("FirstBlockCache(0.08)", False)])
def test_requests_share_a_call_only_where_no_image_changes(policy, batched):
    generator = Generator(policy)
    assert generator.batch_independent == batched  # a gated policy decides for the whole batch: never shared
    bodies = [{"class_labels": [1, 2], "seeds": [5, 6], "num_inference_steps": 6}, {"class_labels": [7], "seeds": [9], "num_inference_steps": 6},
              {"class_labels": [3], "seeds": [4], "num_inference_steps": 5}]
    requests = [generator.parse(dict(b, output="tensor")) for b in bodies]
    together = generator.generate_many(requests)
    assert [r.stats["requests_in_call"] for r in together] == ([2, 2, 1] if batched else [1, 1, 1])
    for request, result in zip(requests, together):
        alone = generator.generate(request)
        difference = float((torch.tensor(result.tensor) - torch.tensor(alone.tensor)).abs().max())
        assert difference < 1e-4, (request, difference)  # float rounding of other batch sizes; a PNG level is 7.8e-3
        assert result.stats["reused_steps"] == alone.stats["reused_steps"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _post(url: str, body: dict, timeout: float = 120) -> tuple[int, dict]:
    request = urllib.request.Request(url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read())


def test_the_server_answers_concurrent_requests_each_as_alone():
    pytest.importorskip("ray.serve")
    port = _free_port()
    url = f"http://127.0.0.1:{port}/"
    server = subprocess.Popen(
        [sys.executable, "-m", "adacache.cli", "serve", "--policy", POLICY, "--port", str(port), "--duration", "400",
         "--max-ongoing-requests", "4", "--threads", "1", "--max-batch-size", "4", "--batch-wait-ms", "500"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=dict(os.environ, RAY_USAGE_STATS_ENABLED="0"),
    )
    try:
        deadline = time.monotonic() + 240  # a loaded 2-core machine starts Ray and the replica slowly
        while True:  # ready when it answers
            assert server.poll() is None, f"the server exited: {server.stdout.read()}"
            try:
                status, _ = _post(url, {"class_labels": [0], "num_inference_steps": 1}, timeout=10)
                if status == 200:
                    break
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                pass
            assert time.monotonic() < deadline, "the server did not come up in 240 s"
            time.sleep(1)

        bodies = [{"class_labels": [label], "seeds": [seed], "num_inference_steps": 8, "output": "tensor"}
                  for label, seed in ((1, 11), (5, 12), (9, 13))]
        answers: dict[int, tuple[int, dict]] = {}
        threads = [threading.Thread(target=lambda i=i, b=b: answers.__setitem__(i, _post(url, b))) for i, b in enumerate(bodies)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=180)
        model = adacache.compile(load_reference_model(), adacache.FORA(interval=3))
        for i, body in enumerate(bodies):
            status, answer = answers[i]
            assert status == 200, answer
            alone = sample(model, body["class_labels"], seeds=body["seeds"], num_steps=8)
            assert torch.allclose(torch.tensor(answer["tensor"]), alone, atol=1e-4), f"request {i} differs from its generation alone"
            assert answer["stats"]["steps"] == 8 and answer["stats"]["reused_steps"] == 5
        # Sent together within the batch wait, they shared calls of the model (FORA decides by schedule alone).
        assert max(answers[i][1]["stats"]["requests_in_call"] for i in answers) > 1

        status, answer = _post(url, {"class_labels": [3], "num_inference_steps": 5000})
        assert status == 400 and "num_inference_steps must be an integer in 1..1000" in answer["error"]
    finally:
        server.terminate()
        try:
            server.wait(timeout=60)
        except subprocess.TimeoutExpired:
            server.kill()
