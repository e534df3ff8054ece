"""Offline GSQ quantizer. Never imports serving code (gsq_vllm.format only)."""
