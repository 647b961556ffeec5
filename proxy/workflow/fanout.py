"""The built-in `fanout` pipeline: one prompt to several models at once, one winner.

Options (`[workflow.pipelines.fanout]` in the config, or the request's `workflow` object,
which wins):

    models = ["qwen3-8b", "llama3.1-8b"]   # task A, B, … in this order (1 to 26 models)
    rule = "first"                        # first | longest | judge
    judge_model = "qwen3-32b"             # for rule = "judge"
    view = "winner"                       # winner | all (default: all when the request's
                                          # `n` equals the number of models, else winner)

Every model's tokens are published as its task while they stream. In the `winner` view
the client gets the winner alone, as choice 0, once it is chosen; in the `all` view every
task is its own choice, live. Rules: `first` — the first model to finish (in the winner
view the others are then cancelled: nobody will read them); `longest` — the longest
answer; `judge` — `judge_model` reads every answer and names the best (a structured
answer where the backend takes one, else read from its text: `proxy.workflow.verdict`;
longest if its reply names none). A model that fails is out of the running; if all fail, the job fails
with their errors.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from dataclasses import dataclass, replace
from typing import Any

import trio

from proxy.dialects.events import task_name
from proxy.domain.chat import (
    ChatCompletion,
    ChatRequest,
    GenerationParams,
    Message,
    ResponseFormat,
    TextPart,
    Usage,
)
from proxy.domain.errors import ErrorKind, GatewayError, invalid_request
from proxy.domain.events import UsageReport
from proxy.workflow.llm import Answer
from proxy.workflow.pipelines import PipelineContext, PipelineResult
from proxy.workflow.verdict import parse_verdict
from proxy.workflow.verdict import schema as verdict_schema

RULES = ("first", "longest", "judge")
VIEWS = ("winner", "all")
MAX_MODELS = 26
_PARAM = "workflow"

JUDGE_SYSTEM = (
    "You compare candidate answers to a user's request and name the best one by its letter."
)
# Room for a thinking model to think before it answers (its thoughts count against this on
# most backends); a model that does not think stops after its few tokens anyway.
JUDGE_MAX_TOKENS = 2048


@dataclass(slots=True, frozen=True)
class FanoutOptions:
    models: tuple[str, ...]
    rule: str
    judge_model: str | None
    view: str


@dataclass(slots=True)
class _Task:
    choice: int
    model: str
    status: str = "running"  # completed | failed | cancelled
    answer: Answer | None = None
    error: GatewayError | None = None
    finished_at: float | None = None

    def summary(self) -> dict[str, Any]:
        completion = self.answer.completion if self.answer else None
        choice = completion.choices[0] if completion and completion.choices else None
        usage = completion.usage if completion else None
        return {
            "task": task_name(self.choice),
            "model": self.model,
            "status": self.status,
            "content": choice.content if choice else None,
            "finish_reason": choice.finish_reason.value if choice and choice.finish_reason else None,
            "usage": _usage_json(usage),
            "ttft_ms": self.answer.ttft_ms if self.answer else None,
            "total_ms": self.answer.total_ms if self.answer else None,
            "error": self.error.message if self.error else None,
        }


def check_options(options: Mapping[str, Any]) -> None:
    """Validate config-level options (models may come with each request instead)."""
    try:
        _parse(options, n=None, require_models=False)
    except GatewayError as error:
        raise ValueError(error.message) from None


def _parse(options: Mapping[str, Any], *, n: int | None, require_models: bool = True) -> FanoutOptions:
    models = options.get("models")
    if models is None:
        if require_models:
            raise invalid_request(
                "The fanout pipeline needs models: send `workflow: {\"models\": [...]}` in the request "
                "or set `models` under [workflow.pipelines.fanout].",
                param=f"{_PARAM}.models",
            )
        models = []
    if not isinstance(models, list | tuple) or not all(isinstance(m, str) and m for m in models):
        raise invalid_request("`models` must be a list of model names.", param=f"{_PARAM}.models")
    if len(models) > MAX_MODELS:
        raise invalid_request(f"`models` takes at most {MAX_MODELS} models.", param=f"{_PARAM}.models")
    rule = options.get("rule", "first")
    if rule not in RULES:
        raise invalid_request(f"`rule` must be one of {', '.join(RULES)}, got {rule!r}.", param=f"{_PARAM}.rule")
    judge = options.get("judge_model")
    if judge is not None and (not isinstance(judge, str) or not judge):
        raise invalid_request("`judge_model` must be a model name.", param=f"{_PARAM}.judge_model")
    if rule == "judge" and judge is None and require_models:
        raise invalid_request("`rule = \"judge\"` needs `judge_model`.", param=f"{_PARAM}.judge_model")
    view = options.get("view")
    if view is not None and view not in VIEWS:
        raise invalid_request(f"`view` must be one of {', '.join(VIEWS)}, got {view!r}.", param=f"{_PARAM}.view")
    if view is None:
        view = "all" if n is not None and n > 1 and n == len(models) else "winner"
    if require_models and n is not None and n > 1 and n != len(models):
        raise invalid_request(
            f"`n` must be 1 or the number of fanout models ({len(models)}); with n = {len(models)} "
            "every model's answer is a choice of its own.",
            param="n",
        )
    return FanoutOptions(tuple(models), rule, judge, view)


# Client dialects whose answer has choices (`n`): the others show one answer.
_CHOICE_DIALECTS = frozenset({"openai"})


async def fanout(ctx: PipelineContext) -> PipelineResult:
    options = _parse(ctx.options, n=ctx.request.params.n)
    if options.view == "all" and ctx.request.dialect not in _CHOICE_DIALECTS:
        # Every model a choice of its own is a view an Anthropic, Ollama or Responses client
        # cannot show: it would get the first model's answer, whichever won. It gets the winner.
        options = replace(options, view="winner")
    if not options.models:
        raise invalid_request("`models` is empty.", param=f"{_PARAM}.models")
    for model in (*options.models, *([options.judge_model] if options.judge_model else [])):
        await ctx.llm.resolve(model)  # an unknown model is a 404 before anything streams
    select = options.view == "winner"
    await ctx.emit.announce_tasks(options.models, select=select)
    tasks = [_Task(i, model) for i, model in enumerate(options.models)]
    chosen: list[int] = []

    async with trio.open_nursery() as nursery:

        async def run(task: _Task) -> None:
            request = replace(ctx.request, model=task.model)
            try:
                task.answer = await ctx.llm.stream(request, into=ctx.emit.task(task.choice))
            except GatewayError as error:
                task.status, task.error = "failed", error
                return
            task.status, task.finished_at = "completed", time.monotonic()
            if options.rule == "first" and select and not chosen:
                chosen.append(task.choice)
                await ctx.emit.choose(task.choice)
                nursery.cancel_scope.cancel()  # nobody will read the others

        for task in tasks:
            nursery.start_soon(run, task)
    for task in tasks:
        if task.status == "running":
            task.status = "cancelled"

    done = [t for t in tasks if t.status == "completed"]
    if not done:
        raise _all_failed(tasks)
    judge_data: dict[str, Any] | None = None
    if chosen:
        winner = tasks[chosen[0]]
    elif options.rule == "first":
        winner = min(done, key=lambda t: (t.finished_at or 0.0, t.choice))
    elif options.rule == "judge":
        assert options.judge_model is not None
        winner, judge_data = await _judge(ctx, options.judge_model, done)
    else:
        winner = _longest(done)
    if not chosen:
        await ctx.emit.choose(winner.choice)
    # Every call, the losers a `first` winner cancelled and the judge's included: all were spent.
    usage = ctx.llm.spent
    if usage is not None:
        await ctx.emit.usage(UsageReport(usage))
    data: dict[str, Any] = {"rule": options.rule, "view": options.view, "tasks": [t.summary() for t in tasks]}
    if judge_data is not None:
        data["judge"] = judge_data
    return PipelineResult(
        completion=_answer(ctx, tasks, winner, select, usage),
        winner=winner.model,
        data=data,
    )


def _longest(done: list[_Task]) -> _Task:
    return max(done, key=lambda t: (len(_content(t)), -t.choice))


def _content(task: _Task) -> str:
    if task.answer is None or not task.answer.completion.choices:
        return ""
    return task.answer.completion.choices[0].content


async def _judge(
    ctx: PipelineContext, model: str, done: list[_Task]
) -> tuple[_Task, dict[str, Any]]:
    question = next((m.text for m in reversed(ctx.request.messages) if m.role == "user"), "")
    letters = [task_name(t.choice) for t in done]
    parts = [f"Request:\n{question}"]
    parts += [f"Answer {task_name(t.choice)}:\n{_content(t)}" for t in done]
    parts.append(f"Which answer is best? End your reply with `Answer: X`, X one of {', '.join(letters)}.")
    structured = ResponseFormat("json_schema", verdict_schema(letters), name="verdict", strict=True)
    request = ChatRequest(
        model=model,
        messages=[
            Message("system", (TextPart(JUDGE_SYSTEM),)),
            Message("user", (TextPart("\n\n".join(parts)),)),
        ],
        params=GenerationParams(temperature=0.0, max_tokens=JUDGE_MAX_TOKENS, response_format=structured),
    )
    try:
        try:
            verdict = await ctx.llm.complete(request)
        except GatewayError as error:
            if error.kind is not ErrorKind.INVALID_REQUEST:
                raise
            # A backend (or model) without structured output: the plain question.
            verdict = await ctx.llm.complete(replace(request, params=replace(request.params, response_format=None)))
    except GatewayError as error:
        fallback = _longest(done)
        return fallback, {"model": model, "error": error.message, "fallback": "longest"}
    reply = verdict.completion.choices[0].content if verdict.completion.choices else ""
    letter = parse_verdict(reply, letters)
    if letter is None:
        return _longest(done), {"model": model, "reply": reply, "fallback": "longest"}
    picked = next(t for t in done if task_name(t.choice) == letter)
    return picked, {"model": model, "reply": reply}


def _answer(
    ctx: PipelineContext, tasks: list[_Task], winner: _Task, select: bool, usage: Usage | None
) -> ChatCompletion:
    start = ctx.emit.result.start
    choices = []
    for task in [winner] if select else tasks:
        if task.answer is not None and task.answer.completion.choices:
            choice = replace(task.answer.completion.choices[0], index=0 if select else task.choice)
            choices.append(choice)
    return ChatCompletion(
        id=start.id if start else "",
        model=start.model if start else ctx.request.model,
        created=start.created if start else 0,
        choices=choices,
        usage=usage,
    )


def _usage_json(usage: Usage | None) -> dict[str, int] | None:
    if usage is None:
        return None
    return {"prompt_tokens": usage.prompt_tokens, "completion_tokens": usage.completion_tokens}


def _all_failed(tasks: list[_Task]) -> GatewayError:
    failed = [t for t in tasks if t.error is not None]
    if not failed:
        return GatewayError(ErrorKind.INTERNAL, "No fanout model completed.")
    first = failed[0].error
    assert first is not None
    if len(failed) == 1:
        return first
    detail = "; ".join(f"{task_name(t.choice)} ({t.model}): {t.error.message}" for t in failed if t.error)
    return GatewayError(first.kind, f"All {len(failed)} fanout models failed: {detail}", code=first.code)


# The registry validates a pipeline's config-level options through this attribute.
fanout.check_options = check_options  # type: ignore[attr-defined]
