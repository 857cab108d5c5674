"""eval.async=true's job beside training (bench/jobs.py, BesideTraining), without submitit: a refused
submission is one line, a watcher whose training never started is cancelled, a local training waits for its job and
a Slurm one does not. The real job runs in tests/test_eval_watch.py."""
import json
import time
from datetime import datetime

import pytest

from bench import jobs, rundir


class OneRank:
    def rank0(self, what, fn):
        return fn()


class Job:
    def __init__(self, result=0):
        self.cancelled, self._result = False, result

    def cancel(self):
        self.cancelled = True

    def result(self):
        if isinstance(self._result, BaseException):
            raise self._result
        return self._result


def handle(job, executor="local", since=None):
    return {"job": job, "since": time.time() if since is None else since,
            "record": {"job_id": "42", "executor": executor, "stdout": "o.log", "stderr": "e.log"}}


def test_a_refused_submission_is_one_line_and_nothing_trains(monkeypatch, tmp_path):
    def refuse(*a, **k):
        raise RuntimeError("sbatch: error: Batch job submission failed\nInvalid partition name specified")

    monkeypatch.setattr(jobs, "submit_eval_job", refuse)
    with pytest.raises(jobs.SubmitFailed) as e:
        jobs.BesideTraining.submit(None, tmp_path, job=lambda args: 0, ranks=OneRank())
    text = str(e.value)
    assert len(text.splitlines()) == 1 and "RuntimeError: Invalid partition name specified" in text
    assert text.startswith("eval.async=true: the evaluation job could not be submitted") and "nothing was trained" in text


def test_submit_hands_rank0s_job_to_every_rank(monkeypatch, tmp_path):
    seen = []
    monkeypatch.setattr(jobs, "submit_eval_job",
                        lambda cfg, run_dir, job, world, threads: seen.append((run_dir, world, threads)) or "h")
    assert jobs.BesideTraining.submit("cfg", tmp_path, job=lambda args: 0, ranks=OneRank(), world=4,
                                      threads=(3, 1)).handle == "h"
    assert seen == [(tmp_path, 4, (3, 1))]  # with the cores' split made before set-up


def test_a_watcher_whose_training_never_started_is_cancelled(tmp_path):
    job = Job()
    beside = jobs.BesideTraining(handle(job))
    beside.cancel_unless_started(tmp_path)  # no config.yaml: the training failed in set-up
    assert job.cancelled and beside.handle is None and beside.wait() is False


def test_a_started_training_keeps_its_watcher(tmp_path):
    job, since = Job(), time.time() - 5
    (tmp_path / rundir.CONFIG).write_text("{}")
    (tmp_path / rundir.RUN_JSON).write_text(json.dumps({"updated_time": datetime.now().astimezone().isoformat()}))
    beside = jobs.BesideTraining(handle(job, since=since))
    beside.cancel_unless_started(tmp_path)
    assert not job.cancelled and beside.handle is not None


def test_a_local_training_waits_for_its_job_and_a_slurm_one_does_not(capsys):
    assert jobs.BesideTraining(handle(Job(0))).wait() is True
    assert "waiting for job 42" in capsys.readouterr().out
    assert jobs.BesideTraining(handle(Job(1))).wait() is True
    assert "job 42 ended with 1; see e.log" in capsys.readouterr().err
    assert jobs.BesideTraining(handle(Job(RuntimeError("boom")))).wait() is True
    assert "ended with failed (boom)" in capsys.readouterr().err
    slurm = Job()
    assert jobs.BesideTraining(handle(slurm, executor="slurm")).wait() is False and not slurm.cancelled
    assert jobs.BesideTraining(None).wait() is False
