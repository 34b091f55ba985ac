"""The GPU check's command-line arguments, apart from `bench.gpu` so that the `llama4-ep` parser
does not load torch to describe them."""

from __future__ import annotations

import argparse


def add_gpu_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--device", default="cuda", help="cuda (default) or cpu (with --tiny: a dry run)")
    p.add_argument("--tiny", action="store_true", help="toy sizes (tiny-scout width, batches 1 and 4)")
    p.add_argument("--layers", type=int, default=None, help="layers of the Scout-shaped model (default 4)")
