"""The examples users run: the annotated workflow, run_video.py and the benchmark harness (small, CPU)."""

from __future__ import annotations

import json

import cv2
import numpy as np
import pytest

from inference_fastpath.workflows.running import execution_engine
from inference_fastpath.workflows.video_files import read_frames, write_clip
from inference_fastpath.workflows import FASTPATH_ANNOTATED, load_workflow

pytestmark = pytest.mark.slow
REFERENCE = dict(preprocess="reference", postprocess="reference")


def test_chaining_into_stock_annotators_draws_the_masks(demo_model_dir, clip_frames):
    frame = clip_frames[0]
    result = execution_engine(load_workflow(FASTPATH_ANNOTATED, **REFERENCE)).run(
        runtime_parameters={"image": [frame], "model_id": demo_model_dir}
    )[0]
    detections, annotated = result["predictions"], result["annotated"].numpy_image
    assert len(detections) > 0 and annotated.shape == frame.shape
    changed = np.any(annotated != frame, axis=2)
    inside = np.any(np.asarray(detections.mask), axis=0)
    assert changed[inside].mean() > 0.5, "the mask annotator did not paint the detected pixels"


@pytest.mark.parametrize("decode, writer", [([], "process"), (["--pinned-decode"], "thread")])
def test_run_video_writes_an_annotated_video(demo_model_dir, tiny_clip, tmp_path, capsys, decode, writer):
    from inference_fastpath.examples.run_video import main

    out = tmp_path / "annotated.mp4"
    assert main(["--video", tiny_clip, "--model", demo_model_dir, "--out", str(out),
                 "--preprocess", "reference", "--postprocess", "reference", "--writer", writer, *decode]) == 0
    printed = capsys.readouterr().out
    assert "processed 3 frames" in printed and "fps" in printed
    assert "video writer: 3 frames" in printed and f"in its own {writer}" in printed
    capture = cv2.VideoCapture(str(out))
    assert int(capture.get(cv2.CAP_PROP_FRAME_COUNT)) == 3
    capture.release()


def test_benchmark_runs_stock_and_ours_and_writes_json_and_chart(demo_model_dir, tiny_clip, tmp_path):
    from inference_fastpath.examples.benchmarks.benchmark import main

    out = tmp_path / "bench.json"
    assert main(["--video", tiny_clip, "--model", demo_model_dir, "--frames", "3", "--warmup", "1",
                 "--presets", "reference", "--config", "pinned:preprocess=reference,postprocess=reference,source=pinned",
                 "--out", str(out)]) == 0
    report = json.loads(out.read_text())
    names = [r["name"] for r in report["results"]]
    assert names == ["stock-v3", "reference", "pinned"]
    for result in report["results"]:
        assert result["frames"] == 3 and result["frame_ids_in_order"] and result["fps"] > 0
        assert result["mean_detections"] > 0
    ours = report["results"][1]
    assert set(ours["stages_ms"]) >= {"preprocess_ms", "engine_ms", "postprocess_ms", "output_ms"}
    assert len(ours["timeline"]) == 3
    assert ours["parity"]["frames_compared"] == 3 and ours["parity"]["frames_within_bars"] == 3
    assert out.with_suffix(".png").is_file()
    pinned = report["results"][2]  # compared with `reference`, frame by frame
    assert pinned["source"] == "pinned" and pinned["pinned_source"]["pooled_frames"] == 3
    assert pinned["parity"]["frames_compared"] == 3 and pinned["parity"]["frames_within_bars"] == 3


def test_benchmark_annotated_workflows_and_resolution(demo_model_dir, tiny_clip, tmp_path):
    """The annotated configurations: stock v3 -> stock visualizations against ours -> our GPU mask
    visualization (the stock annotator on a CPU) -> stock box and label, on an upscaled clip."""
    from inference_fastpath.examples.benchmarks.benchmark import main

    out = tmp_path / "bench.json"
    assert main(["--video", tiny_clip, "--model", demo_model_dir, "--frames", "2", "--warmup", "0",
                 "--presets", "", "--stock", "plain,annotated", "--resolution", "320x240",
                 "--config", "annotated:preprocess=reference,postprocess=reference,workflow=annotated",
                 "--out", str(out)]) == 0
    report = json.loads(out.read_text())
    assert [r["name"] for r in report["results"]] == ["stock-v3", "stock-v3-annotated", "annotated"]
    assert report["resolution"] == "320x240"
    assert all(r["frames"] == 2 and not r["errors"] for r in report["results"])
    assert report["results"][2]["parity"]["frames_within_bars"] == 2


