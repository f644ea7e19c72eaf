"""Torch engine for inference-models' ``RFDetrForInstanceSegmentationTorch`` (fp32, fp16, bf16).

The engine runs a private, *prepared* copy of the model's ``LWDETR`` network. Preparing it
(:func:`prepare_capture_safe_module`) does three things and patches nothing on disk or at module
level (every change is an instance attribute of the copy):

1. ``export()`` on the copy, as inference-models' own ``optimize_for_inference`` does: forward then
   takes a plain tensor and returns ``(boxes, logits, masks)`` of the last decoder layer, the
   backbone emits all-false padding masks without reading the input, and DINOv2's position
   embeddings are interpolated to the training size once. On CPU this is bitwise equal to the
   model's non-export ``forward`` (checked in tests/test_engine_torch.py).
2. The copy's ``Transformer.forward`` is replaced by :func:`_capture_safe_transformer_forward`, the
   same inference computation (two-stage proposals, top-k query selection, decoder) with three
   capture breakers of the original removed:

   * ``torch.as_tensor(spatial_shapes, device=...)`` - a host-to-device copy of the per-level
     feature sizes (pageable memcpy + stream sync) on every call. Ours keeps the sizes as Python
     ints read from the feature maps' shapes; nothing else needs them on the device (the pure
     PyTorch deformable attention only uses them for ``split``/``view``; ``level_start_index``,
     their only other device consumer, is ignored by it, so we pass ``None``).
   * ``gen_encoder_output_proposals``: ``torch.tensor([H_ for _ in range(N)], device=...)`` builds
     the valid sizes from 0-d *device* tensors (a device-to-host read per element, then a
     host-to-device copy), and ``torch.linspace(0, H_ - 1, H_)`` needs ``H_`` on the host (an
     implicit ``.item()``). The proposals and the valid-cell mask depend only on the spatial
     shapes (no padding mask in export mode), so we compute them once per (shapes, dtype, device)
     with the *original* function - identical numbers - and cache them on the copy; inside the
     graph only ``masked_fill`` of the memory and an ``expand`` to the batch remain. The cache is
     filled by the warm-up forward that precedes every capture; a miss during capture raises
     (and the engine falls back to eager with that reason) instead of breaking the capture.
3. Each ``MSDeformAttn.forward`` is replaced by :func:`_capture_safe_msdeform_forward`:

   * ``assert (spatial_shapes[:, 0] * spatial_shapes[:, 1]).sum() == Len_in`` evaluates a device
     tensor as a Python bool (``.item()``: device-to-host sync) - ours checks the Python ints.
   * ``ms_deform_attn_core_pytorch`` iterates the device ``spatial_shapes`` for ``value.split([...])``
     and ``.view(..., H, W)``, turning 0-d device tensors into ints (one sync each) - ours hands it
     the Python-int shapes, so the very same upstream function runs sync-free.

There are no data-dependent output shapes in this path (top-k is over a fixed ``num_queries``) and
no other host transfers: backbone masks and position embeddings are built on the device from Python
ints. Static input buffers have the compute dtype (fp16 under ``precision="fp16"``), so a
preprocess producing that dtype writes straight into them; an fp32 batch is cast while it is copied
in, which is the same rounding as casting inside the network. Outputs are always float32.
"""

from __future__ import annotations

import copy
import logging
import types
from typing import Any, Dict, Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F
from torch import nn

from inference_fastpath.adapters.engine.base import GRAPH_CACHE_SIZE, EngineBase, OutputTriple, model_input_hw
from inference_fastpath.adapters.contracts import PreprocessedBatch

LOGGER = logging.getLogger(__name__)

PRECISIONS: Dict[str, torch.dtype] = {
    "fp32": torch.float32,
    "fp16": torch.float16,
    "bf16": torch.bfloat16,
}

_GEOMETRY_ATTR = "_fastpath_proposal_geometry"


