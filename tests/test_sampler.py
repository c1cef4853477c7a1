import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

from segmentation.engine.sampler import EvalShardSampler, GlobalBatchSampler

NUM_SAMPLES = 37
GLOBAL_BATCH = 8


def _batches(world_size, epoch=0, seed=3, num_samples=NUM_SAMPLES, drop_last=True):
    """Per rank, the list of batches of one epoch."""
    per_rank = []
    for rank in range(world_size):
        sampler = GlobalBatchSampler(num_samples, GLOBAL_BATCH // world_size, rank, world_size, seed, drop_last)
        sampler.set_epoch(epoch)
        per_rank.append(list(sampler))
    return per_rank


def test_one_process_epoch_is_a_partition_of_a_permutation():
    (batches,) = _batches(1)
    assert len(batches) == NUM_SAMPLES // GLOBAL_BATCH
    assert all(len(batch) == GLOBAL_BATCH for batch in batches)
    flat = [index for batch in batches for index in batch]
    assert len(set(flat)) == len(flat) and set(flat) <= set(range(NUM_SAMPLES))


@pytest.mark.parametrize("world_size", [1, 2, 4])
@pytest.mark.parametrize("epoch", [0, 5])
def test_global_batch_does_not_depend_on_world_size(world_size, epoch):
    (reference,) = _batches(1, epoch)
    per_rank = _batches(world_size, epoch)
    assert all(len(batches) == len(reference) for batches in per_rank)
    for k, global_batch in enumerate(reference):
        shares = [per_rank[rank][k] for rank in range(world_size)]
        assert all(len(share) == GLOBAL_BATCH // world_size for share in shares)
        assert [index for share in shares for index in share] == global_batch


def test_epochs_and_seeds_give_different_permutations():
    assert _batches(1, epoch=0) != _batches(1, epoch=1)
    assert _batches(1, epoch=1) == _batches(1, epoch=1)
    assert _batches(1, seed=3) != _batches(1, seed=4)


@pytest.mark.parametrize("world_size", [1, 2])
def test_set_start_batch_resumes_exactly(world_size):
    full = _batches(world_size, epoch=2)
    for rank in range(world_size):
        sampler = GlobalBatchSampler(NUM_SAMPLES, GLOBAL_BATCH // world_size, rank, world_size, 3)
        sampler.set_epoch(2)
        sampler.set_start_batch(3)
        assert list(sampler) == full[rank][3:]
        # Only the resumed epoch is shortened; the next iteration is a whole epoch again.
        assert list(sampler) == full[rank]
        assert len(sampler) == len(full[rank])


def test_set_start_batch_range():
    sampler = GlobalBatchSampler(NUM_SAMPLES, 4, 0, 1, 0)
    sampler.set_start_batch(len(sampler))
    assert list(sampler) == []
    with pytest.raises(ValueError, match="start batch"):
        sampler.set_start_batch(len(sampler) + 1)


@pytest.mark.parametrize("world_size", [1, 2, 4])
def test_without_drop_last_every_rank_gets_full_batches(world_size):
    per_rank = _batches(world_size, drop_last=False)
    assert all(len(batches) == -(-NUM_SAMPLES // GLOBAL_BATCH) for batches in per_rank)
    assert all(len(batch) == GLOBAL_BATCH // world_size for batches in per_rank for batch in batches)
    flat = {index for batches in per_rank for batch in batches for index in batch}
    assert flat == set(range(NUM_SAMPLES))
    assert per_rank == _batches(world_size, drop_last=False)


def test_len_and_invalid_arguments():
    assert len(GlobalBatchSampler(23, 3, 1, 2, 0)) == 3
    assert len(GlobalBatchSampler(5, 3, 1, 2, 0)) == 0
    with pytest.raises(ValueError, match="rank 2"):
        GlobalBatchSampler(10, 2, 2, 2, 0)
    with pytest.raises(ValueError, match="batch_size_per_rank"):
        GlobalBatchSampler(10, 0, 0, 1, 0)
    with pytest.raises(ValueError, match="rank"):
        EvalShardSampler(10, 0, 0)


def test_works_as_a_dataloader_batch_sampler():
    dataset = TensorDataset(torch.arange(NUM_SAMPLES))
    sampler = GlobalBatchSampler(NUM_SAMPLES, 4, 1, 2, 3)
    sampler.set_epoch(1)
    loaded = [batch[0].tolist() for batch in DataLoader(dataset, batch_sampler=sampler)]
    assert loaded == _batches(2, epoch=1)[1]


@pytest.mark.parametrize("num_samples", [0, 1, 7, 10, 13])
@pytest.mark.parametrize("world_size", [1, 2, 3, 4])
def test_eval_shards_cover_each_index_once(num_samples, world_size):
    shards = [list(EvalShardSampler(num_samples, rank, world_size)) for rank in range(world_size)]
    assert [index for shard in shards for index in shard] == list(range(num_samples))
    sizes = [len(EvalShardSampler(num_samples, rank, world_size)) for rank in range(world_size)]
    assert sizes == [len(shard) for shard in shards]
    assert max(sizes) - min(sizes) <= 1
