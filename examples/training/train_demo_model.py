"""Train the seeded RF-DETR-seg-nano demo network on synthetic scenes, within a time budget.

Recipe: the network is the demo package's seeded random network, with one class channel per
scene class and its encoder drawn portably (same seed -> same encoder on any torch version);
the random DINOv2 encoder stays frozen (it is 2/3 of the parameters and could not be
shipped under the size limit anyway), everything the inference path uses after it is trained:
projector, transformer decoder, the group-0 two-stage proposal head, class/box heads, mask head
and the query embeddings. Only those tensors are kept (fp16 safetensors); a fresh network built
from the same seed plus :func:`apply_trained_params` reproduces the trained model. A SHA-256 and
a value fingerprint of the frozen tensors are stored with them and checked on load, because the
scheme relies on seeded initialisation being identical where the parameters are applied.

Scenes are rendered on the fly in DataLoader workers; training scene k of run seed S uses
``np.random.default_rng(S * 10**9 + k)``, evaluation uses seeds from ``EVAL_SEED_BASE`` up.

    python -m inference_fastpath.examples.training.train_demo_model --out /tmp/run --minutes 7 \\
        --batch 32 --lr 3e-4 --seed 0 --device cuda --groups 13 --classification ia_bce
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import signal
import sys
import threading
import time
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch

from inference_fastpath.examples.training.set_criterion import TERMS, CriterionWeights, SetCriterion, scene_targets
from inference_fastpath.examples.training.trained_params import (
    _GROUP_ONLY,
    apply_trained_params,
    KEPT_PREFIXES,
    PARAMS_FILE,
    PARAMS_FORMAT,
    frozen_digest,
    frozen_fingerprint,
    kept_names,
    library_versions,
    read_params_metadata,
    save_trained_params,
)

LOGGER = logging.getLogger(__name__)

LOG_FILE = "training_log.json"
CURVE_FILE = "loss_curve.png"
TRAIN_SEEDS_PER_RUN = 10**9  # training scene k of run seed S: S * 10**9 + k
EVAL_SEED_BASE = 10**12  # evaluation scenes: EVAL_SEED_BASE + j, never reached by training seeds
MAX_RUN_SEED = EVAL_SEED_BASE // TRAIN_SEEDS_PER_RUN
IMAGENET_MEAN = (0.485, 0.456, 0.406)  # the package's inference_config normalisation
IMAGENET_STD = (0.229, 0.224, 0.225)


# --- network and parameter selection -------------------------------------------------------------


def build_network(seed: int) -> torch.nn.Module:
    """The seeded random network the training starts from (CPU, eval mode): one class channel
    per scene class, and an encoder drawn portably, so the frozen part rebuilds identically on
    any host (see ``demo_network.build_random_network``)."""
    from inference_fastpath.examples.demo_network import build_random_network
    from inference_fastpath.examples.training.synthetic_scenes import CLASS_NAMES

    return build_random_network(seed, num_classes=len(CLASS_NAMES), portable_encoder=True)


def trainable_names(network: torch.nn.Module, groups: int) -> List[str]:
    return kept_names(network) + [n for n, _ in network.named_parameters() if groups > 1 and _GROUP_ONLY.match(n)]


def parameter_report(network: torch.nn.Module, groups: int = 1) -> Dict[str, Any]:
    """Parameter counts per top-level submodule plus the trained / kept totals."""
    modules = {name: sum(p.numel() for p in child.parameters()) for name, child in network.named_children()}
    params = dict(network.named_parameters())
    kept = sum(params[n].numel() for n in kept_names(network))
    trained = sum(params[n].numel() for n in trainable_names(network, groups))
    total = sum(p.numel() for p in params.values())
    encoder = sum(p.numel() for p in network.backbone[0].encoder.parameters())
    projector = sum(p.numel() for p in network.backbone[0].projector.parameters())
    return {"modules": modules, "encoder": encoder, "projector": projector, "total": total, "trained": trained,
            "kept": kept, "frozen": total - trained, "kept_fp16_bytes": 2 * kept}


def package_class_names(network: torch.nn.Module, scene_class_names: Sequence[str]) -> List[str]:
    """One name per non-"no-object" logit channel: the scene classes, then placeholders."""
    channels = network.class_embed.out_features - 1
    if len(scene_class_names) > channels:
        raise ValueError(f"{len(scene_class_names)} scene classes but the network has {channels} class channels")
    return list(scene_class_names) + [f"unused_{i}" for i in range(len(scene_class_names), channels)]


# --- data ----------------------------------------------------------------------------------------


def train_scene_seed(run_seed: int, index: int) -> int:
    return run_seed * TRAIN_SEEDS_PER_RUN + index


def eval_scene_seed(index: int) -> int:
    return EVAL_SEED_BASE + index


class RenderScene:
    """Picklable ``seed -> Scene`` for DataLoader workers (real synthetic scenes)."""

    def __init__(self, resolution: int) -> None:
        self.resolution = resolution

    def __call__(self, seed: int) -> Any:
        from inference_fastpath.examples.training.synthetic_scenes import SceneConfig, render_scene

        return render_scene(np.random.default_rng(seed), SceneConfig(height=self.resolution, width=self.resolution))


class SceneDataset(torch.utils.data.Dataset):
    """Scene ``k`` of a run is a pure function of (run seed, k): workers need no shared state."""

    def __init__(self, run_seed: int, scene_fn: Callable[[int], Any], resolution: int, first: int = 0) -> None:
        self.run_seed, self.scene_fn, self.resolution, self.first = run_seed, scene_fn, resolution, int(first)

    def __len__(self) -> int:
        return TRAIN_SEEDS_PER_RUN - self.first

    def __getitem__(self, index: int) -> Tuple[torch.Tensor, Dict[str, torch.Tensor]]:
        scene = self.scene_fn(train_scene_seed(self.run_seed, self.first + index))
        height, width = scene.image.shape[:2]
        if (height, width) != (self.resolution, self.resolution):
            # A resize here would have to replicate the package's PIL resize exactly; avoid it.
            raise ValueError(f"scene is {height}x{width}, training needs {self.resolution}x{self.resolution}")
        image = torch.from_numpy(np.ascontiguousarray(scene.image))
        return image, scene_targets(scene.masks, scene.classes, scene.boxes, height, width)


def collate(batch: Sequence[Tuple[torch.Tensor, Dict[str, torch.Tensor]]]) -> Tuple[torch.Tensor, List[Dict[str, torch.Tensor]]]:
    return torch.stack([image for image, _ in batch]), [target for _, target in batch]


def normalise_images(images: torch.Tensor, device: torch.device) -> torch.Tensor:
    """(B, H, W, 3) uint8 RGB -> (B, 3, H, W) float, the same ops as the package's pre_process
    (``to_tensor`` then ``normalize`` with the ImageNet mean/std), done on ``device``."""
    x = images.to(device, non_blocking=True).permute(0, 3, 1, 2).float().div(255)
    mean = torch.tensor(IMAGENET_MEAN, device=device).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD, device=device).view(1, 3, 1, 1)
    return x.sub(mean).div(std)


# --- training ------------------------------------------------------------------------------------


@dataclass
class TrainConfig:
    out: str
    minutes: float = 7.0
    batch: int = 32
    lr: float = 3e-4
    weight_decay: float = 1e-4
    warmup_steps: int = 100
    min_lr_ratio: float = 0.05
    clip: float = 1.0
    seed: int = 0
    device: str = "cuda"
    workers: int = 8
    groups: int = 13  # 13: the package's group-DETR train mode (13 positives per object); 1: inference queries only
    classification: str = "ia_bce"  # the criterion's classification loss: "ia_bce" (RF-DETR's) or "focal"
    log_every: int = 25
    checkpoint_minutes: float = 2.0
    save_reserve_s: float = 15.0  # stop this long before the deadline so saving fits in --minutes
    max_steps: Optional[int] = None
    init: Optional[str] = None  # a saved parameter set to continue from (its scenes are not seen again)


def learning_rate(config: TrainConfig, step: int, fraction: float) -> float:
    """Linear warmup over steps, then cosine decay over the fraction of the time budget used."""
    warmup = min(1.0, (step + 1) / max(1, config.warmup_steps))
    cosine = config.min_lr_ratio + (1 - config.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * min(1.0, fraction)))
    return config.lr * warmup * cosine


def plot_loss_curve(records: Sequence[Dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = [r["step"] for r in records]
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    if records:
        left.plot(steps, [r["loss"] for r in records], label="total (weighted)", color="black")
        for term in TERMS:
            left.plot(steps, [r[term] for r in records], label=term, alpha=0.8)
        left.set_yscale("log")
        right.plot(steps, [r["lr"] for r in records])
    left.set(xlabel="step", ylabel="loss (sum over output sets)", title="training loss")
    right.set(xlabel="step", ylabel="learning rate", title="schedule")
    left.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def write_artefacts(out: Path, network: torch.nn.Module, metadata: Dict[str, Any], log: Dict[str, Any]) -> None:
    save_trained_params(network, out / PARAMS_FILE, metadata)
    tmp = out / (LOG_FILE + ".tmp")
    tmp.write_text(json.dumps(log, indent=1) + "\n")
    os.replace(tmp, out / LOG_FILE)
    plot_loss_curve(log["records"], out / CURVE_FILE)


def train(
    config: TrainConfig,
    scene_fn: Optional[Callable[[int], Any]] = None,
    scene_class_names: Optional[Sequence[str]] = None,
) -> Dict[str, Any]:
    """Train until ``config.minutes`` (or ``max_steps``) and write the three artefacts to
    ``config.out``; they are also written every ``checkpoint_minutes`` and on errors/SIGTERM."""
    from inference_fastpath.examples.demo_network import MODEL_TYPE, RESOLUTION

    started = time.monotonic()
    deadline = started + config.minutes * 60.0 - config.save_reserve_s
    if not 0 <= config.seed < MAX_RUN_SEED:
        raise ValueError(f"--seed must be in [0, {MAX_RUN_SEED}) to keep training scenes off the evaluation seeds")
    if scene_class_names is None:
        from inference_fastpath.examples.training.synthetic_scenes import CLASS_NAMES as scene_class_names
    out = Path(config.out)
    out.mkdir(parents=True, exist_ok=True)
    device = torch.device(config.device)

    network = build_network(config.seed)
    before = {"steps": 0, "images": 0}
    if config.init:
        init = read_params_metadata(Path(config.init))
        if init.get("seed") != config.seed:
            raise ValueError(f"--init {config.init} was trained with seed {init.get('seed')}, not {config.seed}")
        apply_trained_params(network, Path(config.init))
        before = {"steps": int(init.get("steps", 0)), "images": int(init.get("images", 0))}
        LOGGER.info("continuing from %s: %d steps, %d scenes already seen", config.init, before["steps"],
                    before["images"])
    report = parameter_report(network, config.groups)
    train_set = set(trainable_names(network, config.groups))
    for name, param in network.named_parameters():
        param.requires_grad_(name in train_set)
    metadata: Dict[str, Any] = {
        "format": PARAMS_FORMAT, "model_type": MODEL_TYPE, "seed": config.seed, "steps": 0,
        "class_names": package_class_names(network, scene_class_names), "scene_class_names": list(scene_class_names),
        "modules": list(KEPT_PREFIXES), "resolution": RESOLUTION, "groups": config.groups,
        "classification": config.classification,
        "frozen_sha256": frozen_digest(network), "frozen_fingerprint": frozen_fingerprint(network), **library_versions(),
        "continued_from": before if config.init else None,
    }
    network.to(device)
    LOGGER.info("parameters: %s", json.dumps(report))
    trainable = [p for p in network.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=config.lr, weight_decay=config.weight_decay)
    criterion = SetCriterion(num_classes=network.class_embed.out_features,
                             weights=CriterionWeights(classification=config.classification))
    loader = torch.utils.data.DataLoader(
        SceneDataset(config.seed, scene_fn or RenderScene(RESOLUTION), RESOLUTION, first=before["images"]),
        batch_size=config.batch, shuffle=False, num_workers=config.workers, collate_fn=collate,
        pin_memory=device.type == "cuda", prefetch_factor=4 if config.workers > 0 else None,
    )
    records: List[Dict[str, Any]] = []
    state: Dict[str, Any] = {"step": 0, "images": 0, "skipped": 0, "stopped": "running"}
    keys = ["loss", *TERMS, *(f"final/{t}" for t in TERMS)]

    def save(final: bool) -> None:
        metadata.update(steps=before["steps"] + state["step"], images=before["images"] + state["images"], final=final)
        log = {"config": asdict(config), "parameters": report, "metadata": metadata, "summary": state, "records": records}
        write_artefacts(out, network, metadata, log)

    def flush(lr: float) -> None:
        # Loss sums stay on the device between log steps: one host sync per log line, not per term.
        if meter.get("count"):
            now = time.monotonic()
            seconds = max(1e-9, now - meter["since"])
            values = (meter["sums"] / meter["count"]).tolist()
            record: Dict[str, Any] = {"step": state["step"], "elapsed_s": round(now - started, 2), "lr": lr}
            record.update(zip(keys + ["grad_norm"], values))
            record.update(steps_per_s=meter["count"] / seconds, data_wait_frac=min(1.0, meter["wait"] / seconds),
                          eta_s=round(max(0.0, deadline - now), 1))
            records.append(record)
            LOGGER.info(" ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in record.items()))
        meter.update(sums=torch.zeros(len(keys) + 1, device=device), count=0, wait=0.0, since=time.monotonic())

    stop = {"sigterm": False}
    in_main = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGTERM, lambda *_: stop.update(sigterm=True)) if in_main else None
    meter: Dict[str, Any] = {}
    lr, last_checkpoint, loop_start = config.lr, time.monotonic(), time.monotonic()
    budget = max(1.0, deadline - loop_start)
    batches: Optional[Any] = None
    flush(lr)
    try:
        # Eval mode runs the inference query group only (train mode adds the group-DETR groups);
        # the frozen encoder stays in eval mode either way. Dropout/drop-path are 0 in this model.
        network.train(config.groups > 1)
        network.backbone[0].encoder.eval()
        fetch_start = time.monotonic()
        batches = iter(loader)
        for images, targets in batches:
            meter["wait"] += time.monotonic() - fetch_start
            now = time.monotonic()
            if now >= deadline or stop["sigterm"]:
                state["stopped"] = "SIGTERM" if stop["sigterm"] else "time budget"
                break
            if state["step"] == 0:  # the schedule starts with the first batch, after worker start-up
                loop_start, budget = now, max(1.0, deadline - now)
            fraction = (now - loop_start) / budget
            if config.max_steps:
                fraction = max(fraction, state["step"] / config.max_steps)
            lr = learning_rate(config, state["step"], fraction)
            for group in optimizer.param_groups:
                group["lr"] = lr
            x = normalise_images(images, device)
            targets = [{k: v.to(device, non_blocking=True) for k, v in t.items()} for t in targets]
            with torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
                outputs = network(x)
            losses = criterion(outputs, targets, num_groups=config.groups)
            optimizer.zero_grad(set_to_none=True)
            if not torch.isfinite(losses["loss"]):
                state["skipped"] += 1
                if state["skipped"] > 20:
                    state["stopped"] = "non-finite losses"
                    break
                fetch_start = time.monotonic()
                continue
            losses["loss"].backward()
            grad_norm = torch.nn.utils.clip_grad_norm_(trainable, config.clip)
            optimizer.step()
            state["step"] += 1
            state["images"] += len(targets)
            meter["sums"] += torch.stack([losses[k].detach().float() for k in keys] + [grad_norm.float()])
            meter["count"] += 1
            if state["step"] % config.log_every == 0 or state["step"] == 1:
                flush(lr)
            if time.monotonic() - last_checkpoint >= config.checkpoint_minutes * 60:
                save(final=False)
                last_checkpoint = time.monotonic()
            if config.max_steps and state["step"] >= config.max_steps:
                state["stopped"] = "max steps"
                break
            fetch_start = time.monotonic()
    except BaseException as error:
        state["stopped"] = f"error: {type(error).__name__}: {error}"
        raise
    finally:
        flush(lr)
        state["elapsed_s"] = round(time.monotonic() - started, 1)
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)
        save(final=True)
        batches = None  # artefacts first, then let the iterator's finaliser stop the workers
        LOGGER.info("stopped after %d steps (%s), artefacts in %s", state["step"], state["stopped"], out)
    return {"state": state, "records": records, "parameters": report, "out": str(out)}


def main(argv: Optional[Sequence[str]] = None) -> None:
    parser = argparse.ArgumentParser(description="Train the seeded RF-DETR-seg-nano demo network on synthetic scenes.")
    parser.add_argument("--out", required=True, help="output directory for the three artefacts")
    parser.add_argument("--minutes", type=float, default=7.0, help="wall-clock budget, saving included")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--lr", type=float, default=3e-4)
    parser.add_argument("--weight-decay", type=float, default=1e-4)
    parser.add_argument("--warmup-steps", type=int, default=100)
    parser.add_argument("--clip", type=float, default=1.0, help="max gradient norm")
    parser.add_argument("--seed", type=int, default=0, help="network seed, also selects the training scenes")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--workers", type=int, default=max(0, min(12, (os.cpu_count() or 2) - 2)))
    parser.add_argument("--groups", type=int, choices=(1, 13), default=13,
                        help="13 = group-DETR train mode (as RF-DETR trains), 1 = inference queries only")
    parser.add_argument("--classification", choices=("ia_bce", "focal"), default="ia_bce",
                        help="classification loss: RF-DETR's IoU-aware BCE or the sigmoid focal loss")
    parser.add_argument("--log-every", type=int, default=25)
    parser.add_argument("--checkpoint-minutes", type=float, default=2.0)
    parser.add_argument("--max-steps", type=int, default=None)
    parser.add_argument("--init", default=None, help="continue from this trained_params.safetensors (same seed)")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.device.startswith("cuda"):
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    config = TrainConfig(**{f.name: getattr(args, f.name) for f in fields(TrainConfig) if hasattr(args, f.name)})
    result = train(config)
    print(json.dumps({"out": result["out"], **result["state"], "parameters": result["parameters"]}, indent=1), flush=True)
    # A GPU run with 14 workers once sat past its wall limit after writing everything; exiting
    # here skips interpreter teardown (worker and pin-memory threads), nothing is left unsaved.
    sys.stderr.flush()
    os._exit(0)


if __name__ == "__main__":
    main()
