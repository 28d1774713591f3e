"""Talk to a fine-tuned (TTT) Moshi with moshi's web UI or ``moshi.client``.

    python scripts/serve.py runs/tiny                       # web UI at http://localhost:8998
    python scripts/serve.py runs/my_run --batch-size 8 --host 0.0.0.0
    python -m moshi.client --host localhost --port 8998     # another terminal: talk from the command line

RUN_OR_CHECKPOINT is a run directory (its newest checkpoint) or a checkpoint directory; the model,
its tokenizer and its Mimi are loaded as ``scripts/infer.py`` loads them. ``--batch-size`` conversations
are served at once, each with its own fast weights (reset when a conversation starts); see
``finetune/serving/server.py`` for the slot model and ``--help`` for the options.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

import torch

from finetune.serving.inference import Sampling
from finetune.serving.server import DTYPES, build_server, make_app, resolve_static

logger = logging.getLogger("finetune.serving.server")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="serve.py",
        description="Talk to a fine-tuned (TTT) Moshi: moshi's websocket protocol and web UI, "
        "BATCH_SIZE conversations at once, each with its own fast weights.",
    )
    p.add_argument("checkpoint", help="a run directory (its newest checkpoint) or a checkpoint directory")
    p.add_argument("--batch-size", type=int, default=4, help="conversation slots served at once")
    p.add_argument("--no-ttt-updates", action="store_true", help="keep the fast weights at W^(0) (A/B)")
    p.add_argument("--host", default="localhost")
    p.add_argument("--port", type=int, default=8998)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument(
        "--dtype", choices=sorted(DTYPES), default=None, help="LM dtype (default: bf16 on GPU, fp32 on CPU)"
    )
    p.add_argument("--no-cuda-graphs", action="store_true", help="run without moshi's CUDA graphs on GPU")
    p.add_argument("--greedy", action="store_true", help="greedy decoding instead of sampling")
    p.add_argument("--temp", type=float, default=Sampling.temp)
    p.add_argument("--temp-text", type=float, default=Sampling.temp_text)
    p.add_argument("--top-k", type=int, default=Sampling.top_k)
    p.add_argument("--top-k-text", type=int, default=Sampling.top_k_text)
    p.add_argument("--seed", type=int, default=42424242)
    p.add_argument(
        "--static", default=None, help="web UI directory; default: moshi's from the Hub; 'none': no UI"
    )
    p.add_argument("--ssl", default=None, help="directory with cert.pem and key.pem: serve https/wss")
    p.add_argument("--max-backlog", type=float, default=60.0, help="seconds of audio a client may send ahead")
    args = p.parse_args(argv)
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S"
    )
    from aiohttp import web

    ssl_context = None
    if args.ssl is not None:
        import ssl

        cert, key = Path(args.ssl) / "cert.pem", Path(args.ssl) / "key.pem"
        if not cert.is_file() or not key.is_file():
            print(f"error: --ssl {args.ssl}: expected cert.pem and key.pem there")
            return 2
        ssl_context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        ssl_context.load_cert_chain(certfile=str(cert), keyfile=str(key))
    try:
        static_path = resolve_static(args.static)
        server = build_server(
            args.checkpoint,
            batch_size=args.batch_size,
            device=args.device,
            dtype=args.dtype,
            ttt_updates=not args.no_ttt_updates,
            sampling=Sampling(args.greedy, args.temp, args.temp_text, args.top_k, args.top_k_text),
            cuda_graphs=not args.no_cuda_graphs,
            seed=args.seed,
            max_backlog_s=args.max_backlog,
        )
    except (FileNotFoundError, ValueError, RuntimeError) as e:
        print(f"error: {e}")
        return 2
    if static_path is not None:
        logger.info("serving the web UI from %s", static_path)
    scheme = "https" if ssl_context else "http"
    where = f"{scheme}://{args.host}:{args.port}"
    ui = f"web UI at {where}, " if static_path is not None else "no web UI (--static none), "
    logger.info(
        "%d conversation slots; %swebsocket at %s/api/chat",
        args.batch_size,
        ui,
        where.replace("http", "ws", 1),
    )
    web.run_app(make_app(server, static_path), host=args.host, port=args.port, ssl_context=ssl_context)
    return 0


if __name__ == "__main__":
    sys.exit(main())
