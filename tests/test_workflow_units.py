"""The workflow's pure parts: what a client sees of a job's events, the job envelope, the
settings, the pipeline registry and the fanout options."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from proxy.config import ConfigError, PipelineConfig, WorkflowSettings, load_settings
from proxy.dialects.events import Finished
from proxy.domain.chat import (
    ChatRequest,
    FinishReason,
    GenerationParams,
    ImagePart,
    Message,
    OpaquePart,
    ResponseFormat,
    TextPart,
    Tool,
    ToolCall,
    ToolChoice,
    Usage,
)
from proxy.domain.errors import ErrorKind, GatewayError
from proxy.domain.events import (
    Finish,
    StreamFailed,
    StreamStart,
    TextDelta,
    ToolCallDelta,
    ToolCallStart,
    UsageReport,
)
from proxy.workflow.fanout import check_options
from proxy.workflow.job import ATTEMPT_SPAN, Job, JobError, attempt_of, first_seq
from proxy.workflow.pipelines import PipelineError, PipelineRegistry
from proxy.workflow.verdict import parse_verdict
from proxy.workflow.view import (
    ClientView,
    Continuity,
    Progress,
    TasksAnnounced,
    WinnerChosen,
    WorkflowEvent,
    decode,
    encode,
)

START = StreamStart("chatcmpl-t", "m", 1)


def feed(view: ClientView, *events: WorkflowEvent, attempt: int = 1) -> list[object]:
    out: list[object] = []
    for n, event in enumerate(events):
        out.extend(view.feed(first_seq(attempt) + n, event))
    return out


# -- ClientView ---------------------------------------------------------------------------------


def test_the_winner_view_buffers_tasks_and_shows_the_winner_as_choice_0() -> None:
    view = ClientView()
    assert feed(view, START, TasksAnnounced(("m1", "m2"), select=True), TextDelta("a", 0), TextDelta("b", 1)) == []
    assert not view.visible  # not even the role: a failure now would still be an HTTP status
    out = view.feed(5, WinnerChosen(1, "m2"))
    assert out == [START, TextDelta("b", 0)]
    assert view.feed(6, TextDelta("more", 1)) == [TextDelta("more", 0)]
    assert view.feed(7, TextDelta("loser", 0)) == []
    assert view.feed(8, Finish(FinishReason.STOP, 1)) == [Finish(FinishReason.STOP, 0)]
    assert view.feed(9, UsageReport(Usage(1, 2))) == [UsageReport(Usage(1, 2))]
    assert view.feed(10, Finished("stop", "completed", "m2")) == []
    assert view.done and view.winner == "m2" and view.finished is not None and not view.abandoned


def test_without_a_selection_every_task_is_a_live_choice() -> None:
    view = ClientView()
    out = feed(view, START, TasksAnnounced(("m1", "m2"), select=False), TextDelta("a", 0), TextDelta("b", 1), Progress())
    assert out == [START, TextDelta("a", 0), TextDelta("b", 1)]
    assert view.feed(6, ToolCallStart(0, "c1", "f", 1)) == [ToolCallStart(0, "c1", "f", 1)]
    assert view.feed(7, ToolCallDelta(0, "{}", 1)) == [ToolCallDelta(0, "{}", 1)]


def test_a_run_finishing_without_a_winner_shows_task_a() -> None:
    view = ClientView()
    feed(view, START, TasksAnnounced(("m1",), select=True), TextDelta("x", 0))
    assert view.feed(4, Finished("stop", "completed", "m1")) == [START, TextDelta("x", 0), Finish(FinishReason.STOP, 0)]


def test_a_completed_run_always_ends_each_choice_and_has_a_role_event() -> None:
    open_choices = ClientView()
    feed(open_choices, START, TasksAnnounced(("m1", "m2"), select=False), TextDelta("a", 0), TextDelta("b", 1))
    assert open_choices.feed(5, Finish(FinishReason.LENGTH, 1)) == [Finish(FinishReason.LENGTH, 1)]
    assert open_choices.feed(6, Finished("stop", "completed")) == [Finish(FinishReason.STOP, 0)]
    finished = ClientView()
    feed(finished, START, TextDelta("a"), Finish(FinishReason.STOP))
    assert finished.feed(4, Finished("stop", "completed")) == []  # nothing ended twice
    own = StreamStart("chatcmpl-job", "asked-for", 1_700_000_000)
    silent = ClientView(own)
    assert silent.feed(1, Finished("stop", "completed")) == [own, Finish(FinishReason.STOP, 0)]
    assert ClientView(own).feed(2, Finished("stop", "completed")) == [own, Finish(FinishReason.STOP, 0)]
    announced = ClientView(own)
    assert feed(announced, START, Finished("stop", "completed")) == [START, Finish(FinishReason.STOP, 0)]


def test_an_error_before_anything_was_shown_is_left_to_the_caller_as_a_status() -> None:
    view = ClientView()
    error = GatewayError(ErrorKind.INVALID_REQUEST, "bad option")
    assert feed(view, START, StreamFailed(error)) == []
    assert view.done and view.error is error and not view.visible


def test_an_error_after_the_answer_started_is_an_in_stream_error() -> None:
    view = ClientView()
    error = GatewayError(ErrorKind.BACKEND, "model died")
    assert feed(view, START, TextDelta("a")) == [START, TextDelta("a")]
    assert view.feed(3, StreamFailed(error)) == [StreamFailed(error)]


def test_a_failed_or_cancelled_finish_without_an_error_event_still_fails() -> None:
    for status, code in (("failed", "workflow_failed"), ("cancelled", "workflow_cancelled")):
        view = ClientView()
        out = feed(view, START, TextDelta("a"), Finished("error", status))
        assert isinstance(out[-1], StreamFailed) and out[-1].error.code == code


def test_a_redelivered_job_continues_silently_while_the_client_has_seen_nothing() -> None:
    view = ClientView()
    feed(view, START, TasksAnnounced(("m1", "m2"), select=True), TextDelta("dead attempt", 0))
    out = feed(
        view, START, TasksAnnounced(("m1", "m2"), select=True), TextDelta("new", 0), WinnerChosen(0, "m1"),
        Finished("stop", "completed", "m1"), attempt=2,
    )
    assert out == [START, TextDelta("new", 0), Finish(FinishReason.STOP, 0)]  # nothing of the dead attempt
    assert view.done and not view.abandoned


def test_a_redelivered_job_after_the_answer_started_ends_the_stream_with_an_error() -> None:
    view = ClientView()
    feed(view, START, TextDelta("half an ans"))
    out = feed(view, START, TextDelta("another answer"), attempt=2)
    assert len(out) == 1 and isinstance(out[0], StreamFailed) and out[0].error.code == "workflow_restarted"
    assert view.done and view.abandoned  # the caller cancels the retry


def test_a_view_for_a_non_streamed_reply_takes_the_retrys_answer_after_shown_text() -> None:
    view = ClientView(live=False)
    assert feed(view, START, TextDelta("half an ans")) == [START, TextDelta("half an ans")]
    out = feed(view, START, TextDelta("another answer"), Finished("stop", "completed"), attempt=2)
    assert out == [START, TextDelta("another answer"), Finish(FinishReason.STOP, 0)]
    assert view.restarts == 1 and view.done and not view.abandoned


def test_a_retry_that_only_re_announces_the_stored_end_is_accepted() -> None:
    view = ClientView()
    feed(view, START, TextDelta("whole answer"), Finish(FinishReason.STOP))
    assert view.feed(first_seq(2), Finished("stop", "completed", "m")) == []
    assert view.done and not view.abandoned


def test_a_reader_of_a_run_a_retry_answered_sees_only_that_retry() -> None:
    # /v1/streams of a run whose client waited for the whole answer, given by attempt 2.
    view = ClientView(from_attempt=2)
    assert feed(view, START, TextDelta("half an ans")) == []
    out = feed(view, START, TextDelta("the answer"), Finished("stop", "completed"), attempt=2)
    assert out == [START, TextDelta("the answer"), Finish(FinishReason.STOP, 0)]
    assert view.done and not view.abandoned and view.error is None


def test_late_events_of_an_abandoned_attempt_are_ignored() -> None:
    view = ClientView()
    feed(view, START, attempt=2)
    assert view.feed(3, TextDelta("from attempt 1")) == []


# -- seqs ---------------------------------------------------------------------------------------


def test_continuity_takes_consecutive_seqs_and_new_attempts_and_flags_gaps() -> None:
    seqs = Continuity()
    assert [seqs.check(s) for s in (1, 2, 2, 1, 3)] == ["new", "new", "seen", "seen", "new"]
    assert seqs.check(5) == "gap"
    assert seqs.check(first_seq(2)) == "new"  # a redelivery starts its own range
    assert seqs.check(first_seq(2) + 1) == "new"
    assert seqs.check(first_seq(3) + 1) == "gap"  # missed the start of attempt 3
    seqs.accept(first_seq(3) + 1)
    assert seqs.check(first_seq(3) + 2) == "new"
    fresh = Continuity()
    assert fresh.check(2) == "gap"  # the first event was missed


def test_attempt_ranges() -> None:
    assert (first_seq(1), first_seq(2)) == (1, ATTEMPT_SPAN + 1)
    assert [attempt_of(s) for s in (1, ATTEMPT_SPAN, ATTEMPT_SPAN + 1, 2 * ATTEMPT_SPAN + 5)] == [1, 1, 2, 3]


def test_extension_events_round_trip_and_others_skip_them() -> None:
    from proxy.dialects.events import decode_event

    for event in (TasksAnnounced(("m1", "m2"), True), WinnerChosen(1, "m2"), Progress()):
        data = encode(7, event)
        assert decode(data) == (7, event)
        assert decode_event(data) == (7, None)  # readers that do not know them skip them
    assert decode(encode(3, TextDelta("x", 2))) == (3, TextDelta("x", 2))
    assert decode(b"not json") == (0, None)


# -- the job envelope --------------------------------------------------------------------------


def _request() -> ChatRequest:
    return ChatRequest(
        model="m",
        messages=[
            Message("system", (TextPart("be brief"),)),
            Message("user", (TextPart("look"), ImagePart("data:image/png;base64,AA", "low"),
                             OpaquePart("openai", {"type": "input_audio", "x": [1]}))),
            Message("assistant", (), tool_calls=(ToolCall("c1", "f", '{"a":1}'),), reasoning="hm"),
            Message("tool", (TextPart("42"),), tool_call_id="c1", name="f"),
            Message("assistant", (TextPart("The answer is"),), extra={"prefix": True, "cache_control": {"type": "x"}}),
        ],
        params=GenerationParams(max_tokens=5, temperature=0.5, stop=("x", "y"), seed=3, n=2,
                                response_format=ResponseFormat("json_schema", {"type": "object"}, "s", True)),
        tools=[Tool("f", "does f", {"type": "object"}, strict=True)],
        tool_choice=ToolChoice("required", "f"),
        stream=True,
        include_usage=True,
        dialect="anthropic",
        extra={"workflow": {"models": ["a"]}, "metadata": {"k": "v"}},
        parallel_tool_calls=False,
    )


def test_a_job_carries_the_whole_request_exactly() -> None:
    job = Job("t1", "r", "req", "fan-out_1", _request(), 1.5, 31.5, 30.0, correlation_id="c", attempt=2)
    back = Job.decode(job.encode())
    assert back == job
    assert back.options == {"models": ["a"]}
    assert job.encode() == back.encode()  # stable


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (b'"v":1', "version"),
        (b'"trace_id":"t1"', "trace_id"),
        (b'"pipeline":"fan-out_1"', "pipeline"),
    ],
)
def test_malformed_jobs_are_rejected_with_a_reason(change: bytes, message: str) -> None:
    data = Job("t1", "r", "req", "fan-out_1", _request(), 1.5, 31.5, 30.0).encode()
    key = change.split(b":")[0]
    broken = data.replace(change, key + b':"a.b"' if b"v" not in key else key + b":9")
    with pytest.raises(JobError, match=message):
        Job.decode(broken)
    with pytest.raises(JobError):
        Job.decode(b"[]")


# -- settings ----------------------------------------------------------------------------------


def _load(tmp_path: Path, text: str) -> WorkflowSettings:
    path = tmp_path / "c.toml"
    path.write_text(text)
    return load_settings(path, {}).workflow


def test_workflow_settings_parse_with_defaults(tmp_path: Path) -> None:
    workflow = _load(tmp_path, """
