"""cbir-serve: the retrieval service — REST API (docs at /docs), Cytomine-shaped routes and a web page at /."""

from __future__ import annotations

import argparse
import ipaddress
import socket

from cbir.cli.common import database_args, entry_point
from cbir.errors import CbirError, check_at_least


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="cbir-serve", description=__doc__.split(": ", 1)[1])
    database_args(p)
    p.add_argument("--weights", default=None,
                   help="extractor checkpoint for every database (default: the one each database was built with)")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default: 127.0.0.1, this machine only)")
    p.add_argument("--port", type=int, default=8000, help="port (default: 8000; 0 picks a free one)")
    p.add_argument("--auth", choices=("write", "read", "none"), default="write",
                   help="write (default): adding and removing need the token; read: searching too; none: nothing "
                        "does (a platform in a private network); refused with a non-loopback --host unless "
                        "--trusted_network")
    p.add_argument("--token_file", default=None,
                   help="file holding the token (mode 600); default: $CBIR_API_TOKEN; without either, writes are off")
    p.add_argument("--trusted_network", action="store_true",
                   help="allow --auth none on a non-loopback --host: everyone who reaches the port may add and delete")
    p.add_argument("--uploads", default=None,
                   help="where added images are kept, one folder per database (default: the database's folder)")
    p.add_argument("--max_upload_mb", type=float, default=20.0, help="largest request body (default: 20)")
    p.add_argument("--max_pixels", type=int, default=40_000_000, help="largest image, in pixels (default: 40M)")
    p.add_argument("--max_k", type=int, default=100, help="most neighbours a query may ask for (default: 100)")
    p.add_argument("--cors_origin", action="append", default=[],
                   help="a web origin allowed to call the API from its pages (repeatable; default: none)")
    p.add_argument("--open", action="store_true", help="open the page in the web browser once serving")
    p.add_argument("--log_level", default="warning", choices=("debug", "info", "warning", "error"),
                   help="uvicorn's log level; 'info' logs every request (default: warning)")
    return p


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def bind(host: str, port: int) -> socket.socket:
    """The listening socket, bound before the model loads, so a taken port is one line at once."""
    host = host.strip("[]")
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    # Answers go out at once: asyncio turns Nagle's algorithm off only on sockets made with IPPROTO_TCP, and with it
    # on, an answer's body waited for the client's delayed ACK of its headers (40 ms on every keep-alive request).
    # Connections accepted from this socket inherit the option.
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    try:
        sock.bind((host, port))
    except OSError as error:
        sock.close()
        raise CbirError(f"cannot listen on {host}:{port}: {error.strerror or error}; choose another --port "
                        "or --host") from None
    sock.listen(2048)
    return sock


def main(argv=None) -> None:
    import os
    from pathlib import Path

    # Before torch starts OpenMP: between requests its threads sleep instead of spinning on the cores (a server is
    # idle most of the time, and on a shared machine the spinning slows every other process).
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

    args = parser().parse_args(argv)
    for name, least in (("max_upload_mb", 0.001), ("max_pixels", 1), ("max_k", 1), ("port", 0)):
        check_at_least(name, getattr(args, name), least)
    if args.port > 65535:
        raise CbirError(f"--port must be at most 65535, got {args.port}")
    if args.auth == "none" and not is_loopback(args.host) and not args.trusted_network:
        raise CbirError(f"--auth none on {args.host} lets anyone who reaches the port add and delete images; "
                        "add --trusted_network if that network is private, or keep --host 127.0.0.1")
    if args.weights and not Path(args.weights).is_file():
        raise CbirError(f"weights file {args.weights} does not exist")

    import uvicorn

    from cbir.files import prepare_folder
    from cbir.serve import Limits, ServeConfig, create_app
    from cbir.serve.auth import TOKEN_ENV, read_token
    from cbir.serve.engine import RetrievalService

    token = read_token(args.token_file)
    if args.uploads:  # made private, or refused when another user owns it: what it keeps is the server user's
        prepare_folder(args.uploads, what="uploads folder")
    config = ServeConfig(
        db_name=args.db_name, home=args.home, redis_url=args.redis_url, weights=args.weights, auth=args.auth,
        token=token, uploads=Path(args.uploads).absolute() if args.uploads else None,
        cors_origins=tuple(args.cors_origin),
        limits=Limits(max_upload_bytes=int(args.max_upload_mb * 2**20), max_pixels=args.max_pixels,
                      max_k=args.max_k),
    )
    sock = bind(args.host, args.port)
    service = RetrievalService(config)
    try:
        summary = service.start()
        app = create_app(config, service)
    except BaseException:
        service.close()
        sock.close()
        raise
    host, port = sock.getsockname()[:2]
    shown = f"[{host}]" if ":" in host else host
    url = f"http://{shown}:{port}/"
    writes = {"none": "open to anyone who reaches the port (--auth none)",
              "write": f"need the token ({args.token_file or '$' + TOKEN_ENV})" if token else
                       f"off (no token: set {TOKEN_ENV} or give --token_file)",
              "read": "need the token, and so do searches (--auth read)"}[args.auth]
    print(f"cbir-serve: database '{args.db_name}' ({summary['images']} images, extractor {summary['extractor']}) "
          f"at {url}\n  API docs: {url}docs\n  writes: {writes}\n  stop with Ctrl-C (nothing is lost)", flush=True)
    if args.open:
        import webbrowser

        webbrowser.open(url)
    server = uvicorn.Server(uvicorn.Config(app, log_level=args.log_level, timeout_graceful_shutdown=30))
    server.run(sockets=[sock])


console_script = entry_point(main)
