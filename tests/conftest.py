import copy
import os

import pytest
import torch
from mmengine.registry import DefaultScope

# Without a GPU, Triton kernels run on CPU tensors in Triton's interpreter
# (tests/test_triton_backend.py). Triton reads TRITON_INTERPRET when it
# decorates a kernel, its own library included, so it must be set before
# anything imports triton (importing mmsn does, through torch._dynamo).
if not torch.cuda.is_available():
    os.environ.setdefault('TRITON_INTERPRET', '1')

# The tests use small tensors: one intra-op thread avoids OpenMP spin-waits,
# which slow small ops by 50x on a busy 2-core machine. Set
# MMSN_TEST_THREADS to change it.
torch.set_num_threads(int(os.environ.get('MMSN_TEST_THREADS', '1')))


@pytest.fixture(autouse=True)
def restore_default_scope():
    """Runners and ``init_default_scope`` switch mmengine's process-wide
    default scope (to mmengine, mmpretrain, mmdet, ...); give every test the
    scope it started with, so the order of tests does not matter."""
    saved = copy.copy(DefaultScope._instance_dict)
    yield
    DefaultScope._instance_dict = saved
