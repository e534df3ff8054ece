"""gsq-vllm serving side.

Importing this package must stay cheap and must not import vLLM: the offline
quantizer imports ``gsq_vllm.format`` (the checkpoint format) from here.
The vLLM plugin lives in ``gsq_vllm.plugin`` and is loaded by vLLM through
the ``vllm.general_plugins`` entry point.
"""

__version__ = "0.1.0"
