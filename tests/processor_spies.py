"""Spies on the processor's dispatch, shared by the tests that check which path a call took (not a test file)."""

from __future__ import annotations

from resattn_diffusion.integration.processors import ResTunerAttnProcessor


def record_extra_heads_calls(monkeypatch) -> list[bool]:
    """Record, per processor call, whether the extra-heads path returned the output (True) or stepped aside."""
    taken: list[bool] = []
    original = ResTunerAttnProcessor._extra_heads_call

    def spy(self, *args, **kwargs):
        out = original(self, *args, **kwargs)
        taken.append(out is not None)
        return out

    monkeypatch.setattr(ResTunerAttnProcessor, "_extra_heads_call", spy)
    return taken
