import io
import json
import tarfile

import numpy as np
import pytest

from curate.stages.shard import ShardPlanError, check_key, plan_shards, sample_bytes, shuffle_positions, tar_end


@pytest.mark.parametrize("samples,total,world,workers,target", [
    (2048, 2048 * 100_000, 256, 8, 1 << 30),
    (10_000_000, 10_000_000 * 400_000, 256, 8, 1 << 30),
    (100, 100 * 1000, 8, 1, 1 << 30),
    (5000, 5000 * 10_000_000, 4, 2, 1 << 20),
    (17, 17 * 10, 4, 2, 1 << 30),
])
def test_plan_is_a_multiple_with_equal_shards(samples, total, world, workers, target):
    plan = plan_shards(samples, total, world, workers, target)
    assert plan.num_shards % (world * workers) == 0
    assert plan.samples_per_shard >= 1
    assert plan.kept + plan.remainder == samples
    assert 0 <= plan.remainder < plan.num_shards
    # Near the byte target, unless the shard count had to stay at one multiple (small runs).
    assert total / plan.num_shards < 2 * target or plan.num_shards == world * workers or plan.samples_per_shard == 1


def test_plan_aims_at_target_size():
    plan = plan_shards(10_000_000, 10_000_000 * 400_000, 256, 8, 1 << 30)
    # 4 TB in 1 GiB shards -> ~3725 shards -> nearest multiple of 2048 is 4096.
    assert plan.num_shards == 4096 and plan.samples_per_shard == 2441 and plan.remainder == 10_000_000 - 4096 * 2441
    assert plan.samples_per_rank == plan.kept // 256 and plan.steps_per_epoch == plan.kept // 2048


def test_too_few_samples_says_how_many_and_what_to_change():
    with pytest.raises(ShardPlanError, match=r"100 samples survived.*--world-size or --workers-per-rank"):
        plan_shards(100, 100 * 1000, 256, 8, 1 << 30)


def test_shuffle_is_a_deterministic_permutation_depending_on_seed():
    keys = [f"{i:016x}" for i in range(1000)]
    a, b, c = shuffle_positions(keys, 0), shuffle_positions(list(reversed(keys)), 0), shuffle_positions(keys, 1)
    assert sorted(a.tolist()) == list(range(1000))
    assert a.tolist() == list(reversed(b.tolist()))  # position depends on the key, not the input order
    assert not np.array_equal(a, c)


def test_sample_members_form_a_valid_deterministic_tar():
    members = sample_bytes("00000000000000ab", b"\xff\xd8jpeg", "line one\nline two", {"key": "00000000000000ab"})
    data = members + tar_end(len(members))
    assert len(data) % tarfile.RECORDSIZE == 0
    with tarfile.open(fileobj=io.BytesIO(data)) as tar:
        names = tar.getnames()
        assert names == ["00000000000000ab.jpg", "00000000000000ab.txt", "00000000000000ab.json"]
        assert tar.extractfile(names[1]).read().decode() == "line one\nline two"
        assert json.loads(tar.extractfile(names[2]).read()) == {"key": "00000000000000ab"}
        assert all(m.mtime == 0 and m.uid == 0 for m in tar.getmembers())


@pytest.mark.parametrize("bad", ["../etc/passwd", "a/b", "00000000000000a\x00", "ABCDEF0123456789", "short"])
def test_keys_never_become_paths(bad):
    with pytest.raises(ValueError):
        check_key(bad)
