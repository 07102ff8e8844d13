"""Run facelens analyses on saved checkpoints: `python analyze.py <subcommand> --checkpoint CKPT --out DIR ...`.

Each subcommand lives next to its training-time callback (same analysis code, one code path) and provides
`add_arguments(parser)` and `main(args)`.
"""
from __future__ import annotations

import argparse
import importlib
import importlib.util
import sys

SUBCOMMANDS: dict[str, tuple[str, str]] = {
    "gradcam": ("callbacks.gradcam_amr", "Grad-CAM maps scored by the Acceptable Mask Ratio (seed 004)"),
    "probe": ("callbacks.probing", "PLS + VIP + QDA probes over layers, channels and neurons (seed 003)"),
    "dissect": ("callbacks.dissection", "Network Dissection and Hierarchical Network Dissection (seed 002)"),
    "report": ("analysis.report", "Offline HTML report (+ W&B) comparing runs or sweeps: figures, tables, findings"),
    "saliency": ("callbacks.saliency", "Occlusion, SmoothGrad, IG and Grad-CAM maps with deletion/insertion, pointing and randomisation checks (seed 001)"),
}


def available() -> dict[str, tuple[str, str]]:
    found = {}
    for name, (module, help_text) in SUBCOMMANDS.items():
        if importlib.util.find_spec(module) is not None:
            found[name] = (module, help_text)
    return found


def main(argv: list[str] | None = None) -> int:
    from facelens.wandb_io import default_offline

    default_offline()
    parser = argparse.ArgumentParser(prog="analyze.py", description=__doc__)
    sub = parser.add_subparsers(dest="command", metavar="subcommand")
    modules = {}
    for name, (module_name, help_text) in available().items():
        module = importlib.import_module(module_name)
        if hasattr(module, "add_arguments"):
            modules[name] = module
            module.add_arguments(sub.add_parser(name, help=help_text, description=help_text))
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 0
    return modules[args.command].main(args) or 0


if __name__ == "__main__":
    sys.exit(main())
