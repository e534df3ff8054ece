"""gsq-vllm serving side.

The checkpoint format it reads is ``gsq_format`` (shared with the offline quantizer).
The vLLM plugin lives in ``gsq_vllm.plugin`` and is loaded by vLLM through
the ``vllm.general_plugins`` entry point.
"""

__version__ = "0.1.0"
