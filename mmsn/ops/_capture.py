"""Whether the current call is being captured into a graph rather than run.

Tracers and exporters (``torch.jit.trace``, the TorchScript-based ONNX
exporter, dynamo behind ``torch.compile``/``torch.export`` and the dynamo
ONNX exporter) record the ops a call runs. They cannot record a custom
autograd Function or the ``torch.ops.mmsn`` kernels (the TorchScript tracer
fails with ``unordered_map::at``), so SN takes its composite path, plain
PyTorch ops, while one of them is active.
"""
import torch


def capturing_graph() -> bool:
    # The ONNX exporters record through these (the TorchScript-based one
    # traces, the dynamo one exports), so torch.onnx.is_in_onnx_export()
    # (slower) adds nothing.
    return torch.compiler.is_compiling() or torch.jit.is_tracing()
