"""IndexedDataset: items carry their dataset index, with Subset, ConcatDataset and DataLoader."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch.utils.data import ConcatDataset, DataLoader, Dataset, Subset, TensorDataset

from memloss_addon import IndexedDataset


def base(n: int = 6, offset: int = 0) -> TensorDataset:
    return TensorDataset(torch.arange(offset, offset + n).float().unsqueeze(1), torch.arange(n))


def test_tuple_items_gain_their_index():
    data = IndexedDataset(base())
    assert len(data) == 6
    x, y, idx = data[4]
    assert float(x) == 4.0 and int(y) == 4 and idx == 4


def test_subset_indices_are_positions_in_the_subset():
    data = IndexedDataset(Subset(base(), [5, 1, 3]))
    assert [(float(data[i][0]), data[i][2]) for i in range(3)] == [(5.0, 0), (1.0, 1), (3.0, 2)]


def test_concat_dataset_indices_run_across_the_parts():
    data = IndexedDataset(ConcatDataset([base(3), base(4, offset=10)]))
    assert len(data) == 7
    assert [(float(data[i][0]), data[i][2]) for i in range(7)] == [
        (0.0, 0),
        (1.0, 1),
        (2.0, 2),
        (10.0, 3),
        (11.0, 4),
        (12.0, 5),
        (13.0, 6),
    ]


def test_shuffled_loader_yields_each_index_once_with_its_own_item():
    data = IndexedDataset(base(10))
    seen = []
    for x, _, idx in DataLoader(data, batch_size=4, shuffle=True):
        assert idx.dtype == torch.int64
        assert torch.equal(x.squeeze(1), idx.float())
        seen += idx.tolist()
    assert sorted(seen) == list(range(10))


def test_dict_and_plain_items():
    class Dicts(Dataset):
        def __len__(self):
            return 2

        def __getitem__(self, i):
            return {"image": torch.zeros(1), "label": i}

    class Plain(Dataset):
        def __len__(self):
            return 2

        def __getitem__(self, i):
            return torch.full((1,), float(i))

    assert IndexedDataset(Dicts())[1]["index"] == 1
    x, idx = IndexedDataset(Plain())[1]
    assert float(x) == 1.0 and idx == 1


def test_negative_and_numpy_indices_give_the_non_negative_dataset_index():
    data = IndexedDataset(base(5))
    assert data[-1][2] == 4
    assert data[np.int64(2)][2] == 2


@pytest.mark.parametrize(("index", "error"), [(6, IndexError), (-7, IndexError), (1.5, TypeError)])
def test_bad_item_index_raises(index, error):
    with pytest.raises(error):
        IndexedDataset(base(6))[index]


def test_iterable_without_len_is_refused():
    with pytest.raises(TypeError, match="map-style"):
        IndexedDataset(iter([1, 2]))