[workflow]
launch = "systemd"
silence_seconds = 12
[workflow.pipelines.fanout]
models = ["a", "b"]
rule = "longest"
[workflow.pipelines.mine]
function = "pkg.mod:run"
""")
    assert workflow.launch == "systemd" and workflow.silence_seconds == 12.0 and workflow.max_deliver == 3
    assert workflow.pipelines["fanout"] == PipelineConfig(None, {"models": ["a", "b"], "rule": "longest"})
    assert workflow.pipelines["mine"].function == "pkg.mod:run"
    assert _load(tmp_path, "") == WorkflowSettings()


@pytest.mark.parametrize(
    ("text", "key"),
    [
        ('[workflow]\nlaunch = "cron"', "workflow.launch"),
        ("[workflow]\nsilence_seconds = 0", "workflow.silence_seconds"),
        ("[workflow]\nack_wait_seconds = 30\nsilence_seconds = 10", "workflow.ack_wait_seconds.*workflow.silence_seconds"),
        ("[workflow]\nack_wait_seconds = 30", "workflow.ack_wait_seconds.*workflow.silence_seconds"),
        ('[workflow]\nunit = "job.service"', "workflow.unit"),
        ("[workflow]\nbogus = 1", "workflow.bogus"),
        ('[workflow.pipelines."a.b"]\nfunction = "m:f"', "workflow.pipelines.a.b"),
        ('[workflow.pipelines.x]\nfunction = "no colon"', "workflow.pipelines.x.function"),
    ],
)
def test_bad_workflow_settings_name_their_key(tmp_path: Path, text: str, key: str) -> None:
    with pytest.raises(ConfigError, match=key.replace(".", r"\.").replace(r"\.*", ".*")):
        _load(tmp_path, text)


# -- the registry and fanout's options --------------------------------------------------------


def test_pipelines_resolve_from_config_entry_points_and_builtins(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    dist = tmp_path / "site" / "shop_pipelines-1.0.dist-info"
    dist.mkdir(parents=True)
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: shop-pipelines\nVersion: 1.0\n")
    (dist / "entry_points.txt").write_text("[llm_proxy.pipelines]\ncount = tests.workflow_pipelines:count\n")
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    settings = WorkflowSettings(pipelines={
        "mine": PipelineConfig("tests.workflow_pipelines:echo"),
        "fanout": PipelineConfig(None, {"models": ["a"]}),
    })
    registry = PipelineRegistry(settings)
    assert {"fanout", "mine", "count"} <= set(registry.names())
    from tests import workflow_pipelines

    assert registry.load("count") is workflow_pipelines.count
    assert registry.load("mine") is workflow_pipelines.echo
    assert registry.load("fanout").__module__ == "proxy.workflow.fanout"
    assert registry.options("fanout") == {"models": ["a"]}
    with pytest.raises(PipelineError, match="unknown pipeline 'nope'"):
        registry.load("nope")
    broken = PipelineRegistry(WorkflowSettings(pipelines={"x": PipelineConfig("tests.nowhere:f")}))
    with pytest.raises(PipelineError, match="cannot load"):
        broken.load("x")
    bad_options = PipelineRegistry(WorkflowSettings(pipelines={"fanout": PipelineConfig(None, {"rule": "loudest"})}))
    with pytest.raises(PipelineError, match="rule"):
        bad_options.load("fanout")
    assert "tests.workflow_pipelines" in sys.modules


def test_fanout_options_are_checked() -> None:
    check_options({"models": ["a", "b"], "rule": "judge", "judge_model": "j"})
    check_options({})  # models may come with each request
    for bad in ({"models": "a"}, {"models": ["a"] * 27}, {"view": "some"}, {"judge_model": 3}):
        with pytest.raises(ValueError):
            check_options(bad)


@pytest.mark.parametrize(
    ("reply", "letter"),
    [
        ("B", "B"),
        ("**B**", "B"),
        ('{"best": "C"}', "C"),
        ("A better answer is B.", "B"),
        ("A is better than B.", "A"),
        ("B. A solid choice.", "B"),
        ("Comparing A and B, B is the best.", "B"),
        ("<think>A is warm, C is short</think>\nAnswer: C", "C"),
        ("**Answer:** A", "A"),
        ("<think>A looks best", None),  # cut off while thinking
        ("Neither is any good.", None),
        ("The best answer is a long one.", None),
    ],
)
def test_a_judges_verdict_is_the_letter_it_means(reply: str, letter: str | None) -> None:
    assert parse_verdict(reply, ["A", "B", "C"]) == letter


def test_a_judges_reply_nested_past_what_python_reads_is_read_as_text() -> None:
    """2048 tokens of `[[[[` (a judged answer can ask for them) raised RecursionError out of
    the judge step, failing the workflow; the reply is read as text instead."""
    assert parse_verdict('{"best": ' + "[" * 5000 + "}\nAnswer: B", ["A", "B", "C"]) == "B"
