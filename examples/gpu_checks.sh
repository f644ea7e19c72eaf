#!/usr/bin/env bash
# GPU-host checks, run from the repository root on a machine with CUDA but no package index:
#   bash examples/gpu_checks.sh tests|micro|e2e|before|video|annotated|processes|painters|streams|setup-cost|nvdec|module[,...] [WHEEL_DIR | SITE_PACK.tar.xz]
# The wheelhouse (inference + inference-models for Python 3.12, built by the team's make-wheelhouse
# script, plus pytest; or its site pack from pack_gpu_site.sh, which fits the carry limit beside
# the repository) is installed once per machine into /tmp/site. Logs and JSON go to $OUT (or ./out).
# Every step has its own timeout so one hang cannot eat the whole session.
set -u
phase="${1:-tests}"
wheels="${2:-.whl}"
out="${OUT:-./out}"
mkdir -p "$out"

if [ ! -f /tmp/site/.installed ]; then
  if [ -f "$wheels" ]; then  # a site pack from examples/pack_gpu_site.sh
    mkdir -p /tmp/site && tar -xJf "$wheels" -C /tmp/site && touch /tmp/site/.installed || exit 1
  else
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site "$wheels"/*.whl \
      >/tmp/site-install.log 2>&1 && touch /tmp/site/.installed || { tail -5 /tmp/site-install.log; exit 1; }
  fi
fi
# The repository root is the package `inference_fastpath`: expose it under that name.
mkdir -p /tmp/pkgroot && ln -sfn "$(pwd)" /tmp/pkgroot/inference_fastpath
export PYTHONPATH="/tmp/pkgroot:/tmp/site${PYTHONPATH:+:$PYTHONPATH}"
# PyAV (the HTTP server and the stream manager import it) is too large to travel with the site pack: a call of
# its own unpacks it here first (`python3 -m zipfile -e av-*.whl /tmp/av-site`).
[ -d /tmp/av-site ] && export PYTHONPATH="$PYTHONPATH:/tmp/av-site"
export PYTHONUNBUFFERED=1 DISABLE_VERSION_CHECK=True METRICS_ENABLED=False ACTIVE_LEARNING_ENABLED=False
export ALLOW_INFERENCE_MODELS_DIRECTLY_ACCESS_LOCAL_PACKAGES=True CORE_MODEL_GAZE_ENABLED=False
export WORKFLOWS_PLUGINS=inference_fastpath
# The wheelhouse's hydra registers a pytest plugin that fails to import there; we need none.
export PYTEST_DISABLE_PLUGIN_AUTOLOAD=1

{ nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
  python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"; } | tee "$out/device.txt"

# The demo model is rebuilt on each fresh machine (weights are too large to carry); ~1 minute.
timeout 240 python3 -m inference_fastpath.examples.demo_model 2>&1 | tail -3 | tee "$out/demo_model.txt"

# Phases run in the order given (comma list), e.g. `tests,micro,e2e`.
for step in ${phase//,/ }; do
case "$step" in
  tests)
    [ -n "${GPU_TESTS-tests/gpu}" ] && timeout 300 python3 -m pytest -q -p no:cacheprovider -m gpu ${GPU_TESTS-tests/gpu} -rs 2>&1 | tee "$out/gpu_tests.log" | tail -30
    [ -n "${KERNEL_TESTS-tests/kernels}" ] && timeout "${KERNEL_TIMEOUT:-240}" python3 -m pytest -q -p no:cacheprovider ${KERNEL_TESTS-tests/kernels} -rs 2>&1 | tee "$out/kernel_tests.log" | tail -15
    ;;
  micro)  # MICRO picks the microbenchmarks; *_ARGS pass options to each
    case ",${MICRO:-pre,post,engine}," in *,pre,*)
      timeout 150 python3 -m inference_fastpath.examples.benchmarks.bench_preprocess --out "$out/bench_preprocess.json" ${PRE_ARGS:-} 2>&1 | tee "$out/bench_preprocess.log" | tail -20 ;; esac
    case ",${MICRO:-pre,post,engine}," in *,post,*)
      timeout 200 python3 -m inference_fastpath.examples.benchmarks.bench_postprocess --out "$out/bench_postprocess.json" ${POST_ARGS:-} 2>&1 | tee "$out/bench_postprocess.log" | tail -25 ;; esac
    case ",${MICRO:-pre,post,engine}," in *,engine,*)
      timeout 200 python3 -m inference_fastpath.examples.benchmarks.bench_engine --out "$out/bench_engine.json" ${ENGINE_ARGS:-} 2>&1 | tee "$out/bench_engine.log" | tail -20 ;; esac
    ;;
  e2e)
    timeout "${E2E_TIMEOUT:-420}" python3 -m inference_fastpath.examples.benchmarks.benchmark --frames "${FRAMES:-150}" --warmup 10 \
      --presets "${PRESETS:-reference,fast,fast-depth2}" ${EXTRA_CONFIGS:-} --out "$out/bench_e2e.json" 2>&1 \
      | grep -v -i "warn" | tee "$out/bench_e2e.log" | tail -30
    ;;
  before)  # the e2e phase on another checkout of the package (BEFORE=its root), same machine, same args
    mkdir -p /tmp/beforeroot && ln -sfn "$(realpath "${BEFORE:?set BEFORE to a checkout of the package}")" /tmp/beforeroot/inference_fastpath
    PYTHONPATH="/tmp/beforeroot:/tmp/site" timeout "${E2E_TIMEOUT:-420}" python3 -m "${BEFORE_MODULE:-inference_fastpath.examples.benchmark}" \
      --frames "${FRAMES:-150}" --warmup 10 --presets "${PRESETS:-reference,fast,fast-depth2}" ${BEFORE_CONFIGS:-${EXTRA_CONFIGS:-}} \
      --out "$out/bench_e2e_before.json" 2>&1 | grep -v -i "warn" | tee "$out/bench_e2e_before.log" | tail -30
    ;;
  video)  # run_video on an upscaled clip: the annotated fast path end to end, with the writer's FPS
    python3 -c "import cv2,sys; from inference_fastpath.workflows.video_files import read_frames, write_clip; \
f=read_frames('${VIDEO_SRC:-examples/data/shapes_clip.mp4}', count=${VIDEO_FRAMES:-150}); write_clip('/tmp/clip-${VIDEO_SIZE:-1920x1080}.mp4', \
[cv2.resize(x, tuple(int(v) for v in '${VIDEO_SIZE:-1920x1080}'.split('x'))) for x in f], fps=25)"
    timeout "${VIDEO_TIMEOUT:-200}" python3 -m inference_fastpath.examples.run_video --video "/tmp/clip-${VIDEO_SIZE:-1920x1080}.mp4" \
      --out "/tmp/annotated.mp4" ${VIDEO_ARGS:-} 2>&1 | grep -v -i "warn" | tee "$out/run_video.log" | tail -8
    ;;
  annotated)  # the annotated workflow and compact output against stock, trained demo, RESOLUTION=WxH
    model="$(timeout 120 python3 -m inference_fastpath.examples.trained_demo 2>/dev/null | tail -1)"
    fast="preprocess=auto,engine=auto,cuda_graphs=true,postprocess=auto,pipeline_depth=2"
    timeout "${ANNOTATED_TIMEOUT:-300}" python3 -m inference_fastpath.examples.benchmarks.benchmark --model "$model" \
      --video examples/data/shapes_clip.mp4 --frames "${FRAMES:-60}" --warmup 10 --presets , \
      --resolution "${RESOLUTION:-1920x1080}" --stock annotated --config "annotated-d2:$fast,workflow=annotated" \
      --config "annotated-overlap:$fast,downstream_overlap=true,workflow=annotated" \
      --config "compact-d2:$fast" --out "$out/annotated-${RESOLUTION:-1920x1080}.json" 2>&1 | grep -v -i "warn" \
      | tee "$out/annotated-${RESOLUTION:-1920x1080}.log" | tail -12
    ;;
  processes)  # K processes x N sources on the GPU (PROCESSES=K list, SOURCES=N, RESOLUTION=WxH or native), trained demo
    model="$(timeout 120 python3 -m inference_fastpath.examples.trained_demo 2>/dev/null | tail -1)"
    timeout "${PROCESSES_TIMEOUT:-300}" python3 -m inference_fastpath.examples.benchmarks.many_processes \
      --processes "${PROCESSES:-1,2,4}" --sources-per-process "${SOURCES:-8}" --frames "${FRAMES:-200}" --warmup 10 \
      --model "$model" --video examples/data/shapes_clip.mp4 ${RESOLUTION:+--resolution $RESOLUTION} \
      --stock-sources "${STOCK_SOURCES:-1}" ${PROCESSES_ARGS:-} --out "$out/many-processes-${RESOLUTION:-native}.json" 2>&1 \
      | grep -v -i "warn" | tee "$out/many-processes-${RESOLUTION:-native}.log" | tail -8
    ;;
  painters)  # the mask painters' microbenchmark
    timeout 150 python3 -m inference_fastpath.examples.benchmarks.bench_mask_painting --budget 0.3 \
      --out "$out/bench-mask-painting.json" 2>&1 | grep -v -i "warn" | tee "$out/bench-mask-painting.log" | tail -25
    ;;
  streams)  # the stream manager, PIPELINES=M list, STREAM_ARGS e.g. "--max-fps 30" (needs PyAV in /tmp/av-site, see above)
    model="$(timeout 120 python3 -m inference_fastpath.examples.trained_demo 2>/dev/null | tail -1)"
    timeout "${STREAMS_TIMEOUT:-400}" python3 -m inference_fastpath.examples.benchmarks.stream_manager \
      --pipelines "${PIPELINES:-1,2,4}" --frames "${STREAM_FRAMES:-100}" --stock-pipelines "${STOCK_PIPELINES:-0}" --model "$model" ${STREAM_ARGS:-} \
      --video examples/data/shapes_clip.mp4 --start-method spawn \
      --config "rle-d2:mask_output=rle,pipeline_depth=2,preprocess=auto,engine=auto,cuda_graphs=true,postprocess=auto" \
      --out "$out/stream-manager.json" 2>&1 | grep -v -i "warn" | grep -v "INFO:httpx" | tee "$out/stream-manager.log" | tail -8
    ;;
  setup-cost)  # run_video's setup against the benchmark's, one difference at a time (the 360-frame 1080p shapes clip; SETUP_VARIANTS)
    python3 -c "import cv2; from inference_fastpath.workflows.video_files import read_frames, write_clip; \
f=read_frames('examples/data/shapes_clip.mp4'); write_clip('/tmp/shapes-1080-x3.mp4', [cv2.resize(x, (1920, 1080)) for x in f] * 3, fps=25)"
    model="$(timeout 120 python3 -m inference_fastpath.examples.trained_demo 2>/dev/null | tail -1)"
    timeout "${SETUP_COST_TIMEOUT:-300}" python3 -m inference_fastpath.examples.benchmarks.pipeline_setup_cost \
      --video /tmp/shapes-1080-x3.mp4 --model "$model" --variants "${SETUP_VARIANTS:-plain,pre,threads1,cv-threads1}" --timeout 50 --out "$out/pipeline-setup-cost.json" 2>&1 \
      | grep -v -i "warn" | tee "$out/pipeline-setup-cost.log" | tail -8
    ;;
  nvdec)  # what streamvision's NVDEC producer needs here: PyNvVideoCodec and the driver's video capability
    { python3 -c "import PyNvVideoCodec as n; print('PyNvVideoCodec', n.__version__)" 2>&1 | tail -1
      ls /usr/lib/x86_64-linux-gnu/libnvcuvid.so* /usr/lib64/libnvcuvid.so* 2>&1
      echo "NVIDIA_DRIVER_CAPABILITIES=${NVIDIA_DRIVER_CAPABILITIES:-unset}"
      nvidia-smi -q | grep -i -A2 "decoder" | head -6; } 2>&1 | tee "$out/nvdec-probe.log"
    ;;
  module)  # MODULE="package.module args[; package.module args ...]": extra scripts (diagnostics)
    IFS=';' read -ra modules <<< "${MODULE}"
    for index in "${!modules[@]}"; do
      timeout "${MODULE_TIMEOUT:-150}" python3 -m ${modules[$index]} 2>&1 | grep -v -i "warn" \
        | tee "$out/module-$index.log" | tail -"${MODULE_TAIL:-20}"
    done
    ;;
  *) echo "unknown phase $step"; exit 2 ;;
esac
done
# At most a few files come back from the GPU host: pack everything into one archive.
tar czf "/tmp/results-${phase//,/-}.tgz" -C "$out" --exclude='*.tgz' . && find "$out" -maxdepth 1 -type f ! -name '*.tgz' -delete && mv "/tmp/results-${phase//,/-}.tgz" "$out/"
