"""The `qlora` command: quantize, inspect, finetune, generate, bench-memory.

Each subcommand lives in its own module, which provides add_arguments(parser) and
run(args) -> exit code; this file only wires them up.
"""
from __future__ import annotations

import argparse
import importlib
import signal
import sys

from qlora.errors import UserError
from qlora.safe_output import Terminated, terminate_like_interrupt

SUBCOMMANDS = {
    "quantize": ("qlora.convert", "quantise a checkpoint to NF4 offline (bitsandbytes / HF layout)"),
    "inspect": ("qlora.checkpoint_info", "list a checkpoint's tensors, formats, sizes and bits per parameter"),
    "finetune": ("qlora.finetune", "fine-tune a 4-bit model with LoRA adapters"),
    "generate": ("qlora.generate", "generate text from a 4-bit model (and a LoRA adapter), with a KV cache"),
    "bench-memory": ("qlora.memory", "predict (and on a GPU measure) training memory by component"),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="qlora", description=__doc__.splitlines()[0])
    subparsers = parser.add_subparsers(dest="command", required=True)
    for name, (module_name, help_text) in SUBCOMMANDS.items():
        module = importlib.import_module(module_name)
        sub = subparsers.add_parser(name, help=help_text, description=help_text)
        module.add_arguments(sub)
        sub.set_defaults(_module=module)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        with terminate_like_interrupt():  # SIGTERM / SIGHUP unwind and clean up as Ctrl-C does
            return int(args._module.run(args) or 0)
    except UserError as err:
        message = " ".join(str(err).split())  # one line, whatever a library put in the message
        print(f"qlora {args.command}: error: {message}", file=sys.stderr)
        return 2
    except Terminated as err:
        print(f"qlora {args.command}: terminated by {signal.Signals(err.signum).name}", file=sys.stderr)
        return 128 + err.signum
    except KeyboardInterrupt:
        print(f"qlora {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