def test_profiler_targets_resolve_and_are_timed():
    """The profiler names real objects (a rename breaks this test, not a GPU run)."""
    from inference_fastpath.adapters.preprocess import upload
    from inference_fastpath.examples.benchmarks import profile_pipeline

    targets = profile_pipeline.default_timed()
    assert all(callable(getattr(owner, name)) for owner, name in targets)
    assert profile_pipeline.resolve_targets(["inference_fastpath.adapters.preprocess.upload:Staging.upload"]) == [
        (upload.Staging, "upload")]
    with pytest.raises(SystemExit, match="expected module:qualname"):
        profile_pipeline.resolve_targets(["no_colon"])
    with pytest.raises(SystemExit, match="has no attribute 'nope'"):
        profile_pipeline.resolve_targets(["inference_fastpath.adapters.preprocess.upload:nope"])

    class Owner:
        def work(self, x):
            return x + 1

        @staticmethod
        def helper(x):
            return x * 2

        @classmethod
        def build(cls, x):
            return (cls, x)

    samples = profile_pipeline.wrap_with_clock([(Owner, "work"), (Owner, "helper"), (Owner, "build")])
    owner = Owner()
    assert owner.work(1) == 2 and len(samples["Owner.work"]) == 1
    # static and class methods keep their calling convention, from the class and from an instance
    assert owner.helper(3) == 6 and Owner.helper(4) == 8 and len(samples["Owner.helper"]) == 2
    assert owner.build(5) == (Owner, 5) and Owner.build(6) == (Owner, 6) and len(samples["Owner.build"]) == 2


def test_many_sources_benchmark_pairs_every_result_with_its_own_frame(demo_model_dir, tiny_clip, tmp_path):
    from inference_fastpath.examples.benchmarks import many_sources

    out = tmp_path / "many.json"
    assert many_sources.main(["--video", tiny_clip, "--model", demo_model_dir, "--frames", "3", "--warmup", "1",
                              "--sources", "1,2", "--stock-sources", "1",
                              "--config", "ref:preprocess=reference,postprocess=reference,cuda_graphs=false",
                              "--out", str(out)]) == 0
    report = json.loads(out.read_text())
    assert [(r["name"], r["sources"]) for r in report["results"]] == [("stock-v3", 1), ("ref", 1), ("ref", 2)]
    two = report["results"][2]
    assert two["frames"] == 6 and two["all_frames_delivered_in_order"]
    assert [s["delivered"] for s in two["streams"]] == [3, 3] and two["streams"][1]["video"] == "mirrored.mp4"
    assert two["results_compared"] == 6 and two["results_mispaired"] == 0
    assert two["fps"] > 0 and two["latency_ms_p99"] >= two["latency_ms_p50"] > 0
    assert out.with_suffix(".png").is_file() and (tmp_path / "many-timeline-N2.png").is_file()


def test_many_sources_check_catches_a_result_paired_with_the_wrong_source(demo_model_dir, tiny_clip, tmp_path):
    """The pairing check can fail: expected results swapped between the two variants."""
    from inference_fastpath.examples.benchmarks import many_sources

    options, workflow = _reference_workflow()
    variants = many_sources.source_variants(tiny_clip, tmp_path)
    expected = _one_source_results(workflow, variants, demo_model_dir, options)
    swapped = {variants[0]: expected[variants[1]], variants[1]: expected[variants[0]]}
    result = many_sources.run_sources("swapped", workflow, variants, demo_model_dir, 0, 3, options, swapped)
    assert result["results_mispaired"] > 0


def test_many_sources_of_different_resolutions_in_one_batch(demo_model_dir, tiny_clip, tmp_path):
    """Sources of different sizes share batches: every result still equals its one-source run."""
    import cv2

    from inference_fastpath.examples.benchmarks import many_sources

    options, workflow = _reference_workflow()
    small = str(write_clip(tmp_path / "small.mp4", [cv2.resize(f, (160, 120)) for f in read_frames(tiny_clip)]))
    videos = [tiny_clip, small]
    expected = _one_source_results(workflow, videos, demo_model_dir, options)
    result = many_sources.run_sources("mixed", workflow, videos, demo_model_dir, 0, 3, options, expected)
    assert result["all_frames_delivered_in_order"] and result["results_mispaired"] == 0
    assert result["results_compared"] == 6


