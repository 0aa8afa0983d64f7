"""The ``adacache`` command line: ``adacache export``, ``adacache check``, ``adacache explain``, ``adacache serve``,
``adacache bench``."""

from __future__ import annotations

import argparse
import importlib.util
import os
import sys

from .arguments import int_in, output_folder, policy_expression
from .named_models import MODELS, load_named_model

#: The largest --batch the command line builds example inputs for: far above any CFG batch one
#: would export, and below the sizes where building the inputs alone exhausts memory.
MAX_BATCH = 1024


def _check_export(args: argparse.Namespace) -> str | None:
    """What the export needs installed, found before the model is loaded and compiled."""
    needs = ["onnx", "onnxscript"] + (["tensorrt"] if args.format == "tensorrt" else [])
    missing = [name for name in needs if importlib.util.find_spec(name) is None]
    if missing:
        extra = "gpu" if "tensorrt" in missing else "onnx"
        return f"--format {args.format} needs {', '.join(missing)}: pip install 'adacache[{extra}]'"
    return None


def _export(args: argparse.Namespace) -> int:
    import adacache
    from adacache.policies.parse import parse_policy

    model, example = load_named_model(args.model, args.batch)
    cached = adacache.compile(model, parse_policy(args.policy))
    path = adacache.export(cached, args.out, format=args.format, example_inputs=example, precision=args.precision)
    print(f"wrote {args.format} artifact to {path}")
    return 0


def _check(args: argparse.Namespace) -> int:
    from adacache.deploy import check_artifact

    print(f"ok: {check_artifact(args.artifact, provider=args.provider)}")
    return 0


def _check_check(args: argparse.Namespace) -> str | None:
    if importlib.util.find_spec("onnxruntime") is None:
        return "checking an artifact needs onnxruntime: pip install 'adacache[onnx]'"
    return None


def _explain(args: argparse.Namespace) -> int:
    import adacache
    from adacache.policies.parse import parse_policy

    model, (a, kw) = load_named_model(args.model, args.batch)
    cached = adacache.compile(model, parse_policy(args.policy), example_inputs=(a, kw))
    print(adacache.explain(cached))
    return 0


def _serve(args: argparse.Namespace) -> int:
    import signal
    import time

    from adacache.serve.app import start, stop

    # A service manager stops with SIGTERM: stop Ray as on Ctrl-C, or its processes outlive this one.
    signal.signal(signal.SIGTERM, _interrupt)
    url = start(args.policy, host=args.host, port=args.port, replicas=args.replicas, max_ongoing_requests=args.max_ongoing_requests,
                cpus_per_replica=args.cpus_per_replica, threads=args.threads, max_batch_size=args.max_batch_size,
                batch_wait_s=args.batch_wait_ms / 1000.0)
    until = "until interrupted (Ctrl-C)" if not args.duration else f"for {args.duration:g} s"
    print(f"serving the reference model with {args.policy} at {url} {until}; POST a JSON object such as "
          '{"class_labels": [3, 7], "seeds": [0, 1], "num_inference_steps": 50, "guidance_scale": 4.0, "output": "png"}', flush=True)
    try:
        deadline = time.monotonic() + args.duration if args.duration else None
        while deadline is None or time.monotonic() < deadline:
            time.sleep(0.2)
    except KeyboardInterrupt:
        pass
    finally:
        stop()
    return 0


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


def _check_serve(args: argparse.Namespace) -> str | None:
    if importlib.util.find_spec("ray") is None:
        return "serving needs Ray Serve: pip install 'adacache[serve]'"
    if not os.environ.get("RAY_ADDRESS") and args.replicas * args.cpus_per_replica > (os.cpu_count() or 1):
        return (f"--replicas {args.replicas} x --cpus-per-replica {args.cpus_per_replica:g} needs more CPUs than this machine has "
                f"({os.cpu_count()}); lower either, or set RAY_ADDRESS to run on a Ray cluster")
    return None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="adacache", description="Feature caching for diffusion transformers.")
    sub = parser.add_subparsers(dest="command", required=True)

    exp = sub.add_parser("export", help="export a cached model as an ONNX or TensorRT artifact")
    exp.add_argument("--model", choices=MODELS, default="reference")
    exp.add_argument("--policy", type=policy_expression, default="FORA(interval=3)")
    exp.add_argument("--format", choices=("onnx", "tensorrt"), default="onnx")
    exp.add_argument("--precision", choices=("fp32", "fp16", "bf16"), default="fp16")
    exp.add_argument("--batch", type=int_in(1, MAX_BATCH), default=2, help="batch size the artifact serves (2 = one CFG pair)")
    exp.add_argument("--out", type=output_folder, required=True)
    exp.set_defaults(func=_export, check=_check_export, parser=exp)

    chk = sub.add_parser("check", help="rerun the calls an export checked, with this machine's ONNX Runtime (exit 1 if they differ)")
    chk.add_argument("artifact", help="the artifact folder adacache export wrote")
    chk.add_argument("--provider", choices=("cpu", "cuda", "tensorrt", "auto"), default="cpu")
    chk.set_defaults(func=_check, check=_check_check, parser=chk, failure_status=1)

    ex = sub.add_parser("explain", help="print the blocks, cache sites and graph diff for a model and policy")
    ex.add_argument("--model", choices=MODELS, default="reference")
    ex.add_argument("--policy", type=policy_expression, default="FORA(interval=3)")
    ex.add_argument("--batch", type=int_in(1, MAX_BATCH), default=2)
    ex.set_defaults(func=_explain, parser=ex)

    srv = sub.add_parser("serve", help="serve the reference model compiled with a policy over HTTP (Ray Serve)")
    srv.add_argument("--policy", type=policy_expression, default="FORA(interval=3)")
    srv.add_argument("--host", default="127.0.0.1", help="address to listen on (default: this machine only)")
    srv.add_argument("--port", type=int_in(1, 65535), default=8000)
    srv.add_argument("--replicas", type=int_in(1, 1024), default=1)
    srv.add_argument("--max-ongoing-requests", type=int_in(1, 100000), default=8, help="requests one replica accepts at once")
    srv.add_argument("--cpus-per-replica", type=float, default=1.0)
    srv.add_argument("--threads", type=int_in(1, 1024), default=None, help="torch threads per replica")
    srv.add_argument("--max-batch-size", type=int_in(1, 1024), default=1,
                     help="requests one call of the model may serve together (only where that changes no request's images)")
    srv.add_argument("--batch-wait-ms", type=float, default=10.0, help="how long a request waits for others to batch with")
    srv.add_argument("--duration", type=float, default=0.0, help="stop after this many seconds (0: until interrupted)")
    srv.set_defaults(func=_serve, check=_check_serve, parser=srv)

    try:
        from adacache.bench.cli import add_bench_parser
    except ImportError:
        add_bench_parser = None
    if add_bench_parser is not None:
        add_bench_parser(sub)

    args = parser.parse_args(argv)
    # Checks that involve several arguments or the installation: still usage errors, still up front.
    check = getattr(args, "check", None)
    problem = check(args) if check is not None else None
    if problem:
        getattr(args, "parser", parser).error(problem)
    try:
        return int(args.func(args) or 0)
    except Exception as exc:  # noqa: BLE001 - the CLI prints adacache's own errors plainly
        from adacache.errors import AdaCacheError

        if isinstance(exc, (AdaCacheError, ValueError)):
            print(f"adacache: error: {exc}", file=sys.stderr)
            return getattr(args, "failure_status", 2)
        raise


if __name__ == "__main__":
    sys.exit(main())
