import copy
import os

import pytest
import torch
from mmengine.registry import DefaultScope

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
