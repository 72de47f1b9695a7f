"""`graphopt serve`: an OpenAI-compatible HTTP server over the runtime (needs the `serve` extra).

    compiled = graphopt.compile(graphopt.models.load(), spec="mtp")
    graphopt.serve.run(compiled, host="127.0.0.1", port=8000)       # blocks; Ctrl-C / SIGTERM stops it

`build_app` gives the FastAPI app for your own ASGI server; `EngineLoop` is the thread that steps the
engine while requests from many connections join the running batch. docs/serving.md.
"""

from __future__ import annotations

try:
    import fastapi  # noqa: F401
    import uvicorn  # noqa: F401
except ImportError as e:   # pragma: no cover - depends on the install
    raise ImportError(f"graphopt.serve needs FastAPI and uvicorn: pip install 'graphopt[serve]' ({e})") from e

from .app import build_app, chat_prompt
from .loop import EngineLoop, QueueFullError, warm_up

__all__ = ["EngineLoop", "QueueFullError", "build_app", "chat_prompt", "run", "warm_up"]


def run(compiled, *, host: str = "127.0.0.1", port: int = 8000, model_name: str = "graphopt",
        max_batch_size: int = 16, max_waiting: int = 64, graceful_shutdown_s: float = 30.0,
        warmup: bool | None = None) -> None:
    """Serve `compiled` until SIGINT / SIGTERM: new connections stop, running requests get
    `graceful_shutdown_s` to finish, what is left is aborted. warmup: compile and capture every
    batch bucket before listening (None: on CUDA, where first-shape compiles take seconds)."""
    import uvicorn
    app = build_app(compiled, model_name=model_name, max_batch_size=max_batch_size, max_waiting=max_waiting,
                    warmup=warmup)
    uvicorn.run(app, host=host, port=port, log_level="info", timeout_graceful_shutdown=graceful_shutdown_s)
