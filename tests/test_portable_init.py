"""The trained demo network's frozen encoder must come out of its seed identically on every host.

torch's initialisers gave different DINOv2 encoders on torch 2.11 (GPU host) and 2.14 (CPU), so
parameters trained on one host would not fit the network built on the other. The encoder is
therefore redrawn from numpy's PCG64 raw stream with exact arithmetic. The digests below were
computed once; this test fails on any host (or torch, numpy, inference-models version) that
builds a different encoder. Run it on the GPU host too before trusting parameters trained there.
"""

from __future__ import annotations

import hashlib

import numpy as np

from inference_fastpath.examples.demo_network import build_random_network, portable_uniform

ENCODER_SHA256 = "3a8cce4cb183d0bd181af80c8fae7c4d7f4ed59e3aeb5e2a988c68d32902e7ec"


def test_portable_uniform_is_fixed_and_has_the_asked_spread():
    assert portable_uniform(4, 0.02, (0, 1)).tolist() == [
        0.027001895010471344, 0.003958640154451132, 0.02084752358496189, 0.03162820637226105]
    values = portable_uniform(200_000, 0.02, (5, 9))
    assert values.dtype == np.float32 and abs(float(values.mean())) < 2e-4
    assert abs(float(values.std()) - 0.02) < 2e-4 and float(np.abs(values).max()) <= 0.02 * 3 ** 0.5
    assert not np.array_equal(values[:4], portable_uniform(4, 0.02, (5, 10)))  # another key, another stream


def test_seeded_encoder_is_the_recorded_one():
    network = build_random_network(0, num_classes=6, portable_encoder=True)
    digest = hashlib.sha256()
    for name, tensor in sorted(network.backbone[0].encoder.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().contiguous().numpy().tobytes())
    assert digest.hexdigest() == ENCODER_SHA256
    plain = build_random_network(0, num_classes=6)
    name = "encoder.embeddings.patch_embeddings.projection.weight"
    assert not np.array_equal(plain.backbone[0].encoder.state_dict()[name].numpy(),
                              network.backbone[0].encoder.state_dict()[name].numpy())
