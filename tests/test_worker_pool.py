"""input_pipeline/worker_pool.py: results in the items' order from any number of worker
processes, the same as in-process; a failing worker stops the map with its function."""

import io
import pickle

import pytest

from input_pipeline import worker_pool

SQRT = "math:sqrt"


@pytest.mark.parametrize("workers,chunk", [(1, 1), (2, 1), (3, 4)])
def test_results_come_in_order(workers, chunk):
    items = [float(i * i) for i in range(11)]
    got = list(worker_pool.map_in_processes(SQRT, items, workers, chunk=chunk))
    assert got == [float(i) for i in range(11)]


def test_serve_answers_one_list_per_chunk():
    source, sink = io.BytesIO(), io.BytesIO()
    pickle.dump([[4.0, 9.0], [16.0]], source)
    source.seek(0)
    worker_pool.serve(SQRT, source, sink)
    sink.seek(0)
    assert [pickle.load(sink), pickle.load(sink)] == [[2.0, 3.0], [4.0]]


def test_a_failing_worker_names_its_function():
    with pytest.raises(RuntimeError, match="running math:sqrt exited with code 1"):
        list(worker_pool.map_in_processes(SQRT, [1.0, -1.0, 4.0, 9.0], workers=2))