def prepare_capture_safe_module(network: nn.Module, dtype: torch.dtype = torch.float32) -> nn.Module:
    """A private, export-mode, CUDA-graph-safe copy of an RF-DETR ``LWDETR`` network in ``dtype``."""
    from inference_models.models.rfdetr.ms_deform_attn import MSDeformAttn

    if not hasattr(network, "transformer") or not hasattr(network, "export"):
        raise TypeError(f"expected an RF-DETR LWDETR network, got {type(network).__name__}")
    prepared = copy.deepcopy(network)
    prepared.eval()
    prepared.export()
    transformer = prepared.transformer
    setattr(transformer, _GEOMETRY_ATTR, {})
    transformer.forward = types.MethodType(_capture_safe_transformer_forward, transformer)
    for module in prepared.modules():
        if isinstance(module, MSDeformAttn):
            module.forward = types.MethodType(_capture_safe_msdeform_forward, module)
    prepared.to(dtype=dtype)
    # Parameters keep requires_grad: the engine runs under no_grad anyway, and turning it off
    # switches nn.MultiheadAttention to another kernel path (not bitwise equal to model.forward).
    return prepared


def _proposal_geometry(
    transformer: nn.Module, shapes: Tuple[Tuple[int, int], ...], memory: torch.Tensor
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Cached ``(proposals (1,S,4), invalid (1,S,1) bool)`` of the two-stage encoder output."""
    from inference_models.models.rfdetr.transformer import gen_encoder_output_proposals

    unsigmoid = not transformer.bbox_reparam
    key = (shapes, memory.dtype, memory.device, unsigmoid)
    cache = getattr(transformer, _GEOMETRY_ATTR)
    hit = cache.get(key)
    if hit is None:
        if memory.is_cuda and torch.cuda.is_current_stream_capturing():
            raise RuntimeError(
                f"RF-DETR proposal geometry for feature shapes {shapes} is not cached yet; it needs "
                "host-to-device copies, so a warm-up forward must run before CUDA graph capture"
            )
        total = sum(h * w for h, w in shapes)
        # The original function, fed a memory of ones: its zeroed rows are exactly the invalid cells.
        ones = torch.ones((1, total, 1), dtype=memory.dtype, device=memory.device)
        shapes_t = torch.as_tensor(shapes, dtype=torch.long, device=memory.device)
        masked_ones, proposals = gen_encoder_output_proposals(ones, None, shapes_t, unsigmoid=unsigmoid)
        hit = (proposals, masked_ones == 0)
        cache[key] = hit
    return hit


def _capture_safe_transformer_forward(self, srcs, masks, pos_embeds, refpoint_embed, query_feat):
    """Inference-only twin of ``Transformer.forward`` (export mode, one query group), sync-free."""
    if masks is not None or self.training:
        return type(self).forward(self, srcs, masks, pos_embeds, refpoint_embed, query_feat)
    shapes = tuple((int(s.shape[2]), int(s.shape[3])) for s in srcs)
    bs = srcs[-1].shape[0]
    memory = torch.cat([s.flatten(2).transpose(1, 2) for s in srcs], 1)
    pos = torch.cat([p.flatten(2).transpose(1, 2) for p in pos_embeds], 1)

    memory_ts = boxes_ts = refpoint_ts = None
    if self.two_stage:
        proposals, invalid = _proposal_geometry(self, shapes, memory)
        output_memory = memory.masked_fill(invalid, float(0))
        output_proposals = proposals.expand(bs, -1, -1)
        enc_memory = self.enc_output_norm[0](self.enc_output[0](output_memory))
        enc_class = self.enc_out_class_embed[0](enc_memory)
        if self.bbox_reparam:
            delta = self.enc_out_bbox_embed[0](enc_memory)
            cxcy = delta[..., :2] * output_proposals[..., 2:] + output_proposals[..., :2]
            wh = delta[..., 2:].exp() * output_proposals[..., 2:]
            enc_coord = torch.concat([cxcy, wh], dim=-1)
        else:
            enc_coord = self.enc_out_bbox_embed[0](enc_memory) + output_proposals
        k = min(self.num_queries, enc_class.shape[-2])
        top = torch.topk(enc_class.max(-1)[0], k, dim=1)[1]
        boxes_ts = torch.gather(enc_coord, 1, top.unsqueeze(-1).repeat(1, 1, 4))
        refpoint_ts = boxes_ts.detach()
        memory_ts = torch.gather(enc_memory, 1, top.unsqueeze(-1).repeat(1, 1, self.d_model))

    if self.dec_layers > 0:
        tgt = query_feat.unsqueeze(0).repeat(bs, 1, 1)
        refpoints = refpoint_embed.unsqueeze(0).repeat(bs, 1, 1)
        if self.two_stage:
            n_ts = refpoint_ts.shape[-2]
            head, tail = refpoints[..., :n_ts, :], refpoints[..., n_ts:, :]
            if self.bbox_reparam:
                cxcy = head[..., :2] * refpoint_ts[..., 2:]
                cxcy = cxcy + refpoint_ts[..., :2]
                wh = head[..., 2:].exp() * refpoint_ts[..., 2:]
                head = torch.concat([cxcy, wh], dim=-1)
            else:
                head = head + refpoint_ts
            refpoints = torch.concat([head, tail], dim=-2)
        hs, references = self.decoder(
            tgt,
            memory,
            memory_key_padding_mask=None,
            pos=pos,
            refpoints_unsigmoid=refpoints,
            level_start_index=None,  # unused by the PyTorch deformable attention
            spatial_shapes=shapes,  # Python ints, read by _capture_safe_msdeform_forward
            valid_ratios=None,
        )
    else:
        hs = references = None

    if self.two_stage:
        return hs, references, memory_ts, (boxes_ts if self.bbox_reparam else boxes_ts.sigmoid())
    return hs, references, None, None


def _capture_safe_msdeform_forward(
    self,
    query,
    reference_points,
    input_flatten,
    input_spatial_shapes,
    input_level_start_index,
    input_padding_mask=None,
):
    """``MSDeformAttn.forward`` taking the spatial shapes as Python ints (no device reads)."""
    from inference_models.models.rfdetr.ms_deform_attn_func import ms_deform_attn_core_pytorch

    if isinstance(input_spatial_shapes, torch.Tensor) or reference_points.shape[-1] != 4:
        # Not our prepared path (a tensor of shapes, or point references): the original forward.
        shapes_t = torch.as_tensor(input_spatial_shapes, dtype=torch.long, device=query.device)
        return type(self).forward(
            self, query, reference_points, input_flatten, shapes_t, input_level_start_index, input_padding_mask
        )
    n, len_q, _ = query.shape
    _, len_in, _ = input_flatten.shape
    if sum(h * w for h, w in input_spatial_shapes) != len_in:
        raise ValueError(f"spatial shapes {input_spatial_shapes} do not cover {len_in} tokens")
    value = self.value_proj(input_flatten)
    if input_padding_mask is not None:
        value = value.masked_fill(input_padding_mask[..., None], float(0))
    offsets = self.sampling_offsets(query).view(n, len_q, self.n_heads, self.n_levels, self.n_points, 2)
    weights = self.attention_weights(query).view(n, len_q, self.n_heads, self.n_levels * self.n_points)
    locations = (
        reference_points[:, :, None, :, None, :2]
        + offsets / self.n_points * reference_points[:, :, None, :, None, 2:] * 0.5
    )
    weights = F.softmax(weights, -1)
    value = value.transpose(1, 2).contiguous().view(n, self.n_heads, self.d_model // self.n_heads, len_in)
    output = ms_deform_attn_core_pytorch(value, list(input_spatial_shapes), locations, weights)
    return self.output_proj(output)


def _unwrap_model(model: Any) -> Tuple[nn.Module, torch.device, Optional[Tuple[int, int]]]:
    """(LWDETR network, its device, network input size) from a model wrapper or a bare network."""
    if isinstance(model, nn.Module):
        device = next(model.parameters()).device
        hw = None
        shape = getattr(getattr(model, "backbone", [None])[0], "encoder", None)
        shape = getattr(shape, "shape", None)
        if shape is not None:
            hw = (int(shape[0]), int(shape[1]))
        return model, device, hw
    network = getattr(model, "_model", None)
    if not isinstance(network, nn.Module):
        raise TypeError(f"{type(model).__name__} does not hold an RF-DETR torch network (`_model`)")
    device = getattr(model, "_device", None) or next(network.parameters()).device
    return network, torch.device(device), model_input_hw(model)


class TorchEngine(EngineBase):
    """RF-DETR segmentation on a prepared torch copy of the model; CUDA graphs when on a GPU."""

    name = "torch"
    supports_cuda_graphs = True

    def __init__(
        self,
        model: Any,
        *,
        precision: str = "fp32",
        cuda_graphs: bool = True,
        device: Optional[torch.device] = None,
        input_hw: Optional[Tuple[int, int]] = None,
        graph_cache_size: int = GRAPH_CACHE_SIZE,
        max_inflight: int = 2,
        warmup_iters: int = 2,
        output_mode: str = "borrow",
    ) -> None:
        if precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {list(PRECISIONS)}, got {precision!r}")
        network, model_device, model_hw = _unwrap_model(model)
        device = torch.device(device) if device is not None else model_device
        hw = input_hw or model_hw
        if hw is None:
            raise ValueError("input_hw is required when the network does not say its input size")
        self.precision = precision
        self.compute_dtype = PRECISIONS[precision]
        self._module = prepare_capture_safe_module(network, self.compute_dtype).to(device)
        super().__init__(
            device=device,
            input_hw=hw,
            input_dtype=self.compute_dtype,
            cuda_graphs=cuda_graphs,
            graph_cache_size=graph_cache_size,
            max_inflight=max_inflight,
            warmup_iters=warmup_iters,
            output_mode=output_mode,
        )

    @property
    def module(self) -> nn.Module:
        """The prepared network (export mode, capture-safe)."""
        return self._module

    def _forward(self, x: torch.Tensor) -> OutputTriple:
        with torch.no_grad():
            outputs = self._module(x if x.dtype == self.compute_dtype else x.to(self.compute_dtype))
        if len(outputs) != 3:
            raise RuntimeError("the RF-DETR network has no segmentation head (expected 3 outputs)")
        return tuple(o if o.dtype == torch.float32 else o.float() for o in outputs)  # type: ignore[return-value]

    def warmup(self, batch_sizes: Sequence[int] = (1,)) -> None:
        """Runs (and, with graphs, captures) each batch size once, so no frame pays for it."""
        for n in batch_sizes:
            buffer = self.input_buffer(n)
            raw = self(PreprocessedBatch(tensor=buffer, metadata=[]))
            if raw.release is not None:
                raw.release(None)


def build_random_model(
    model_type: str = "rfdetr-seg-nano",
    *,
    device: Union[str, torch.device] = "cpu",
    seed: int = 0,
) -> Any:
    """An ``RFDetrForInstanceSegmentationTorch`` with random weights, built offline.

    For tests and benchmarks (timings do not depend on the weights). Mirrors what inference-models'
    ``from_checkpoint_file`` assembles: the architecture config for ``model_type``, a stretch-resize
    inference config at the config's resolution and one class name per class-head output.
    """
    from inference_models.models.common.roboflow.model_packages import (
        ColorMode,
        DivisiblePadding,
        InferenceConfig,
        NetworkInputDefinition,
        ResizeMode,
        TrainingInputSize,
    )
    from inference_models.models.rfdetr.post_processor import PostProcess
    from inference_models.models.rfdetr.rfdetr_base_pytorch import build_model
    from inference_models.models.rfdetr.rfdetr_instance_segmentation_pytorch import (
        CONFIG_FOR_MODEL_TYPE,
        RFDetrForInstanceSegmentationTorch,
    )

    device = torch.device(device)
    config = CONFIG_FOR_MODEL_TYPE[model_type](device=device)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        network = build_model(config=config).eval().to(device)
    divisibility = config.num_windows * config.patch_size
    inference_config = InferenceConfig(
        network_input=NetworkInputDefinition(
            training_input_size=TrainingInputSize(height=config.resolution, width=config.resolution),
            dynamic_spatial_size_supported=True,
            dynamic_spatial_size_mode=DivisiblePadding(type="pad-to-be-divisible", value=divisibility),
            color_mode=ColorMode.BGR,
            resize_mode=ResizeMode.STRETCH_TO,
            input_channels=3,
            scaling_factor=255,
            normalization=([0.485, 0.456, 0.406], [0.229, 0.224, 0.225]),
        )
    )
    num_outputs = network.class_embed.bias.shape[0]
    return RFDetrForInstanceSegmentationTorch(
        model=network,
        inference_config=inference_config,
        class_names=[f"class_{i}" for i in range(num_outputs)],
        classes_re_mapping=None,
        device=device,
        post_processor=PostProcess(),
        resolution=config.resolution,
    )
