"""Training and evaluation code for the demo RF-DETR-seg network (CPU, small and fast)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from inference_fastpath.examples.training import evaluate_demo_model as ev
from inference_fastpath.examples.trained_demo import write_trained_package
from inference_fastpath.examples.training import train_demo_model as tr
from inference_fastpath.examples.training import trained_params as tp
from inference_fastpath.examples.training.set_criterion import SetCriterion, downsample_masks, match_outputs
from inference_fastpath.examples.training.synthetic_scenes import CLASS_NAMES, SceneConfig, render_scene

SEED = 0


# ---------------------------------------------------------------------------------------------
# criterion


def _perfect_outputs(targets, queries=10, channels=7, slots=None, size=16):
    """Outputs whose query ``slots[i]`` reproduces target i exactly; other queries are background."""
    batch = len(targets)
    logits = torch.full((batch, queries, channels), -12.0)
    boxes = torch.tensor([0.5, 0.5, 0.05, 0.05]).repeat(batch, queries, 1)
    masks = torch.full((batch, queries, size, size), -12.0)
    for b, target in enumerate(targets):
        for i, slot in enumerate(slots[b] if slots else range(len(target["labels"]))):
            logits[b, slot, target["labels"][i]] = 12.0
            boxes[b, slot] = target["boxes"][i]
            masks[b, slot] = torch.where(downsample_masks(target["masks"][i : i + 1], (size, size))[0] > 0.5, 12.0, -12.0)
    return {"pred_logits": logits.requires_grad_(), "pred_boxes": boxes.requires_grad_(), "pred_masks": masks.requires_grad_()}


def _targets(count, size=32, seed=1):
    """``count`` disjoint blocky objects whose masks are exact at half resolution."""
    rng = np.random.default_rng(seed)
    masks = torch.zeros(count, size, size, dtype=torch.bool)
    boxes = []
    for i in range(count):
        x0, y0 = 2 * i * 4 % (size - 8), 2 * (i * 6 % (size - 8) // 2)
        w, h = 2 * int(rng.integers(1, 3)), 2 * int(rng.integers(1, 3))
        masks[i, y0 : y0 + h, x0 : x0 + w] = True
        boxes.append([(x0 + w / 2) / size, (y0 + h / 2) / size, w / size, h / size])
    return {"labels": torch.tensor(rng.integers(0, 6, count)), "boxes": torch.tensor(boxes).float().reshape(-1, 4), "masks": masks}


def test_perfect_predictions_give_identity_match_and_near_zero_losses():
    targets = [_targets(3)]
    outputs = _perfect_outputs(targets)
    (queries, gts), = match_outputs(outputs, targets_at(targets, 16))
    assert queries.tolist() == [0, 1, 2] and gts.tolist() == [0, 1, 2]
    losses = SetCriterion(num_classes=7)(outputs, targets)
    for term in ("bbox", "giou", "mask_bce", "mask_dice"):
        assert losses[term] < 1e-3, (term, losses[term])
    assert losses["cls"] < 1e-3


def targets_at(targets, size):
    return [{**t, "masks": downsample_masks(t["masks"], (size, size)).flatten(1)} for t in targets]


def test_permuted_queries_are_still_matched_and_grouped_queries_per_group():
    targets = [_targets(3), _targets(2, seed=2)]
    slots = [[7, 2, 5], [9, 0]]
    outputs = _perfect_outputs(targets, slots=slots)
    matches = match_outputs(outputs, targets_at(targets, 16))
    for (queries, gts), expected in zip(matches, slots):
        assert dict(zip(gts.tolist(), queries.tolist())) == dict(enumerate(expected))
    assert SetCriterion(num_classes=7)(outputs, targets)["final/bbox"] < 1e-4

    # Two groups of 10 queries: the perfect copy of each target sits at a different slot per group.
    first = _perfect_outputs(targets, slots=slots)
    second = _perfect_outputs(targets, slots=[[1, 3, 8], [4, 6]])
    grouped = {k: torch.cat([first[k], second[k]], dim=1).detach() for k in first}
    matches = match_outputs(grouped, targets_at(targets, 16), num_groups=2)
    queries, gts = matches[0]
    pairs = sorted(zip(gts.tolist(), queries.tolist()))
    assert pairs == [(0, 7), (0, 11), (1, 2), (1, 13), (2, 5), (2, 18)]
    losses = SetCriterion(num_classes=7)(grouped, targets, num_groups=2)
    assert losses["bbox"] < 1e-4 and losses["mask_dice"] < 1e-3


def test_wrong_predictions_cost_more_and_empty_targets_work():
    targets = [_targets(3)]
    good = SetCriterion(num_classes=7)(_perfect_outputs(targets), targets)
    bad_outputs = _perfect_outputs(targets)
    bad_outputs["pred_boxes"] = (bad_outputs["pred_boxes"].detach() + 0.1).requires_grad_()
    bad = SetCriterion(num_classes=7)(bad_outputs, targets)
    assert bad["bbox"] > good["bbox"] + 0.1 and bad["giou"] > good["giou"]

    empty = [{"labels": torch.zeros(0, dtype=torch.int64), "boxes": torch.zeros(0, 4), "masks": torch.zeros(0, 32, 32, dtype=torch.bool)}]
    outputs = _perfect_outputs(targets)  # confident detections where there is nothing
    outputs["aux_outputs"] = [{k: v * 1.0 for k, v in outputs.items()}]
    losses = SetCriterion(num_classes=7)(outputs, empty)
    assert torch.isfinite(losses["loss"]) and losses["cls"] > 1.0
    assert losses["bbox"] == 0 and losses["mask_bce"] == 0
    losses["loss"].backward()
    assert outputs["pred_logits"].grad is not None and outputs["pred_logits"].grad.abs().sum() > 0


# ---------------------------------------------------------------------------------------------
# training: a tiny overfit run of the real network


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory):
    scenes = [render_scene(np.random.default_rng(s), SceneConfig()) for s in (3, 4)]
    out = tmp_path_factory.mktemp("train")
    config = tr.TrainConfig(out=str(out), minutes=5, batch=2, lr=3e-4, warmup_steps=0, seed=SEED, device="cpu",
                            workers=0, log_every=1, max_steps=4, save_reserve_s=0)
    result = tr.train(config, scene_fn=lambda seed: scenes[seed % 2], scene_class_names=CLASS_NAMES)
    return out, result


def test_training_reduces_loss_and_writes_artefacts(trained_run):
    out, result = trained_run
    losses = [r["loss"] for r in result["records"] if r["step"] <= 4]
    assert result["state"]["step"] == 4 and result["state"]["stopped"] == "max steps"
    assert losses[-1] < losses[0], losses
    for name in (tp.PARAMS_FILE, tr.LOG_FILE, tr.CURVE_FILE):
        assert (out / name).stat().st_size > 0, name
    log = json.loads((out / tr.LOG_FILE).read_text())
    assert log["records"][0]["step"] == 1 and {"cls", "bbox", "mask_dice", "lr", "steps_per_s"} <= set(log["records"][0])
    report = result["parameters"]
    # groups=13 also trains the extra query groups' proposal heads, which inference never runs
    # and so are not kept.
    assert result["state"]["step"] == 4 and log["metadata"]["groups"] == 13
    assert report["kept"] < 10_000_000 and 0 < report["trained"] - report["kept"] < report["kept"]
    assert (out / tp.PARAMS_FILE).stat().st_size < 20e6
    meta = tp.read_params_metadata(out / tp.PARAMS_FILE)
    assert meta["seed"] == SEED and meta["steps"] == 4 and meta["class_names"][: len(CLASS_NAMES)] == list(CLASS_NAMES)


@pytest.fixture(scope="module")
def fresh_network():
    return tr.build_network(SEED)


def test_apply_trained_params_round_trips(trained_run, fresh_network):
    from safetensors.torch import load_file

    path = trained_run[0] / tp.PARAMS_FILE
    files = tp.params_files(path)
    assert len(files) == 2 and all(f.stat().st_size < 16 * 2**20 for f in files)  # each comes back from the GPU host
    saved = {}
    for shard in files:
        saved.update(load_file(str(shard)))
    assert all(t.dtype == torch.float16 for t in saved.values())
    network = tr.build_network(SEED)
    before = {n: p.detach().clone() for n, p in network.named_parameters()}
    tp.apply_trained_params(network, path)
    params = dict(network.named_parameters())
    assert set(saved) == set(tp.kept_names(network))
    for name, tensor in saved.items():
        assert torch.equal(params[name].detach(), tensor.float()), name
    assert not torch.equal(params["class_embed.weight"], before["class_embed.weight"])  # training moved it
    encoder = "backbone.0.encoder.encoder.embeddings.patch_embeddings.projection.weight"
    assert torch.equal(params[encoder], before[encoder])


def _rewrite(path: Path, target: Path, edit) -> Path:
    """The parameter set as one edited file (no shards)."""
    from safetensors.torch import save_file

    metadata, tensors = tp.load_trained_tensors(path)
    edit(tensors)
    metadata.pop("shards")
    save_file(tensors, str(target), metadata={k: json.dumps(v) for k, v in metadata.items()})
    return target


def test_shards_missing_or_from_another_run_are_refused(trained_run, fresh_network, tmp_path):
    import shutil

    first, second = tp.params_files(trained_run[0] / tp.PARAMS_FILE)
    copy = tmp_path / "set"
    copy.mkdir()
    shutil.copy(first, copy / first.name)
    with pytest.raises(tp.TrainedParamsError, match=f"shard {second.name} .* is missing"):
        tp.apply_trained_params(fresh_network, copy / first.name)
    (tmp_path / "other").mkdir()
    other = tp.save_trained_params(tr.build_network(SEED), tmp_path / "other" / first.name, {"seed": SEED, "steps": 0})
    shutil.copy(other[1], copy / second.name)
    with pytest.raises(tp.TrainedParamsError, match="belongs to another run"):
        tp.apply_trained_params(fresh_network, copy / first.name)


def test_apply_trained_params_names_bad_tensors(trained_run, fresh_network, tmp_path):
    path = trained_run[0] / tp.PARAMS_FILE
    missing = _rewrite(path, tmp_path / "missing.safetensors", lambda t: t.pop("segmentation_head.bias"))
    with pytest.raises(tp.TrainedParamsError, match="segmentation_head.bias"):
        tp.apply_trained_params(fresh_network, missing)

    def reshape(t):
        t["bbox_embed.layers.2.weight"] = t["bbox_embed.layers.2.weight"][:2]

    with pytest.raises(tp.TrainedParamsError, match=r"bbox_embed\.layers\.2\.weight.*\(2, 256\)"):
        tp.apply_trained_params(fresh_network, _rewrite(path, tmp_path / "shape.safetensors", reshape))
    with pytest.raises(tp.TrainedParamsError, match="no_such.weight"):
        tp.apply_trained_params(fresh_network, _rewrite(path, tmp_path / "extra.safetensors",
                                                        lambda t: t.update({"no_such.weight": torch.zeros(2)})))
    frozen = "backbone.0.encoder.encoder.embeddings.patch_embeddings.projection.weight"
    with pytest.raises(tp.TrainedParamsError, match="frozen module"):
        tp.apply_trained_params(fresh_network, _rewrite(path, tmp_path / "frozen.safetensors",
                                                        lambda t: t.update({frozen: torch.zeros(384, 3, 12, 12)})))
    # A network whose seeded (frozen) part differs must be refused; rounding-level drift is not.
    param = dict(fresh_network.named_parameters())[frozen]
    original = param.detach().clone()
    with torch.no_grad():
        try:
            param[0, 0, 0, 0] += 0.01
            with pytest.raises(tp.TrainedParamsError, match=r"patch_embeddings.*seeded initialisation"):
                tp.apply_trained_params(fresh_network, path)
            param.copy_(original * (1 + 1e-6))
            assert tp.frozen_digest(fresh_network) != tp.read_params_metadata(path)["frozen_sha256"]
            tp.apply_trained_params(fresh_network, path)  # accepted, with a warning
        finally:
            param.copy_(original)


def test_training_input_normalisation_matches_package_pre_process(tmp_path):
    from inference_fastpath.examples.demo_network import _INFERENCE_CONFIG
    from inference_models.models.common.roboflow.model_packages import ResizeMode, parse_inference_config
    from inference_models.models.rfdetr.pre_processing import pre_process_network_input

    (tmp_path / "inference_config.json").write_text(json.dumps(_INFERENCE_CONFIG))
    config = parse_inference_config(str(tmp_path / "inference_config.json"), allowed_resize_modes={ResizeMode.STRETCH_TO})
    image = render_scene(np.random.default_rng(5)).image
    reference, _ = pre_process_network_input(images=[image], image_pre_processing=config.image_pre_processing,
                                             network_input=config.network_input, target_device=torch.device("cpu"),
                                             input_color_format="rgb")
    ours = tr.normalise_images(torch.from_numpy(image)[None], torch.device("cpu"))
    assert torch.equal(ours, reference)


# ---------------------------------------------------------------------------------------------
# evaluation


def test_mask_iou_matching_on_hand_made_masks():
    gt = np.zeros((3, 20, 20), bool)
    gt[0, 0:10, 0:10] = True  # 100 px
    gt[1, 10:20, 10:20] = True  # 100 px
    gt[2, 0:4, 16:20] = True  # 16 px
    pred = np.zeros((4, 20, 20), bool)
    pred[0, 10:20, 10:18] = True  # inside gt1: IoU 80/100
    pred[1, 0:10, 0:5] = True  # inside gt0: IoU 50/100 -> exactly the threshold, counts
    pred[2, 0:10, 0:4] = True  # inside gt0: IoU 0.4, loses to pred 1
    pred[3, 0:4, 18:20] = True  # inside gt2: IoU 8/16 = 0.5
    iou = ev.mask_iou_matrix(pred, gt)
    assert iou[0, 1] == pytest.approx(0.8) and iou[2, 0] == pytest.approx(0.4) and iou[0, 0] == 0
    assert ev.match_by_mask_iou(pred, gt) == [(1, 0, 0.5), (0, 1, 0.8), (3, 2, 0.5)]
    pred[3, 0:4, 18] = False  # IoU 4/16: below the threshold, gt2 stays unmatched
    assert [(p, g) for p, g, _ in ev.match_by_mask_iou(pred, gt)] == [(1, 0), (0, 1)]
    assert ev.match_by_mask_iou(pred[:0], gt) == [] and ev.match_by_mask_iou(pred, gt[:0]) == []

    tally = ev.Tally(["a", "b", "c"])
    tally.add(pred, np.array([1, 2, 0, 2]), gt, np.array([0, 1, 2]))  # pair (1, 0): class 2 != 0
    summary = tally.summary()
    assert summary["matched"] == 2 and summary["recall"] == pytest.approx(1 / 3)
    assert summary["precision"] == pytest.approx(1 / 4) and summary["mean_matched_iou"] == pytest.approx(0.65)
    assert summary["per_class"]["b"]["recall"] == 1.0 and summary["per_class"]["a"]["recall"] == 0.0
    assert summary["detections_per_frame"] == 4


def test_coco_ap_is_one_for_exact_predictions():
    gt = np.zeros((2, 20, 20), bool)
    gt[0, 0:10, 0:10] = True
    gt[1, 12:20, 12:20] = True
    coco = ev.coco_mask_ap([(gt, np.array([0, 1]))], [(gt, np.array([0, 1]), np.array([0.9, 0.8]))], num_classes=2)
    if coco is None:
        pytest.skip("pycocotools missing")
    assert coco["AP50"] == pytest.approx(1.0)
    wrong = ev.coco_mask_ap([(gt, np.array([0, 1]))], [(gt, np.array([1, 0]), np.array([0.9, 0.8]))], num_classes=2)
    assert wrong["AP50"] == pytest.approx(0.0)


def test_evaluate_package_built_from_params(trained_run, tmp_path):
    package = write_trained_package(trained_run[0] / tp.PARAMS_FILE, tmp_path / "package")
    model = ev.load_package(package, torch.device("cpu"))
    saved = tr.build_network(SEED)
    tp.apply_trained_params(saved, trained_run[0] / tp.PARAMS_FILE)
    for name, value in saved.state_dict().items():
        assert torch.equal(model._model.state_dict()[name], value), name
    result = ev.evaluate_package(model, CLASS_NAMES, scenes=2, batch=2, confidence=0.0)
    assert result["frames"] == 2 and result["detections_per_frame"] > 0
    assert result["scene_seeds"][0] == tr.EVAL_SEED_BASE > tr.train_scene_seed(tr.MAX_RUN_SEED - 1, 10**8)
    assert "overall" in ev.format_table(result)


def test_training_continues_from_a_saved_set(trained_run, tmp_path):
    """--init: a later call (or session) continues the same run on scenes not seen yet."""
    seen = []

    def scene_fn(seed):
        seen.append(seed)
        return render_scene(np.random.default_rng(seed % 7), SceneConfig())

    config = tr.TrainConfig(out=str(tmp_path), minutes=5, batch=2, lr=1e-4, warmup_steps=0, seed=SEED, device="cpu",
                            workers=0, log_every=1, max_steps=1, save_reserve_s=0,
                            init=str(trained_run[0] / tp.PARAMS_FILE))
    tr.train(config, scene_fn=scene_fn, scene_class_names=CLASS_NAMES)
    meta = tp.read_params_metadata(tmp_path / tp.PARAMS_FILE)
    assert meta["steps"] == 5 and meta["images"] == 10 and meta["continued_from"] == {"steps": 4, "images": 8}
    assert min(seen) == tr.train_scene_seed(SEED, 8)  # the first run saw scenes 0..7
    with pytest.raises(ValueError, match="trained with seed"):
        tr.train(tr.TrainConfig(out=str(tmp_path / "x"), seed=SEED + 1, device="cpu", workers=0, max_steps=1,
                                init=str(trained_run[0] / tp.PARAMS_FILE)), scene_fn=scene_fn)


def test_clip_frames_pair_the_shapes_clip_with_its_ground_truth():
    from inference_fastpath.examples.demo_model import default_clip_path

    frames = ev.clip_frames(default_clip_path().with_name("shapes_clip.mp4"))
    assert len(frames) == 120 and frames[0].image.shape == (576, 768, 3)
    assert all(f.masks.shape[1:] == (576, 768) and len(f.masks) == len(f.classes) for f in frames)
    # the masks sit on the decoded objects: the pixels under the top mask differ from the background
    first = frames[0]
    inside = first.image[first.masks[-1]].mean(axis=0)
    outside = first.image[~first.masks.any(axis=0)].mean(axis=0)
    assert np.abs(inside - outside).max() > 1.0


def test_matching_never_trades_a_valid_pair_for_two_below_the_threshold(monkeypatch):
    iou = np.array([[0.55, 0.44], [0.49, 0.0]])
    monkeypatch.setattr(ev, "mask_iou_matrix", lambda pred, gt: iou)
    # raw-IoU assignment would pick (0,1),(1,0) (total 0.93), both under 0.5: no match at all
    assert ev.match_by_mask_iou(np.zeros((2, 1, 1)), np.zeros((2, 1, 1))) == [(0, 0, 0.55)]


def test_a_query_reported_for_two_classes_matches_with_the_right_one():
    gt = np.zeros((1, 8, 8), bool)
    gt[0, 2:6, 2:6] = True
    tally = ev.Tally(CLASS_NAMES)
    tally.add(np.stack([gt[0], gt[0]]), np.array([3, 1]), gt, np.array([1]))  # same mask: wrong class first
    assert tally.class_correct == 1 and tally.matched == 1


def test_iou_aware_bce_is_bce_towards_the_quality_target_and_focal_weighted_negatives():
    from inference_fastpath.examples.training.set_criterion import iou_aware_bce

    torch.manual_seed(0)
    logits = torch.randn(2, 5, 4, dtype=torch.float64)
    positives = (torch.tensor([0, 1]), torch.tensor([3, 0]), torch.tensor([2, 1]))
    quality = torch.tensor([0.9, 0.2], dtype=torch.float64)
    loss = iou_aware_bce(logits, positives, quality, alpha=0.25, gamma=2.0)
    prob = logits.sigmoid()
    # Reference: torch's BCE with the soft target p**0.25 * IoU**0.75 at positives, and
    # p**2-weighted BCE towards 0 everywhere else.
    expected = prob**2 * torch.nn.functional.binary_cross_entropy_with_logits(logits, torch.zeros_like(logits), reduction="none")
    for i, q in enumerate(quality):
        b, n, c = (int(t[i]) for t in positives)
        target = (prob[b, n, c] ** 0.25 * q**0.75).clamp(min=0.01)
        expected[b, n, c] = torch.nn.functional.binary_cross_entropy_with_logits(logits[b, n, c], target)
    torch.testing.assert_close(loss, expected)
    # The gradient at a positive points up while its score is below its target, and the
    # target rises with the match's IoU.
    grad_logits = logits.clone().requires_grad_()
    iou_aware_bce(grad_logits, positives, quality, 0.25, 2.0).sum().backward()
    b, n, c = 0, 3, 2
    below = bool(prob[b, n, c] < (prob[b, n, c] ** 0.25 * 0.9**0.75))
    assert (grad_logits.grad[b, n, c] < 0) == below


def test_focal_and_iou_aware_criteria_both_reach_near_zero_on_perfect_predictions():
    from inference_fastpath.examples.training.set_criterion import CriterionWeights

    targets = [_targets(3)]
    for kind in ("ia_bce", "focal"):
        losses = SetCriterion(num_classes=7, weights=CriterionWeights(classification=kind))(_perfect_outputs(targets), targets)
        assert losses["cls"] < 1e-3, kind
    with pytest.raises(ValueError, match="classification"):
        CriterionWeights(classification="softmax")


def test_confidence_sweep_matches_filtering_and_counts_more_detections_at_lower_confidence():
    mask = np.zeros((1, 8, 8), bool)
    mask[0, 2:6, 2:6] = True
    gts = [(mask, np.array([1]))]
    dets = [(np.concatenate([mask, mask]), np.array([1, 2]), np.array([0.35, 0.8]))]
    rows = {row["confidence"]: row for row in ev.confidence_sweep(["a", "b", "c"], gts, dets, (0.3, 0.5))}
    assert rows[0.3]["recall"] == 1.0 and rows[0.3]["detections_per_frame"] == 2
    assert rows[0.5]["recall"] == 0.0 and rows[0.5]["recall_any_class"] == 1.0
