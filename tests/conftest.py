import pytest
import torch

from tests.support import VOCAB


@pytest.fixture
def ids():
    return torch.randint(0, VOCAB, (2, 11), generator=torch.Generator().manual_seed(1))
