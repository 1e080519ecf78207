"""Logging: the fixed-format step line, rank-0 only output, JSONL metrics and TensorBoard events."""

import io

from ember.common import log


def test_step_line_format():
    line = log.step_line(100, 2000, loss=3.2101, lr=1e-3, dt=0.2104, **{"tok/s": 12345.0}, mfu=0.41)
    assert line == "step 00100/02000 | loss 3.2101 | lr 1.0e-03 | dt 210ms | tok/s 12.3k | mfu 41.0%"
    assert log.step_line(7, 10, loss=float("nan")) == "step 00007/00010 | loss nan"


def test_print0_only_on_rank_zero(monkeypatch, capsys):
    monkeypatch.setenv("RANK", "1")
    log.print0("hidden")
    monkeypatch.setenv("RANK", "0")
    log.print0("shown")
    assert capsys.readouterr().out == "shown\n"


def test_progress_hidden_when_not_a_tty():
    stream = io.StringIO()
    with log.Progress(10, "work", stream=stream) as bar:
        for _ in range(10):
            bar.update()
    assert stream.getvalue() == ""


def test_progress_draws_on_a_tty():
    class Tty(io.StringIO):
        def isatty(self):
            return True

    stream = Tty()
    with log.Progress(4, "work", stream=stream) as bar:
        for _ in range(4):
            bar.update()
    assert "work [" in stream.getvalue() and "4/4" in stream.getvalue()


def test_metrics_jsonl_and_tensorboard(tmp_path):
    m = log.Metrics(tmp_path, tensorboard=True)
    m.log(1, loss=2.5, lr=1e-3)
    m.log(2, loss=2.0)
    m.close()
    rows = log.read_metrics(tmp_path / "metrics.jsonl")
    assert [(r["step"], r["loss"]) for r in rows] == [(1, 2.5), (2, 2.0)]
    events = list((tmp_path / "tb").glob("events.out.tfevents.*"))
    assert events and events[0].stat().st_size > 0
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    acc = EventAccumulator(str(tmp_path / "tb"))
    acc.Reload()
    assert [e.value for e in acc.Scalars("loss")] == [2.5, 2.0]


def test_metrics_start_over_unless_resuming(tmp_path):
    """An interrupted attempt's rows go when a stage starts over (sft, dpo, ... or pretrain without a
    checkpoint); a resume keeps the rows up to its checkpoint step. Each step appears once either way."""
    def attempt(steps, resume=False, at=None):
        m = log.Metrics(tmp_path, resume=resume)
        if at is not None:
            m.resume_at(at)
        for s in steps:
            m.log(s, loss=float(s))
        m.close()
        return [r["step"] for r in log.read_metrics(tmp_path / "metrics.jsonl")]

    assert attempt([1, 2, 3]) == [1, 2, 3]
    assert attempt([1, 2, 3, 4]) == [1, 2, 3, 4]  # started over: not 1, 2, 3, 1, 2, 3, 4
    assert attempt([3, 4, 5], resume=True, at=2) == [1, 2, 3, 4, 5]  # resumed from step 2's checkpoint
