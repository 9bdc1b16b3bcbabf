"""Download jobs join consecutive parts so few live rows over many parts still fill the download threads."""

from curate.executors.local.engine import job_groups


def test_parts_are_joined_until_a_job_holds_a_batch_of_live_rows():
    assert job_groups([0, 1, 2, 3, 4, 5], [3, 3, 3, 10, 0, 1], 6) == [[0, 1], [2, 3], [4, 5]]
    assert job_groups(list(range(100)), [10] * 100, 10_000) == [list(range(100))]
    assert job_groups([0, 1], [20_000, 5], 10_000) == [[0], [1]]


def test_a_gap_left_by_a_resumed_run_starts_a_new_job():
    assert job_groups([0, 1, 5, 6], [1, 1, 1, 1], 100) == [[0, 1], [5, 6]]
