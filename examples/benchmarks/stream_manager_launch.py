"""Start the stream manager (``python -m streamvision``) under a chosen multiprocessing start method.

    python -m inference_fastpath.examples.benchmarks.stream_manager_launch --start-method spawn \\
        --host-factory inference.core.interfaces.legacy_stream.host:LegacyPipelineHost

The manager forks its pipeline processes by default. A pipeline process cannot use CUDA when the
manager process initialised CUDA before forking (torch refuses: "Cannot re-initialize CUDA in forked
subprocess"); under ``spawn`` each pipeline process starts a fresh interpreter instead, which the
manager's bootstrap module supports. Every other argument goes to ``streamvision`` unchanged.
"""

from __future__ import annotations

import argparse
import multiprocessing
import sys
from typing import List, Optional


def main(argv: Optional[List[str]] = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--start-method", choices=multiprocessing.get_all_start_methods(), default="fork")
    args, rest = parser.parse_known_args(argv)
    multiprocessing.set_start_method(args.start_method, force=True)
    from streamvision.__main__ import main as streamvision_main

    streamvision_main(rest)


if __name__ == "__main__":
    main(sys.argv[1:])
