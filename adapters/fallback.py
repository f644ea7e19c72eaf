"""The one place where a fast stage hands a call to its reference twin.

A fast stage answers :meth:`check` for each call (a :class:`~inference_fastpath.adapters.contracts.Verdict`:
``None`` or the reason it cannot reproduce the reference for these inputs, plus whatever the check
computed that the run can reuse) and runs accepted calls with :meth:`run_checked`. Both twins take the
same arguments, so :class:`FallbackStage` is a drop-in for either.
"""

from __future__ import annotations

import logging
from typing import Any, Dict, Optional, Set

LOGGER = logging.getLogger("inference_fastpath")


class FallbackStage:
    """Runs ``fast`` on the calls it accepts and ``reference`` on the others, logging each distinct
    reason once.

    Example:
        >>> stage = FallbackStage("postprocess", FusedPostprocess(80, None, "cuda"), reference)  # doctest: +SKIP
        >>> detections = stage(raw, metadata, request)  # doctest: +SKIP
    """

    def __init__(self, stage: str, fast: Any, reference: Any) -> None:
        self.stage = stage
        self.fast = fast
        self.reference = reference
        self.name = fast.name
        self._logged: Set[str] = set()

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        verdict = self.fast.check(*args, **kwargs)
        if verdict.reason is not None:
            if verdict.reason not in self._logged:
                self._logged.add(verdict.reason)
                LOGGER.warning("%s=%s: falling back to the reference stage for this input: %s",
                               self.stage, self.fast.name, verdict.reason)
            return self.reference(*args, **kwargs)
        return self.fast.run_checked(verdict, *args, **kwargs)

    def graph_summary(self) -> Optional[Dict[str, Any]]:
        """The fast twin's CUDA-graph summary (None when it keeps no graphs)."""
        summary = getattr(self.fast, "graph_summary", None)
        return summary() if summary is not None else None