def test_many_sources_with_pinned_decode_pair_every_result_with_its_own_frame(demo_model_dir, tiny_clip, tmp_path):
    """``--pinned-decode``: the sources decode into the pinned frame pool (ordinary buffers without CUDA),
    every frame is counted there, and each result still equals its one-source run."""
    from inference_fastpath.examples.benchmarks import many_sources

    options, workflow = _reference_workflow()
    variants = many_sources.source_variants(tiny_clip, tmp_path)
    expected = _one_source_results(workflow, variants, demo_model_dir, options)
    result = many_sources.run_sources("pinned", workflow, variants, demo_model_dir, 0, 3, options, expected,
                                      pinned_decode=True)
    assert result["pinned_decode"] and result["decoded_pinned"] == 6 and result["decoded_unpinned"] == 0
    assert result["all_frames_delivered_in_order"] and result["results_mispaired"] == 0
    assert result["results_compared"] == 6 and result["results_equal_to_one_source"] == 6


def test_a_pinned_timed_source_decodes_what_opencv_decodes_and_records_its_grabs(tiny_clip):
    from inference_fastpath.adapters.cuda.pinned_video_source import PinnedVideoFrameProducer
    from inference_fastpath.examples.benchmarks.camera_sources import TimedSource

    camera = TimedSource(tiny_clip, fps=50, pinned=True)
    producer = camera()
    assert isinstance(producer, PinnedVideoFrameProducer) and repr(camera).startswith("pinned-timed:")
    frames = []
    while producer.grab():
        ok, frame = producer.retrieve()
        assert ok
        frames.append(frame.copy())
    producer.release()
    expected = read_frames(tiny_clip)
    assert len(frames) == len(expected) == len(producer.grabbed_at) == producer.pooled_frames
    assert all(np.array_equal(a, b) for a, b in zip(frames, expected))
    assert not producer.discover_source_properties().is_file  # paced like a camera


def test_timed_source_paces_grabs_like_a_camera(tiny_clip):
    import time

    from inference_fastpath.examples.benchmarks.camera_sources import TimedSource

    camera = TimedSource(tiny_clip, fps=20)
    producer = camera()
    properties = producer.discover_source_properties()
    assert not properties.is_file and properties.is_reconnectable is False and properties.timestamp_created is None
    started = time.perf_counter()
    while producer.grab():
        producer.retrieve()
    producer.release()
    assert len(producer.grabbed_at) == 3 and producer.grabbed_at[-1] - started >= 2 / 20 - 1e-3
    assert camera.grabbed_at(1) == producer.grabbed_at[0] and camera.grabbed_at(4) is None
    assert TimedSource(tiny_clip)().discover_source_properties().is_file  # no fps: still a file


def test_timed_source_pacing_tells_a_camera_that_kept_its_schedule_from_one_that_fell_behind(tiny_clip):
    import time

    from inference_fastpath.examples.benchmarks.camera_sources import TimedSource

    def play(camera, pause_s):
        producer = camera()
        while producer.grab():
            producer.retrieve()
            time.sleep(pause_s)  # the consumer (or a starved decode thread) holding the grab loop up
        producer.release()
        return camera.pacing()

    on_time = play(TimedSource(tiny_clip, fps=20), 0.0)
    assert on_time["camera_fps"] is not None and abs(on_time["camera_fps"] - 20) < 2
    assert on_time["late_ms_max"] < 25
    behind = play(TimedSource(tiny_clip, fps=20), 0.15)  # each grab comes 0.1 s after its due time
    assert behind["camera_fps"] < 0.95 * 20 and behind["late_ms_max"] >= 90
    assert TimedSource(tiny_clip)().grab() and TimedSource(tiny_clip).pacing()["camera_fps"] is None  # unpaced


def test_many_sources_realtime_counts_drops_and_keeps_pairing(demo_model_dir, tiny_clip, tmp_path):
    from inference_fastpath.examples.benchmarks import many_sources

    options, workflow = _reference_workflow()
    variants = many_sources.source_variants(tiny_clip, tmp_path)
    expected = _one_source_results(workflow, variants, demo_model_dir, options)
    result = many_sources.run_sources("live", workflow, variants, demo_model_dir, 0, 3, options, expected,
                                      realtime_fps=10)
    assert result["realtime_fps"] == 10 and result["results_mispaired"] == 0
    for stream in result["streams"]:
        assert 1 <= stream["delivered"] <= 3 and stream["dropped"] == 3 - stream["delivered"] and stream["in_order"]
        assert 0 <= stream["dropped_after_warmup"] <= stream["dropped"]
    assert 0 <= result["dropped_after_warmup_fraction"] <= 1
    assert 0 <= result["streams_holding_rate"] <= 2 and result["latency_ms_p50"] > 0
    assert 0 <= result["cameras_behind_schedule"] <= 2 and result["camera_late_ms_max"] >= 0
    assert all(stream["camera_fps"] > 0 for stream in result["streams"])
    assert 0 <= result["streams_holding_rate_results_clock"] <= 2 and result["last_result_latency_ms_max"] > 0


