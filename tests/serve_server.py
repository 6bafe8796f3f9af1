"""A real cbir-serve for tests: uvicorn on a free loopback port, in a thread, over real Redis and FAISS."""

from __future__ import annotations

import io
import threading
import time

import numpy as np
import uvicorn
from PIL import Image

from cbir.cli.serve import bind
from cbir.serve import ServeConfig, create_app

TOKEN = "test-token-0123456789abcdef"


class LiveServer:
    """``with LiveServer(config) as server:`` serves ``config`` at ``server.url`` until the block ends (a graceful
    stop: in-flight requests finish, every FAISS index is saved, the embedded Redis stops)."""

    def __init__(self, config: ServeConfig):
        self.config = config
        self.app = create_app(config)
        self._socket = bind("127.0.0.1", 0)
        self.url = f"http://127.0.0.1:{self._socket.getsockname()[1]}"
        self.server = uvicorn.Server(uvicorn.Config(self.app, log_level="warning", timeout_graceful_shutdown=30))
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self._socket]}, daemon=True)

    def __enter__(self) -> "LiveServer":
        self.thread.start()
        deadline = time.monotonic() + 120
        while not self.server.started:
            assert self.thread.is_alive(), "cbir-serve stopped during start-up (see the log above)"
            assert time.monotonic() < deadline, "cbir-serve did not start within 120 s"
            time.sleep(0.02)
        return self

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True
        self.thread.join(120)
        self._socket.close()
        assert not self.thread.is_alive(), "cbir-serve did not stop"


def index_collection(root, synthetic_data) -> dict:
    """Database 'cells' (the 24 synthetic index images) in ``root/home``, and the checkpoint that built it."""
    import torch

    from cbir.cli import index
    from cbir.cli.common import run
    from cbir.models import create_extractor, save_extractor

    home = root / "home"
    torch.manual_seed(0)
    weights = root / "effnet16.pt"
    save_extractor(weights, create_extractor("effnet", 16, pretrained=True, input_size=48))
    assert run(index.main, ["--path", str(synthetic_data["index"]), "--weights", str(weights),
                            "--db_name", "cells", "--home", str(home), "--num_workers", "0"]) == 0
    return {"home": home, "weights": weights, "root": root, "data": synthetic_data}


def png_bytes(seed: int, size: int = 48) -> bytes:
    """A distinct random RGB image (never the same twice for two seeds)."""
    pixels = np.random.default_rng(seed).integers(0, 255, (size, size, 3), dtype=np.uint8)
    out = io.BytesIO()
    Image.fromarray(pixels).save(out, "PNG")
    return out.getvalue()
