"""Detection ids of the block output: random version-4 UUID strings, as str(uuid.uuid4()) gives."""

import uuid

from inference_fastpath.adapters.block_output import uuid4_strings


def test_ids_are_distinct_version_4_uuids():
    ids = uuid4_strings(500)
    assert ids.shape == (500,) and len(set(ids.tolist())) == 500
    for text in ids.tolist():
        parsed = uuid.UUID(text)
        assert parsed.version == 4 and parsed.variant == uuid.RFC_4122 and str(parsed) == text


def test_no_detections_no_ids():
    assert uuid4_strings(0).shape == (0,)