def test_drops_after_warmup_count_grabbed_frames_missing_after_the_first_counted_result():
    from inference_fastpath.examples.benchmarks.many_sources import dropped_after_warmup

    # 10 frames grabbed; results for 1, 2, 3 (warm-up drops before 3 do not count), then 5, 6, 9
    assert dropped_after_warmup([1, 2, 3, 5, 6, 9], grabbed=10, warmup=2) == 8 - 4
    assert dropped_after_warmup([4, 5, 6], grabbed=6, warmup=0) == 0  # 1-3 lost while warming up
    assert dropped_after_warmup([1, 2], grabbed=9, warmup=2) is None


def test_many_sources_dead_and_short_sources_leave_the_others_running(demo_model_dir, tiny_clip, tmp_path):
    """A missing file among valid ones (InferencePipeline alone would deliver nothing for any
    source) is left out and reported; a source that ends early stops alone."""
    from inference_fastpath.examples.benchmarks import many_sources

    options, workflow = _reference_workflow()
    short = str(write_clip(tmp_path / "short.mp4", read_frames(tiny_clip, count=1)))
    broken = tmp_path / "broken.mp4"
    broken.write_bytes(open(tiny_clip, "rb").read()[:200])  # cut before the index: cannot be opened
    expected = _one_source_results(workflow, [tiny_clip, short], demo_model_dir, options)
    videos = [tiny_clip, str(tmp_path / "missing.mp4"), short, str(broken)]
    result = many_sources.run_sources("dead", workflow, videos, demo_model_dir, 0, 3, options, expected)
    assert result["unusable_sources"] == [1, 3]
    assert "no such file" in result["streams"][1]["unusable"] and "broken.mp4" in result["streams"][3]["unusable"]
    assert [s["delivered"] for s in result["streams"]] == [3, 0, 1, 0]
    assert result["results_mispaired"] == 0 and result["results_compared"] == 4
    with pytest.raises(ValueError, match="no source"):
        many_sources.run_sources("none", workflow, [str(broken)], demo_model_dir, 0, 3, options)


def test_stream_manager_runs_our_workflow_in_pipeline_processes(demo_model_dir, clip_path, tmp_path):
    """Two pipelines through the real stream manager and HTTP API, each on its own copy of a clip,
    and a third on a camera that does not exist: the two bring their results back in order, equal
    to the same workflow run in this process; the manager reports the third's source error."""
    import shutil

    from inference_fastpath.examples.benchmarks import stream_manager
    from inference_fastpath.workflows import FASTPATH, load_workflow

    clip = str(write_clip(tmp_path / "clip.mp4", read_frames(clip_path, count=8)))
    copies = [shutil.copy(clip, tmp_path / f"copy{i}.mp4") for i in range(2)]
    workflow = load_workflow(FASTPATH, preprocess="reference", postprocess="reference", cuda_graphs=False)
    expected = stream_manager.in_process_signatures(workflow, clip, demo_model_dir)
    assert len(expected) == 8 and any(expected.values())
    dead = str(tmp_path / "no-such-camera.mp4")
    with stream_manager.running_stream_api(tmp_path / "logs", max_pipelines=3) as (base, _):
        result = stream_manager.run_pipelines("ours", base, workflow, [copies[0], dead, copies[1]], demo_model_dir, 8,
                                              0, expected, timeout_s=240)
    assert result["pipelines"] == 3
    # The dead source's pipeline ends without a frame and is reported so; what the manager's
    # status said about it is kept when the benchmark saw it before the manager forgot the
    # pipeline (it can be gone before the initialise call even answers). The others are unaffected.
    lost = result["per_pipeline"].pop(1)
    assert lost["delivered"] == 0 and lost["stopped"] == "ended" and lost["ended_without_a_frame"], lost
    assert all("no-such-camera.mp4" in p or "ERROR state" in p for p in lost["source_problems"]), lost
    for pipeline in result["per_pipeline"]:
        assert pipeline["source_problems"] == [] and not pipeline["ended_without_a_frame"], pipeline
        # the manager ends a pipeline once its file is read and drops what is still buffered or in
        # flight there, so how many of the last frames are lost depends on the host's speed
        assert pipeline["delivered"] >= 1, pipeline
        assert pipeline["in_order"] and pipeline["results_differing_from_in_process"] == 0, pipeline
        assert pipeline["stopped"] == "ended" and pipeline["lost"] == 8 - pipeline["delivered"], pipeline


