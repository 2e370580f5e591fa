"""Self-removing hooks: capture activations (patching joins with causal tracing)."""

from qviz.probes.capture import Capture, capture

__all__ = ["Capture", "capture"]
