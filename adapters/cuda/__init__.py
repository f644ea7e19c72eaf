"""CUDA plumbing shared by the stages: stream switching, buffer recycling, pinned frames."""
