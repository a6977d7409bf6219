"""Dynamic batching: queued jobs generate in one batch with the answers they get alone; a job
that fails its batch fails alone; closing answers what is queued and refuses the rest."""

import pytest

from regrad_engine.batching import DynamicBatcher, Job
from regrad_engine.errors import RegradError, RequestError
from regrad_engine.retrieval import Hit
from tests.conftest import DOCS, QUESTIONS, make_engine


@pytest.fixture()
def engine(sdpa_model, tokenizer, tmp_path):
    return make_engine(tokenizer, tmp_path, model=sdpa_model)


def jobs(engine):
    hits = engine.retrieve(QUESTIONS, 2)
    return [Job(q, h, gamma, n) for q, h, gamma, n in zip(QUESTIONS, hits, (0.5, 1.0, 2.0, 1.0), (3, 6, 4, 5))]


def answer_alone(engine, job):
    return engine.complete([job.conversation], [job.documents], gamma=job.gamma, max_new_tokens=job.max_new_tokens)[0]


def test_queued_jobs_share_one_batch_and_get_their_solo_answers(engine):
    batcher = DynamicBatcher(engine, max_wait_ms=0)
    futures = [batcher.submit(job) for job in jobs(engine)]  # queued before the worker starts
    batcher.start()
    results = [f.result(timeout=60) for f in futures]
    assert results == [answer_alone(engine, job) for job in jobs(engine)]
    assert batcher.stats.batches == 1 and batcher.stats.largest == 4
    batcher.close()


def test_a_job_that_fails_its_batch_fails_alone(engine):
    engine.on_the_fly = False  # a document without a stored gradient is now an error, found at generation
    bad = Job(QUESTIONS[0], [Hit("fox", DOCS["fox"], 0.0)], 1.0, 4)
    batcher = DynamicBatcher(engine, max_batch=8)
    futures = [batcher.submit(job) for job in [*jobs(engine)[:2], bad, *jobs(engine)[2:]]]
    batcher.start()
    with pytest.raises(RequestError, match="no stored gradient"):
        futures[2].result(timeout=60)
    good = [f.result(timeout=60) for i, f in enumerate(futures) if i != 2]
    assert good == [answer_alone(engine, job) for job in jobs(engine)]
    batcher.close()


def test_batches_are_at_most_max_batch(engine):
    batcher = DynamicBatcher(engine, max_batch=3, max_wait_ms=0)
    futures = [batcher.submit(job) for job in jobs(engine) * 2]
    batcher.start()
    [f.result(timeout=60) for f in futures]
    assert batcher.stats.sizes == {3: 2, 2: 1}  # 8 jobs
    batcher.close()


def test_close_answers_the_queue_then_refuses(engine):
    batcher = DynamicBatcher(engine)
    queued = batcher.submit(jobs(engine)[0])
    batcher.start()
    batcher.close()
    assert queued.result(timeout=60).text == answer_alone(engine, jobs(engine)[0]).text
    assert not batcher.running
    with pytest.raises(RegradError, match="shutting down"):
        batcher.submit(jobs(engine)[0]).result(timeout=5)


@pytest.mark.parametrize("kwargs, message", [({"max_batch": 0}, "max_batch must be"),
                                             ({"max_wait_ms": -1}, "max_wait_ms must be")])
def test_bad_settings_are_refused(engine, kwargs, message):
    with pytest.raises(RegradError, match=message):
        DynamicBatcher(engine, **kwargs)


def test_a_cancelled_request_is_skipped_and_the_worker_keeps_serving(engine):
    batcher = DynamicBatcher(engine, max_wait_ms=0)
    first, second = jobs(engine)[:2]
    given_up = batcher.submit(first)
    assert given_up.cancel()  # the caller gave up before the worker took it (e.g. a timeout)
    kept = batcher.submit(second)
    batcher.start()
    assert kept.result(timeout=60) == answer_alone(engine, second)
    assert batcher.running and batcher.submit(first).result(timeout=60) == answer_alone(engine, first)
    batcher.close()
