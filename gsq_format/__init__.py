"""The GSQ checkpoint format, shared by the offline quantizer and the vLLM plugin.

``format``  the on-disk layout (config keys, tensor names, packing, validation) -- docs/FORMAT.md;
``qtypes``  QuantizedWeight, one linear's codes and scales before packing;
``convert`` ``gsq-convert``: GSQ <-> compressed-tensors / GPTQ checkpoints.
Imports torch, safetensors and the standard library only: never vLLM, never ``quantize``.
"""
