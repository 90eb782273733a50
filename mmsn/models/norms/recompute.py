"""Whether a forward is activation checkpointing's recomputation."""
import torch


def recomputing_in_backward() -> bool:
    """Whether this forward is activation checkpointing's recomputation.

    ``torch.utils.checkpoint`` (reentrant or not) reruns the forward inside
    the backward pass; the running statistics were already updated by the
    first forward and must not move twice per step. PyTorch has no public
    way to ask: an autograd graph task is running only during backward.
    Under torch.compile nothing reruns the update (the functionalized
    graph writes the buffers once, after the forward), and the question is
    not traced.
    """
    if torch.compiler.is_compiling():
        return False
    return torch._C._current_graph_task_id() != -1
