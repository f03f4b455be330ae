import os

import pytest
import torch

# Tests use tiny tensors: one thread avoids the oversubscription that makes small convolutions
# many times slower when several processes share the two cores of a CI machine.
torch.set_num_threads(1)
os.environ.setdefault("OMP_NUM_THREADS", "1")

FMNIST_DIR = "/usr/share/datasets/fashion-mnist"
needs_fmnist = pytest.mark.skipif(
    not os.path.isdir(FMNIST_DIR) and not os.environ.get("LDM_DATA"),
    reason="Fashion-MNIST missing: sudo apt-get install -y dataset-fashion-mnist (or set LDM_DATA)",
)
