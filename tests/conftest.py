import os
import urllib.error
import urllib.request

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


@pytest.fixture
def offline_data(tmp_path, monkeypatch):
    """No LDM_DATA, an empty user cache, and no network but localhost (where tests serve their own mirrors)."""
    monkeypatch.delenv("LDM_DATA", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg-cache"))
    real_urlopen = urllib.request.urlopen

    def localhost_only(url, *args, **kwargs):
        if not str(url).startswith("http://127.0.0.1:"):
            raise urllib.error.URLError("network disabled in tests")
        return real_urlopen(url, *args, **kwargs)

    monkeypatch.setattr(urllib.request, "urlopen", localhost_only)
