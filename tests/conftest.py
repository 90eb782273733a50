import os
import sys

import torch

# tests/ holds shared helpers (sn_reference, _data) imported by name
sys.path.insert(0, os.path.dirname(__file__))

# The tests use small tensors: one intra-op thread avoids OpenMP spin-waits,
# which slow small ops by 50x on a busy 2-core machine. Set
# MMSN_TEST_THREADS to change it.
torch.set_num_threads(int(os.environ.get('MMSN_TEST_THREADS', '1')))
