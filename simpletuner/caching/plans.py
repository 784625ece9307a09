"""What latent and text-embed cache plans share: counting why entries must be encoded."""

from __future__ import annotations

from collections import Counter


class PlanReasons:
    """Mixin for a plan with ``cached`` (a list) and ``to_encode`` (a list of (item, reason) pairs)."""

    def reasons(self) -> Counter:
        return Counter(reason for _, reason in self.to_encode)

    def summary(self) -> str:
        text = f"{len(self.cached)} cached, {len(self.to_encode)} to encode"
        if self.to_encode:
            text += " (" + ", ".join(f"{reason}: {count}" for reason, count in sorted(self.reasons().items())) + ")"
        return text
