"""sentinel.data: skips and resumed positions start the loader at an index, replaying the original pass."""

from __future__ import annotations

import torch
from torch.utils.data import DataLoader, Dataset, RandomSampler

from sentinel.data import BatchPosition


class CountingDataset(Dataset):
    """Map-style dataset that counts every item it loads."""

    def __init__(self, n: int = 40):
        self.n, self.loads = n, 0

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> torch.Tensor:
        self.loads += 1
        return torch.tensor([i])


def _ids(batch: torch.Tensor) -> list[int]:
    return batch.flatten().tolist()


def _first_pass(loader: DataLoader, stop_after: int) -> tuple[list[list[int]], dict, torch.Tensor]:
    """Original pass: returns every batch, and the position and global RNG right after ``stop_after`` batches."""
    pos = BatchPosition()
    seen, state, rng = [], None, None
    for batch in pos.iterate(loader):
        seen.append(_ids(batch))
        torch.rand(3)  # the training step draws from the global generator too
        if len(seen) == stop_after:
            state, rng = pos.state_dict(), torch.get_rng_state()
    return seen, state, rng


def test_resumed_shuffled_loader_replays_the_pass_without_loading_skipped_batches() -> None:
    torch.manual_seed(0)
    ds = CountingDataset()
    loader = DataLoader(ds, batch_size=4, shuffle=True)  # no generator: the sampler seeds from torch's global RNG
    seen, state, rng = _first_pass(loader, stop_after=3)
    assert "pass_rng" in state and state["index"] == 3

    torch.manual_seed(123)  # a fresh process: whatever the global generator holds, the checkpoint restores it
    torch.set_rng_state(rng)
    ds.loads = 0
    pos = BatchPosition()
    pos.load_state_dict(state)
    pos.skip(2)
    rest = [_ids(b) for b in pos.iterate(loader)]
    assert rest == seen[5:]
    assert ds.loads == 4 * len(seen[5:])  # the 5 skipped batches were never loaded
    assert torch.equal(torch.get_rng_state(), rng)  # the resume drew nothing from the global generator
    assert pos.state_dict() == {"epoch": 1, "index": 0}


def test_explicit_generators_are_replayed_and_left_where_the_original_left_them() -> None:
    gen, sampler_gen = torch.Generator().manual_seed(1), torch.Generator().manual_seed(2)
    ds = CountingDataset()
    loader = DataLoader(ds, batch_size=4, sampler=RandomSampler(ds, generator=sampler_gen), generator=gen)
    seen, state, _ = _first_pass(loader, stop_after=6)
    after = (gen.get_state(), sampler_gen.get_state())
    gen.manual_seed(99)
    sampler_gen.manual_seed(99)
    pos = BatchPosition()
    pos.load_state_dict(state)
    assert [_ids(b) for b in pos.iterate(loader)] == seen[6:]
    assert torch.equal(gen.get_state(), after[0]) and torch.equal(sampler_gen.get_state(), after[1])


def test_a_skip_during_a_pass_takes_effect_at_the_next_batch() -> None:
    ds = CountingDataset(20)
    loader = DataLoader(ds, batch_size=2)
    pos = BatchPosition()
    got = []
    for batch in pos.iterate(loader):
        got.append(_ids(batch)[0])
        if len(got) == 2:
            pos.skip(3)
    assert got == [0, 2, 10, 12, 14, 16, 18]
    assert ds.loads == 2 * len(got)


def test_a_skip_past_the_end_carries_into_the_next_pass() -> None:
    data = list(range(10))
    pos = BatchPosition()
    it = pos.iterate(data)
    assert [next(it) for _ in range(8)] == list(range(8))
    pos.skip(5)  # 8 + 5 = 13: three into the next pass
    assert list(it) == []
    assert pos.state_dict() == {"epoch": 1, "index": 3}
    assert list(pos.iterate(data)) == data[3:]


def test_plain_iterables_are_fast_forwarded() -> None:
    pulled = []

    def stream():
        for i in range(10):
            pulled.append(i)
            yield i

    pos = BatchPosition()
    pos.load_state_dict({"epoch": 0, "index": 4})
    assert list(pos.iterate(stream())) == list(range(4, 10))
    assert pulled == list(range(10))  # it had to draw the skipped ones


def test_stop_ends_the_iterator_and_keeps_the_position() -> None:
    pos = BatchPosition()
    got = []
    for b in pos.iterate(list(range(10))):
        got.append(b)
        if b == 3:
            pos.stop()
    assert got == [0, 1, 2, 3]
    assert pos.state_dict() == {"epoch": 0, "index": 4}
    assert list(pos.iterate(list(range(10)))) == []


def test_restore_of_an_earlier_position_during_a_pass_rewinds_it() -> None:
    torch.manual_seed(0)
    loader = DataLoader(CountingDataset(), batch_size=4, shuffle=True)
    pos = BatchPosition()
    got, saved = [], None
    for batch in pos.iterate(loader):
        got.append(_ids(batch))
        if len(got) == 2:
            saved = pos.state_dict()
        if len(got) == 5 and saved is not None:
            pos.load_state_dict(saved)
            saved = None
    assert len(got) == 13  # 5 batches, then the rewind to index 2 and the remaining 8
    assert got[5:8] == got[2:5]  # the rewound batches came again, identically
    assert sorted(i for b in got[:2] + got[5:] for i in b) == list(range(40))  # and then the rest of the pass
