"""Run our block on a video through ``InferencePipeline`` and write an annotated video.

    python -m inference_fastpath.examples.run_video                       # bundled clip + demo model
    python -m inference_fastpath.examples.run_video --video in.mp4 --model my-project/3 --out out.mp4

The workflow is the fast one end to end: our segmentation block (compact masks), our GPU mask
visualization, then the stock box and label annotators. The video is encoded off the pipeline's
threads: in a process of its own by default (``--writer process``: the encoder never waits for the
pipeline's interpreter lock), or on a thread (``--writer thread``). Shows progress, prints the end-to-end
FPS and the writer's own FPS. Without ``--model`` it runs the trained demo model on the shapes clip
(``--demo random``: the random-weight demo on the pedestrian clip, whose detections are not semantic).
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from pathlib import Path
from typing import Optional, Sequence

from inference_fastpath.workflows.running import configure_environment

configure_environment()  # before anything imports `inference`

import cv2  # noqa: E402

STEP_OPTIONS = ("preprocess", "engine", "postprocess", "precision", "mask_output")


WARMUP_FRAMES = 10  # as the benchmark's --warmup: the frames that capture graphs and compile kernels


def parse_args(argv: Optional[Sequence[str]]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--video", help="video file (default: the demo's clip, see --demo)")
    parser.add_argument("--model", help="Roboflow model id or local package dir (default: build the demo model)")
    parser.add_argument("--demo", default="trained", choices=["trained", "random"],
                        help="demo model without --model: 'trained' segments the synthetic shapes of "
                             "examples/data/shapes_clip.mp4; 'random' has random weights calibrated to give "
                             "a realistic detection load on the pedestrian clip examples/data/clip.mp4")
    parser.add_argument("--out", default="annotated.mp4", help="annotated video to write ('' to skip)")
    parser.add_argument("--preprocess", default="auto", choices=["auto", "triton", "reference"])
    parser.add_argument("--engine", default="auto", choices=["auto", "tensorrt", "torch", "onnx"])
    parser.add_argument("--postprocess", default="auto", choices=["auto", "fused", "reference"])
    parser.add_argument("--precision", default="fp32", choices=["fp32", "fp16", "bf16"])
    parser.add_argument("--mask-output", default="compact", choices=["compact", "dense", "rle"])
    parser.add_argument("--no-cuda-graphs", action="store_true")
    parser.add_argument("--pipeline-depth", type=int, default=2, choices=[1, 2],
                        help="2 (default): the engine runs frame t+1 while the host finishes frame t")
    parser.add_argument("--no-downstream-overlap", action="store_true",
                        help="at depth 2, paint each frame before launching the next (by default the annotators "
                             "paint frame t on the host while the GPU runs frame t+1)")
    parser.add_argument("--writer", default="process", choices=["process", "thread"],
                        help="encode the video in a child process fed through shared memory (default), or on a "
                             "thread of this process, which shares the interpreter lock with the pipeline")
    parser.add_argument("--confidence", type=float, help="custom confidence threshold")
    parser.add_argument("--pinned-decode", action="store_true",
                        help="decode into recycled pinned buffers (adapters/cuda/pinned_video_source.py): the Triton "
                             "preprocess then uploads each frame without a staging copy")
    return parser.parse_args(argv)


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    from inference_fastpath.examples.demo_model import build_demo_model, default_clip_path
    from inference_fastpath.workflows.running import run_pipeline
    from inference_fastpath.workflows import FASTPATH_ANNOTATED, load_workflow
    from inference_fastpath.workflows.video_files import BackgroundVideoWriter
    from inference_fastpath.workflows.video_writer_process import VideoWriterProcess

    if args.demo == "trained":
        from inference_fastpath.examples.trained_demo import build_trained_demo_model, default_video_path

        video = args.video or str(default_video_path())
        model = args.model or str(build_trained_demo_model())
    else:
        video = args.video or str(default_clip_path())
        model = args.model or str(build_demo_model(clip_path=Path(video) if args.video is None else None))
    if not Path(video).is_file():
        print(f"error: --video {video!r} does not exist", file=sys.stderr)
        return 2
    capture = cv2.VideoCapture(video)
    total = int(capture.get(cv2.CAP_PROP_FRAME_COUNT)) or None
    fps = capture.get(cv2.CAP_PROP_FPS) or 25.0
    capture.release()

    step_options = {name: getattr(args, name) for name in STEP_OPTIONS}
    step_options.update(cuda_graphs=not args.no_cuda_graphs, pipeline_depth=args.pipeline_depth,
                        downstream_overlap=args.pipeline_depth == 2 and not args.no_downstream_overlap)
    if args.confidence is not None:
        step_options.update(confidence_mode="custom", custom_confidence=args.confidence)
    workflow = load_workflow(FASTPATH_ANNOTATED, **step_options)

    writer_class = VideoWriterProcess if args.writer == "process" else BackgroundVideoWriter
    writer = writer_class(args.out, fps) if args.out else None
    started = time.perf_counter()
    detections_seen = [0]

    def on_result(prediction, frame) -> None:
        detections_seen[0] += len(prediction["predictions"])
        if writer is not None:
            writer.write(prediction["annotated"].numpy_image)
        done = frame.frame_id
        if done % 10 == 0 or (total and done == total):
            elapsed = time.perf_counter() - started
            of_total = f"/{total}" if total else ""
            print(f"frame {done}{of_total}  {done / elapsed:6.1f} fps  {len(prediction['predictions'])} detections", flush=True)

    reference = video
    if args.pinned_decode:
        from inference_fastpath.adapters.cuda.pinned_video_source import pinned_video_source

        reference = pinned_video_source(video)
    run = run_pipeline(reference, workflow, {"model_id": model}, on_result=on_result, keep_results=False,
                       warmup_frames=WARMUP_FRAMES)
    if writer is not None:
        writer.close()  # raises, naming the file, if the encoder failed
    if run.errors:
        print(f"pipeline reported errors: {run.errors}", file=sys.stderr)
        return 1
    frames = len(run.results)
    fps_warm = run.fps_after_warmup()
    print(
        f"processed {frames} frames, {detections_seen[0] / max(frames, 1):.1f} detections/frame, "
        f"{frames / (run.finished_at - run.started_at):.1f} fps overall"
        + (f", {fps_warm:.1f} fps after the first {WARMUP_FRAMES} (the steady rate: first graph captures and "
           "kernel compilations excluded)" if fps_warm else "")
    )
    if writer is not None:
        encode = f"{writer.encode_fps:.1f}" if writer.encode_fps else "n/a"
        stages = getattr(writer, "stage_seconds", None)
        stages = (" (busy: " + ", ".join(f"{name} {seconds:.2f} s" for name, seconds in stages.items()) + ")"
                  if stages else "")
        print(f"video writer: {writer.frames_written} frames, {encode} fps in its own {args.writer}{stages}, "
              f"{writer.encoder}")
    if args.out:
        print(f"annotated video: {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
