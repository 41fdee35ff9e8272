"""`python -m service` / `classifier-service`: validate the settings, then serve them.

Exit status: 0 after a clean drain on SIGTERM/SIGINT; 1 when the settings are invalid, the model cannot be loaded
(one log line says why), the port cannot be bound (uvicorn's 3), or a shutdown outlasted its grace period.
"""

import argparse
import os

from pydantic import ValidationError

from service import memory, request_ids
from service.api import create_app
from service.server import ClassifierServer
from service.settings import Settings
from service.workers import Supervisor, worker_count


def parse_flags(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(
        prog="classifier-service",
        description="Serve a transformer text classifier over HTTP with length-bucketed micro-batching. "
        "Every setting can also come from the environment (CLASSIFIER_<NAME>, or MODEL for --model).",
    )
    parser.add_argument("--host", help="address to listen on (default 127.0.0.1)")
    parser.add_argument("--port", type=int, help="port to listen on (default 8000)")
    parser.add_argument("--model", help="Hugging Face checkpoint directory or hub id (default: the embedded model)")
    parser.add_argument("--workers", type=int, help="API processes in front of one engine process (default: 1 on a CPU, up to 4 on CUDA)")
    flags = vars(parser.parse_args(argv))
    return {name: value for name, value in flags.items() if value is not None}


def main(argv: list[str] | None = None) -> None:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    try:
        settings = Settings(**parse_flags(argv))
    except ValidationError as error:
        raise SystemExit(f"invalid settings:\n{error}") from None
    request_ids.configure_logging(settings.log_level)
    memory.cap_primitive_caches(settings.onednn_primitive_cache_capacity, settings.torch_primitive_cache_capacity)
    workers = worker_count(settings)
    if workers > 1:
        raise SystemExit(Supervisor(settings, workers).run())
    server = ClassifierServer(create_app(settings), settings)
    server.run()
    if server.failure is not None:
        raise SystemExit(1)


if __name__ == "__main__":
    main()
