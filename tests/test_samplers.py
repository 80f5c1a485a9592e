"""Training and evaluation samplers: distributions, sharding, resumption.

    pytest -q tests/test_samplers.py --durations=5
"""

import numpy as np
import pytest

from livt.data.samplers import EvalSampler, TrainSampler

# 4 classes with 400, 100, 16 and 4 images: sqrt(n) = 20, 10, 4, 2
TARGETS = np.repeat(np.arange(4), [400, 100, 16, 4])


def class_frequencies(kind: str, epochs, total_epochs: int = 1) -> np.ndarray:
    s = TrainSampler(TARGETS, 4, kind, seed=0, batch_size=20, total_epochs=total_epochs)
    drawn = []
    for e in epochs:
        s.set_epoch(e)
        drawn += [i for _, i in s]
    return np.bincount(TARGETS[drawn], minlength=4) / len(drawn)


def test_instance_is_a_seeded_permutation():
    s = TrainSampler(TARGETS, 4, "instance", seed=3, batch_size=20)
    first = [i for _, i in s]
    assert sorted(first) == list(range(520)) and len(s) == 520 and s.batches_per_epoch == 26
    assert [i for _, i in s] == first  # same epoch, same order
    s.set_epoch(1)
    second = list(s)
    assert {e for e, _ in second} == {1} and [i for _, i in second] != first
    assert [i for _, i in TrainSampler(TARGETS, 4, "instance", seed=4, batch_size=20)] != first


def test_class_balanced_draws_classes_uniformly():
    assert np.allclose(class_frequencies("class_balanced", range(10)), 0.25, atol=0.02)


def test_class_balanced_draws_images_uniformly_within_a_class():
    s = TrainSampler(TARGETS, 4, "class_balanced", seed=0, batch_size=20)
    drawn = np.array([i for e in range(10) for i in (s.set_epoch(e), [i for _, i in s])[1]])
    tail = np.bincount(drawn[TARGETS[drawn] == 3] - 516, minlength=4)  # class 3 = images 516..519
    assert tail.sum() > 1000 and np.all(np.abs(tail / tail.sum() - 0.25) < 0.05)


def test_sqrt_sampler():
    expected = np.array([20, 10, 4, 2]) / 36
    assert np.allclose(TrainSampler(TARGETS, 4, "sqrt", batch_size=20).class_probs(), expected)
    assert np.allclose(class_frequencies("sqrt", range(10)), expected, atol=0.02)


def test_progressive_sampler_moves_from_instance_to_balanced():
    s = TrainSampler(TARGETS, 4, "progressive", batch_size=20, total_epochs=10)
    assert np.allclose(s.class_probs(0), [400 / 520, 100 / 520, 16 / 520, 4 / 520])
    # t/T = 0.5: 0.5 * n/N + 0.5 / 4
    assert np.allclose(s.class_probs(5), [0.5 * 400 / 520 + 0.125, 0.5 * 100 / 520 + 0.125,
                                          0.5 * 16 / 520 + 0.125, 0.5 * 4 / 520 + 0.125])
    assert np.allclose(s.class_probs(10), 0.25)
    early = TrainSampler(TARGETS, 4, "progressive", batch_size=20, total_epochs=1000)
    expected = np.mean([early.class_probs(e) for e in range(10)], axis=0)
    assert np.allclose(class_frequencies("progressive", range(10), total_epochs=1000), expected, atol=0.02)
    # past T the schedule stays class-balanced
    assert np.allclose(class_frequencies("progressive", range(10, 20), total_epochs=10), 0.25, atol=0.02)


def test_empty_class_is_never_drawn():
    targets = np.array([0] * 10 + [2] * 10)
    s = TrainSampler(targets, 3, "class_balanced", batch_size=5)
    assert np.allclose(s.class_probs(), [0.5, 0, 0.5]) and {targets[i] for _, i in s} == {0, 2}


def test_unknown_kind_lists_valid_ones():
    with pytest.raises(ValueError, match="instance, class_balanced, sqrt, progressive"):
        TrainSampler(TARGETS, 4, "balanced")


@pytest.mark.parametrize("kind", ["instance", "sqrt"])
def test_shards_concatenate_to_the_single_process_global_batches(kind):
    batch, world = 7, 3  # 520 // 21 = 24 global batches, 16 samples dropped
    single = TrainSampler(TARGETS, 4, kind, seed=5, batch_size=batch * world)
    ranks = [TrainSampler(TARGETS, 4, kind, seed=5, batch_size=batch, num_replicas=world, rank=r)
             for r in range(world)]
    for epoch in (0, 2):
        single.set_epoch(epoch)
        for s in ranks:
            s.set_epoch(epoch)
        glob = [i for _, i in single]
        mine = [[i for _, i in s] for s in ranks]
        assert len(glob) == 24 * 21
        assert all(len(m) == len(s) == 24 * 7 for m, s in zip(mine, ranks, strict=True))
        rebuilt = [i for b in range(24) for m in mine for i in m[b * batch:(b + 1) * batch]]
        assert rebuilt == glob
        if kind == "instance":
            assert len(set(glob)) == len(glob)  # no sample twice within an epoch


def test_set_start_resumes_exactly_and_set_epoch_resets():
    s = TrainSampler(TARGETS, 4, "class_balanced", seed=1, batch_size=8, num_replicas=2, rank=1)
    s.set_epoch(3)
    full = list(s)
    s.set_start(5)
    assert list(s) == full[5 * 8:] and len(s) == len(full) - 40
    s.set_start(s.batches_per_epoch)
    assert list(s) == [] and len(s) == 0
    s.set_epoch(4)
    assert len(list(s)) == len(full) and len(s) == len(full)
    with pytest.raises(ValueError):
        s.set_start(s.batches_per_epoch + 1)


def test_too_few_samples_for_one_global_batch():
    with pytest.raises(ValueError, match="global batch"):
        TrainSampler(np.zeros(10, dtype=int), 1, batch_size=4, num_replicas=3)


@pytest.mark.parametrize("n, world", [(11, 2), (11, 3), (13, 3), (2, 3)])
def test_eval_sampler_covers_every_index_once(n, world):
    shards = [list(EvalSampler(n, world, r)) for r in range(world)]
    indices = [i for sh in shards for _, i in sh]
    assert sorted(indices) == list(range(n))
    assert [len(EvalSampler(n, world, r)) for r in range(world)] == [len(sh) for sh in shards]
    assert all(e == 0 for sh in shards for e, _ in sh)