def _reference_workflow():
    from inference_fastpath.workflows import FASTPATH, load_workflow

    options = dict(preprocess="reference", postprocess="reference", cuda_graphs=False)
    return options, load_workflow(FASTPATH, **options)


def _one_source_results(workflow, videos, model, options):
    """video -> {frame id: detections} of a one-source run of each video."""
    from inference_fastpath.examples.benchmarks import many_sources

    expected = {}
    for video in videos:
        expected[video] = {}
        many_sources.run_sources("keep", workflow, [video], model, 0, 3, options, keep=expected[video])
    return expected


def test_a_stalled_source_stalls_every_stream_unless_batches_time_out(demo_model_dir, tiny_clip, tmp_path):
    """InferencePipeline's batches wait for every source by default: one frozen camera freezes all
    of them. With a batch timeout the others keep going, and nothing is mis-paired either way."""
    import shutil

    from inference_fastpath.examples.benchmarks import many_sources

    options, workflow = _reference_workflow()
    other = str(shutil.copy(tiny_clip, tmp_path / "other.mp4"))
    expected = _one_source_results(workflow, [tiny_clip, other], demo_model_dir, options)
    stall = 8.0
    kwargs = dict(stalls={1: (1, stall)})
    waiting = many_sources.run_sources("wait", workflow, [tiny_clip, other], demo_model_dir, 0, 3, options,
                                       expected, **kwargs)
    timed = many_sources.run_sources("timeout", workflow, [tiny_clip, other], demo_model_dir, 0, 3, options,
                                     expected, batch_timeout=0.2, **kwargs)
    for result in (waiting, timed):
        assert result["all_frames_delivered_in_order"] and result["results_mispaired"] == 0
    steady, frozen = timed["streams"]
    assert frozen["last_result_at"] - steady["last_result_at"] > stall / 4  # the steady stream did not wait
    steady, frozen = waiting["streams"]
    assert abs(frozen["last_result_at"] - steady["last_result_at"]) < stall / 4  # it waited for the frozen one


def test_a_live_stream_that_dropped_frames_only_while_warming_up_holds_the_rate_in_steady_state():
    from inference_fastpath.examples.benchmarks.many_sources import holds_rate

    stream = {"latency_ms_p99": 60.0, "fps": 29.9, "dropped_fraction": 0.15, "dropped_after_warmup_fraction": 0.0}
    assert holds_rate(stream, 30.0, stream["dropped_after_warmup_fraction"])
    assert not holds_rate(stream, 30.0, stream["dropped_fraction"])
    assert not holds_rate({**stream, "latency_ms_p99": 120.0}, 30.0, 0.0)  # too late
    assert not holds_rate({**stream, "fps": 25.0}, 30.0, 0.0)  # too slow
    assert not holds_rate(stream, 30.0, None)  # nothing counted


def test_the_pipeline_setup_diagnostic_names_an_unknown_variant(capsys):
    from inference_fastpath.examples.benchmarks.pipeline_setup_cost import main

    with pytest.raises(SystemExit):
        main(["--video", "clip.mp4", "--model", "m", "--variants", "plain,fast"])
    assert "unknown variants ['fast']" in capsys.readouterr().err


def test_a_warm_pass_runs_before_the_live_run_and_stays_out_of_its_figures(demo_model_dir, tiny_clip, tmp_path):
    from inference_fastpath.examples.benchmarks import many_sources

    options, workflow = _reference_workflow()
    variants = many_sources.source_variants(tiny_clip, tmp_path)
    expected = _one_source_results(workflow, variants, demo_model_dir, options)
    calls = []
    result = many_sources.run_sources("live", workflow, variants, demo_model_dir, 0, 3, options, expected,
                                      realtime_fps=10, warm_results=2, before_run=lambda: calls.append(1))
    assert calls == [1] and result["warm_pass_results"] >= 2 * len(variants)
    assert result["results_mispaired"] == 0
    for stream in result["streams"]:
        assert 1 <= stream["delivered"] <= 3 and stream["in_order"]  # the live run's frames only


def test_warm_before_live_needs_the_live_mode(capsys):
    from inference_fastpath.examples.benchmarks.many_sources import main

    with pytest.raises(SystemExit):
        main(["--sources", "1", "--warm-before-live", "5"])
    assert "goes with --realtime" in capsys.readouterr().err
