"""Fuzzing the readers with a fixed budget: mutated real checkpoints of every layout end in a clear error or a result.

Each example copies a small real checkpoint (tests/helpers/specimens.py), mutates one of its
files (truncation, bit flips, a zeroed range, an overwritten field, a spliced slice) or
rewrites a file name its metadata supplies to one leaving its folder (``escape``), and reads and analyses it in this process. Anything but a one-line OstateError or a
result (another exception, a multi-line message) fails the test; a per-example
deadline catches hangs. ``derandomize=True`` makes the run the same every time;
benchmarks/fuzz_readers.py runs the same search for longer.
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.helpers import specimens

POSITIONS = st.integers(min_value=0, max_value=1 << 20)


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    root = tmp_path_factory.mktemp("fuzz-specimens")
    return {name: specimens.build(name, root / name) for name in specimens.BUILDERS}


@pytest.mark.slow
@pytest.mark.parametrize("layout", list(specimens.BUILDERS))
def test_mutated_checkpoints_end_in_a_clear_error_or_a_result(built, layout):
    spec = built[layout]

    @settings(
        max_examples=150, derandomize=True, deadline=20_000, database=None, suppress_health_check=[HealthCheck.too_slow]
    )
    @given(
        file_index=st.integers(min_value=0, max_value=50),
        kind=st.sampled_from(specimens.MUTATIONS),
        a=POSITIONS,
        b=POSITIONS,
        c=POSITIONS,
    )
    def check(file_index, kind, a, b, c):
        work = Path(tempfile.mkdtemp(prefix="ostate-fuzz-"))
        try:
            copy = specimens.mutated_copy(spec, work, file_index, kind, a, b, c)
            outcome = specimens.inspect_outcome(copy)
            if kind == "escape" and layout in specimens.ESCAPING:  # a name leaving the folder is never followed
                assert outcome == "error"
            assert outcome in ("ok", "error")
        finally:
            shutil.rmtree(work)

    check()


@pytest.mark.slow
def test_mutated_pickles_are_read_or_refused_by_ostates_own_reader(built):
    # The index of a real torch.save file, mutated at the pickle level (the zip around it stays
    # valid): ostate's reader returns an object or refuses in one line, nothing else.
    from ostate.formats.files.torch_pickle import TorchArchive

    archive = TorchArchive(str(built["torch-zip"].path))
    data = archive.pickle()
    outcomes = []

    @settings(max_examples=400, derandomize=True, deadline=5_000, database=None)
    @given(kind=st.sampled_from(specimens.MUTATIONS), a=POSITIONS, b=POSITIONS, c=POSITIONS)
    def check(kind, a, b, c):
        outcomes.append(specimens.pickle_outcome(specimens.mutate(data, kind, a, b, c), archive))

    check()
    assert specimens.pickle_outcome(data, archive) == "ok"
    assert "refused" in outcomes  # the mutations reach the reader's checks
