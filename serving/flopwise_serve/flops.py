"""``flopwise flops``: the ledger's FLOPs of one request (a model dir or config.json is enough)."""

from __future__ import annotations

import json
import os

from flopwise.ledger import FlopModel, LedgerError
from flopwise_serve.common import fail, human, non_negative_int, positive_int


def add_parser(sub) -> None:
    parser = sub.add_parser(
        "flops", help="FLOPs of one request from the ledger (a model dir or config.json is enough)"
    )
    parser.add_argument(
        "model", nargs="?", help="model dir or config.json (default: the embedded SmolLM2-135M-Instruct)"
    )
    parser.add_argument("--prompt-tokens", type=positive_int, required=True, help="text tokens in the prompt")
    parser.add_argument("--output-tokens", type=positive_int, required=True, help="tokens generated")
    parser.add_argument(
        "--images",
        type=non_negative_int,
        default=0,
        help="images in the prompt (VLMs); each adds its placeholder tokens",
    )
    parser.add_argument(
        "--image-size",
        type=positive_int,
        default=448,
        help="image side in pixels for Qwen2-VL (LLaVA's is fixed)",
    )
    parser.add_argument(
        "--cached-tokens", type=non_negative_int, default=0, help="prompt tokens served from the prefix cache"
    )
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.set_defaults(run=lambda args, rest: cmd_flops(args))


def cmd_flops(args) -> int:
    from flopwise.models import ModelNotFound, resolve_model

    try:
        path = args.model if args.model and os.path.exists(args.model) else resolve_model(args.model)
        model = FlopModel.from_pretrained(path, image_size=args.image_size)
        cost = model.request(
            args.prompt_tokens, args.output_tokens, cached_tokens=args.cached_tokens, images=args.images
        )
    except (LedgerError, ModelNotFound) as e:
        return fail("flops", str(e))
    report = {"model": path, "architecture": model.spec.architecture, **cost.as_dict()}
    if args.json:
        print(json.dumps(report))
        return 0
    print(f"{model.spec.architecture} at {path}")
    print(
        f"prompt {cost.prompt_tokens} tokens ({cost.cached_tokens} cached, {cost.images} images), output "
        f"{cost.output_tokens} tokens"
    )
    rows = [("prefill", cost.prefill.total), ("decode", cost.decode.total), ("total", cost.total)]
    rows += [(f"  {k}", v) for k, v in report["components"].items()]
    width = max(len(r[0]) for r in rows)
    for name, value in rows:
        print(f"{name:<{width}}  {value:>22,d}  {human(value):>14}")
    return 0
