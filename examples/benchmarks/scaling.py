"""What the two scaling benchmarks (``many_sources``: N sources in one pipeline, ``stream_manager``: M
pipelines) share: our block's default options, their common command line and their plot."""

from __future__ import annotations

import argparse
from typing import Any, Dict, List, Optional, Sequence, Tuple

from inference_fastpath.examples.benchmarks.benchmark import parse_config

DEFAULT_OPTIONS: Dict[str, Any] = dict(preprocess="auto", engine="auto", cuda_graphs=True, postprocess="auto",
                                       mask_output="rle", pipeline_depth=2)


def scaling_parser(description: str, count_flag: str, count_default: str, unit: str, out: str,
                   per: Optional[str] = None) -> argparse.ArgumentParser:
    """The common options: the counts to run, frames, warm-up, resolution, our configuration,
    video, model and output file. ``per``: what frames and warm-up are counted per (default ``unit``)."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument(count_flag, default=count_default, help=f"comma list of {unit} counts")
    parser.add_argument("--frames", type=int, default=100, help=f"frames per {per or unit} (<= 300)")
    parser.add_argument("--warmup", type=int, default=5, help=f"results per {per or unit} ignored before the clock starts")
    parser.add_argument("--resolution", default=None, help="resize the clip to WxH first, e.g. 1920x1080")
    parser.add_argument("--config", default=None, help="ours: 'name:key=value,...' (default: RLE, depth 2, all fast)")
    parser.add_argument("--video", help="video file (default: bundled clip)")
    parser.add_argument("--model", help="model package dir (default: demo model)")
    parser.add_argument("--out", default=out)
    return parser


def parse_scaling_args(parser: argparse.ArgumentParser, argv: Optional[Sequence[str]],
                       count_flag: str) -> Tuple[argparse.Namespace, List[int], str, Dict[str, Any]]:
    """(args, the sorted counts, our configuration's name, its options over ``DEFAULT_OPTIONS``)."""
    args = parser.parse_args(argv)
    text = getattr(args, count_flag.lstrip("-").replace("-", "_"))
    counts = sorted({int(n) for n in text.split(",") if n.strip()})
    if not counts or counts[0] < 1:
        parser.error(f"{count_flag} must list counts >= 1, got {text!r}")
    # clips loop to --frames; the bound keeps a stock run (a few FPS) from outliving a GPU call
    if not 1 <= args.frames <= 3000:
        parser.error(f"--frames must be in [1, 3000], got {args.frames}")
    name, options = ("ours", {}) if args.config is None else parse_config(args.config)
    return args, counts, name, {**DEFAULT_OPTIONS, **options}


def plot_scaling(results: List[Dict[str, Any]], count_key: str, xlabel: str, title: str, path: str) -> None:
    """Aggregate FPS against the count, one line per configuration."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib not installed: no PNG written")
        return
    figure, axis = plt.subplots(figsize=(6, 3.8))
    for name in dict.fromkeys(r["name"] for r in results):
        rows = sorted((r for r in results if r["name"] == name and r["fps"]), key=lambda r: r[count_key])
        axis.plot([r[count_key] for r in rows], [r["fps"] for r in rows], "o-", label=name)
    axis.set_xlabel(xlabel)
    axis.set_ylabel("aggregate frames per second")
    axis.set_title(title)
    axis.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    print(f"chart: {path}")
