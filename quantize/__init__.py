"""Offline GSQ quantizer. Never imports serving code: the checkpoint format comes from gsq_format."""
