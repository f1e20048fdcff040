"""bench/overload.py's premises: a request made a distinct cache miss is still the same photo to the preprocessing
contract, and the recovery it reports is when the backlog stopped holding requests up."""
from __future__ import annotations

import numpy as np

from bench.overload import recovery_s, unique
from tests.support import MUSHROOMS
from training_job.preprocessing import preprocess_bytes


def test_a_photo_made_a_distinct_miss_has_other_bytes_and_the_same_pixels():
    photos = [path.read_bytes() for path in sorted(sorted(MUSHROOMS.iterdir())[0].iterdir())[:2]]
    distinct = [unique(photos, index) for index in range(4)]
    assert len(set(distinct)) == 4
    for index, photo in enumerate(distinct):
        np.testing.assert_array_equal(preprocess_bytes(photo), preprocess_bytes(photos[index % 2]))


def test_recovery_is_the_first_prompt_answer_after_the_spike():
    normal = 0.010
    rows = [(0.0, 1.500, 200), (1.5, 0.800, 200), (2.3, 0.030, 503), (2.4, 0.015, 200), (2.5, 0.050, 200)]
    assert recovery_s(rows, normal) == 2.4  # a later slow answer does not move it
    assert recovery_s(rows[:3], normal) is None
