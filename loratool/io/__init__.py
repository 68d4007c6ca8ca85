"""Bytes in and out: validated safetensors, safe pickles, atomic outputs, hub references."""
