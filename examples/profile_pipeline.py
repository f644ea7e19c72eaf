"""Diagnostic: where the host time of a whole ``InferencePipeline`` run goes, per thread (GPU host).

    python -m inference_fastpath.examples.profile_pipeline --preset fast-rle-depth2 --frames 120

Runs the configuration once unprofiled (warm-up: graph capture, kernel compilation, FPS), then again
with the same runner under yappi, CPU clock, every thread. Prints the FPS of both runs, each thread's
CPU ms per frame (the GIL serialises Python, so their sum against the wall time per frame says whether the host
is the limit) and the functions with the most own CPU time, with their cumulative time.
Needs ``yappi`` (in the GPU wheelhouse).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path
from typing import Optional, Sequence

from inference_fastpath.examples.runtime import configure_environment

configure_environment()


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", default="fast-rle-depth2")
    parser.add_argument("--options", default="", help="extra block options, key=value,...")
    parser.add_argument("--frames", type=int, default=120)
    parser.add_argument("--top", type=int, default=45)
    parser.add_argument("--clock", default="cpu", choices=("cpu", "wall"))
    args = parser.parse_args(argv)

    import yappi

    from inference_fastpath.examples.benchmark import PRESETS, parse_config, run_configuration, truncated_clip
    from inference_fastpath.examples.demo_model import build_demo_model, default_clip_path
    from inference_fastpath.workflows import FASTPATH, load_workflow

    options = dict(PRESETS[args.preset])
    options.update(parse_config(f"x:{args.options}")[1])
    model = str(build_demo_model())
    with tempfile.TemporaryDirectory() as directory:
        video = truncated_clip(str(default_clip_path()), args.frames, Path(directory))
        workflow = load_workflow(FASTPATH, **options)
        plain = run_configuration("plain", workflow, video, model, 10, options=options)
        yappi.set_clock_type(args.clock)
        yappi.clear_stats()
        yappi.start(builtins=True, profile_threads=True)
        profiled = run_configuration("profiled", workflow, video, model, 10, options=options, fresh_runner=False)
        yappi.stop()
    frames = max(1, profiled["frames"])
    wall_ms = 1e3 * profiled["wall_s"] / frames
    print(f"\nfps plain {plain['fps']:.1f}, profiled {profiled['fps']:.1f}; profiled wall {wall_ms:.2f} ms/frame")
    total = 0.0
    for thread in sorted(yappi.get_thread_stats(), key=lambda t: -t.ttot):
        per_frame = 1e3 * thread.ttot / frames
        total += per_frame
        if per_frame >= 0.01:
            print(f"thread {thread.name:<24} id={thread.id:<3} {per_frame:7.3f} ms/frame ({args.clock})")
    print(f"all threads {total:.3f} ms/frame vs wall {wall_ms:.3f}")
    stats = yappi.get_func_stats()
    stats.sort("tsub")
    print(f"\n{'function':<100} {'calls':>7} {'own ms/f':>9} {'cum ms/f':>9}")
    for row in list(stats)[: args.top]:
        name = f"{row.module.split('site-packages/')[-1]}:{row.lineno} {row.name}"
        print(f"{name[-100:]:<100} {row.ncall:>7} {1e3 * row.tsub / frames:9.3f} {1e3 * row.ttot / frames:9.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
