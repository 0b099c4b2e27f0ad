"""About how long a stage will take on this machine, before it is launched.

``estimate_stage(name, config, workspace, profile)`` walks what the stage will do at these
settings (engine/stages/*.py: what it samples, trains, judges and scores, with which batch
sizes) over what is in the workspace now (demonstrations, the held-out split, the synthetic
rows, the RL prompts, the checkpoints), and prices each part with the local service's measured
speed (:class:`engine.backends.local.speed_profile.SpeedProfile`):

- sampling: each request's prompt prefill, then ``max_tokens`` decode steps at the number
  of rows in flight (the stage's concurrency, the service's 64-row cap). Every answer is
  assumed to run to ``max_tokens``: an upper bound (most stop sooner);
- training: tokens / the LoRA training rate, plus one optimizer step per step;
- judging (forced-choice verdicts: two scorings per order, both orders) and scoring
  (validation loss, likelihoods, reference log-probabilities): tokens / the prefill rate;
- model loads and checkpoint saves at their measured times.

Where an input is not there yet (synth-outputs before synth-inputs ran), it is estimated
from the config and the assumptions say so. Tokens are counted with the model's own
tokenizer and chat renderer when its folder is on disk (else about 4 characters a token).

Nothing here writes a file or loads a model. On the Tinker backend there is no estimate
(None): the time depends on the service.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from functools import lru_cache
from typing import TYPE_CHECKING, Any

from engine.errors import PersonaError

if TYPE_CHECKING:
    from engine.backends.local.speed_profile import SpeedProfile
    from engine.store.settings import PersonaConfig
    from engine.store.workspace import Workspace

CHARS_PER_TOKEN = 4.0  # when the model's tokenizer is not on disk
EMBEDDING_S = 10.0  # evaluate: loading MiniLM and embedding the samples (not profiled)
REPORT_S = 5.0  # evaluate: the report's plots

Messages = list[dict[str, str]]


class EstimateError(PersonaError):
    """No estimate: the stage cannot run as things are (the message says why)."""


UPPER_BOUND_NOTE = "every answer taken to run to max_tokens: an upper bound"


@dataclass(frozen=True)
class Estimate:
    """About how long one stage takes: total seconds, the parts, and what was assumed."""

    stage: str
    seconds: float
    parts: tuple[tuple[str, float], ...]
    assumptions: tuple[str, ...]
    where: str = ""  # e.g. "bf16, 2 threads"
    upper_bound: bool = False  # sampling: every answer taken to run to max_tokens

    def part(self, name: str) -> float:
        return sum(s for p, s in self.parts if p == name)

    def assumed(self) -> list[str]:
        """What the estimate assumes, in words (the upper bound included, where it is one)."""
        return [*self.assumptions, *([UPPER_BOUND_NOTE] if self.upper_bound else [])]

    def line(self, parts: int = 2) -> str:
        """One line for a status bar: "≤ 4 min on this machine (bf16, 2 threads) · 2.1 min
        sampling, 1.5 min training"."""
        if not self.parts:
            return f"no model: {self.assumptions[0] if self.assumptions else 'a moment'}"
        head = f"{self.total()} on this machine"
        if self.where:
            head += f" ({self.where})"
        top = self.top_parts(parts)
        return f"{head} · {top}" if top else head

    def total(self) -> str:
        """ "≤ 4 min" (an upper bound) or "≈ 4 min"."""
        return f"{'≤' if self.upper_bound else '≈'} {human_seconds(self.seconds)}"

    def top_parts(self, n: int) -> str:
        """The ``n`` largest parts of at least half a second: "2.1 min sampling, 40 s training"."""
        top = sorted((p for p in self.parts if p[1] >= 0.5), key=lambda p: -p[1])[:n]
        return ", ".join(f"{human_seconds(s)} {p}" for p, s in top)


def human_seconds(seconds: float) -> str:
    """5 s, 40 s, 2.1 min, 14 min, 1.3 h."""
    s = max(0.0, float(seconds))
    if s < 1:
        return "<1 s"
    if s < 90:
        return f"{s:.0f} s"
    m = s / 60
    if m < 10:
        return f"{m:.1f} min"
    if m < 90:
        return f"{m:.0f} min"
    return f"{m / 60:.1f} h"


# -- counting tokens ------------------------------------------------------------------------


class TokenCounter:
    """Token counts as the stages will send them: the model's chat renderer and tokenizer when
    its folder is on disk, else characters / 4 with a few tokens per message."""

    def __init__(self, renderer: Any = None, tokenizer: Any = None) -> None:
        self.renderer = renderer
        self.tokenizer = tokenizer
        self._cache: dict[Any, int] = {}

    @property
    def exact(self) -> bool:
        return self.renderer is not None

    def text(self, text: str) -> int:
        key = ("t", text)
        if key not in self._cache:
            if self.tokenizer is not None:
                n = len(self.tokenizer.encode(text, add_special_tokens=False))
            else:
                n = math.ceil(len(text) / CHARS_PER_TOKEN)
            self._cache[key] = n
        return self._cache[key]

    def _rough(self, messages: Messages) -> int:
        return sum(self.text(m["content"]) + 5 for m in messages) + 3

    def prompt(self, messages: Messages) -> int:
        """Tokens of the generation prompt for ``messages`` (what a sampling request prefills)."""
        return self._rendered("p", messages, lambda r: r.build_generation_prompt(messages).length)

    def conversation(self, messages: Messages) -> int:
        """Tokens of a whole conversation as trained on (its supervised example)."""
        return self._rendered(
            "c", messages, lambda r: r.build_supervised_example(messages)[0].length
        )

    def _rendered(self, kind: str, messages: Messages, length: Callable[[Any], int]) -> int:
        """``length(renderer)`` for ``messages``, cached; counted roughly without a renderer
        or when the renderer cannot take them."""
        key = (kind, tuple((m["role"], m["content"]) for m in messages))
        if key not in self._cache:
            n = None
            if self.renderer is not None:
                try:
                    n = int(length(self.renderer))
                except Exception:  # a renderer that cannot take it: count roughly
                    n = None
            self._cache[key] = n if n is not None else self._rough(messages)
        return self._cache[key]


@lru_cache(maxsize=8)
def _counter_for_dir(model: str, folder: str) -> TokenCounter:
    try:
        from transformers import AutoTokenizer

        from engine.backends.renderers import get_renderer_for

        tokenizer = AutoTokenizer.from_pretrained(folder)
        return TokenCounter(get_renderer_for(model, tokenizer), tokenizer)
    except Exception:  # an odd folder: count roughly rather than fail the estimate
        return TokenCounter()


def token_counter(model: str) -> TokenCounter:
    """The counter of a local model: exact when its folder is on disk (a registered model is
    never materialized here), rough otherwise."""
    from engine.backends.local.models import model_dir_if_present

    folder = model_dir_if_present(model)
    return TokenCounter() if folder is None else _counter_for_dir(model, str(folder.resolve()))


# -- pricing --------------------------------------------------------------------------------


def _user(text: str) -> Messages:
    return [{"role": "user", "content": text}]


def _system(system_prompt: str | None) -> Messages:
    return [{"role": "system", "content": system_prompt}] if system_prompt else []


def _mean(xs: Sequence[float], default: float = 0.0) -> float:
    return sum(xs) / len(xs) if xs else default


def _plural(n: int, word: str, plural: str | None = None) -> str:
    return f"{n} {word if n == 1 else (plural or word + 's')}"


@dataclass
class _Cost:
    """The parts of one stage's time, added as the stage would spend it."""

    config: PersonaConfig
    profiles: Callable[[str], SpeedProfile]
    parts: dict[str, float] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    loaded: set[str] = field(default_factory=set)
    samples: bool = False
    counters: dict[str, TokenCounter] = field(default_factory=dict)

    def add(self, part: str, seconds: float) -> None:
        self.parts[part] = self.parts.get(part, 0.0) + max(0.0, seconds)

    def note(self, text: str) -> None:
        if text not in self.notes:
            self.notes.append(text)

    def counter(self, role: str) -> TokenCounter:
        if role not in self.counters:  # asked once per comparison by the judge's parts
            self.counters[role] = token_counter(self.config.model(role))
        return self.counters[role]

    def judge_mode(self) -> str:
        """The judge's mode on the local backend (the only one estimated)."""
        from engine.stages.reward_model import mode_on

        return mode_on(self.config.reward_model.mode, "local")

    def profile(self, role: str) -> SpeedProfile:
        return self.profiles(self.config.model(role))

    def load(self, role: str) -> None:
        """The role's base model, loaded once per run whatever number of roles share it."""
        model = self.config.model(role)
        if model not in self.loaded:
            self.loaded.add(model)
            self.add("model load", self.profile(role).load_s)

    def sample(
        self,
        role: str,
        prompts: Sequence[int],
        *,
        rows: int,
        max_tokens: int,
        in_flight: int,
        part: str = "sampling",
    ) -> float:
        """``len(prompts)`` requests of ``rows`` answers each, at most ``in_flight`` requests
        at once (and 64 rows), every answer running to ``max_tokens``: so they start and end
        in waves. Each wave: its requests' prefill, then ``max_tokens`` - 1 steps."""
        from engine.backends.local.worker import MAX_BATCH_ROWS  # not at import: no torch

        p = self.profile(role)
        rows = max(1, int(rows))
        per_wave = max(1, min(int(in_flight), MAX_BATCH_ROWS // rows or 1))
        total = 0.0
        for start in range(0, len(prompts), per_wave):
            wave = prompts[start : start + per_wave]
            context = _mean(wave) + max_tokens / 2
            total += sum(p.join_s(n) for n in wave)
            total += max(0, max_tokens - 1) * p.step_s(len(wave) * rows, context)
        if prompts:
            self.samples = True
        self.add(part, total)
        return total

    def score(self, role: str, tokens: float, part: str = "scoring") -> float:
        """Forward passes without grad over ``tokens`` tokens (log-probabilities)."""
        s = tokens / self.profile(role).prefill_tokens_per_s
        self.add(part, s)
        return s

    def judge(self, comparisons: int, prompt_tokens: float, part: str = "judging") -> float:
        """Forced-choice verdicts (verdict mode where the client scores): A and B scored from
        one forward pass per order (the local service shares it), both orders: two forward
        passes of the judge prompt per comparison."""
        cfg = self.config
        mode = self.judge_mode()
        if comparisons <= 0:
            return 0.0
        if mode == "feedback":
            from engine.llm.judge import DEFAULT_MAX_TOKENS

            n = DEFAULT_MAX_TOKENS["feedback"]
            self.note(f"feedback-mode judge: 2 × ≤{n} tokens written per comparison")
            return self.sample(
                "judge",
                [int(prompt_tokens)] * (2 * comparisons),
                rows=1,
                max_tokens=n,
                in_flight=cfg.reward_model.concurrency,
                part=part,
            )
        return self.score("judge", 2 * comparisons * (prompt_tokens + 4), part=part)

    def train(self, role: str, steps: int, tokens_per_step: float, part: str = "training") -> float:
        p = self.profile(role)
        s = steps * (tokens_per_step / p.train_tokens_per_s + p.optim_step_s)
        self.add(part, s)
        return s

    def checkpoints(self, role: str, count: int) -> None:
        self.add("checkpoints", count * self.profile(role).checkpoint_s)


def _checkpoint_count(total_steps: int, every: int) -> int:
    """Periodic saves (not at the last step) plus the final one."""
    periodic = (total_steps - 1) // every if every and total_steps > 0 else 0
    return periodic + 1


def _eval_count(total_steps: int, every: int) -> int:
    """Steps with ``step % every == 0 or step == total``."""
    if not every or total_steps <= 0:
        return 0
    return total_steps // every + (0 if total_steps % every == 0 else 1)


def _demo_sampling(
    cost: _Cost, demos: list[dict[str, str]], system_prompt: str | None, what: str
) -> None:
    """baseline, prompting and every trained stage's sampling of the demonstrations."""
    cfg = cost.config.sampling
    counter = cost.counter("policy")
    prompts = [counter.prompt([*_system(system_prompt), *_user(d["input"])]) for d in demos]
    cost.sample("policy", prompts, rows=1, max_tokens=cfg.max_tokens, in_flight=cfg.concurrency)
    head = f"{what}: " if what else ""
    cost.note(f"{head}{_plural(len(demos), 'request')} × 1 answer × ≤{cfg.max_tokens} tokens")


# -- the stages -----------------------------------------------------------------------------


def _demos(cost: _Cost, ws: Workspace) -> None:
    cost.note("checks data/data.json in a moment")


def _baseline(cost: _Cost, ws: Workspace) -> None:
    cost.load("policy")
    _demo_sampling(cost, ws.load_demos(), None, "")


def _prompting(cost: _Cost, ws: Workspace) -> None:
    demos = ws.load_demos()
    only = [i for i in cost.config.prompting.only if 0 <= i < len(demos)]
    chosen = [demos[i] for i in dict.fromkeys(only)] if only else demos
    system_prompt = str(ws.load_prompts().get("system_prompt", "")).strip()
    cost.load("policy")
    _demo_sampling(cost, chosen, system_prompt, "with the system prompt")


def _split(cost: _Cost, ws: Workspace) -> Any:
    from engine.store.split import workspace_split

    return workspace_split(ws, cost.config.data, record=False)


def _seeds(cost: _Cost, prompts: Mapping[str, Any]) -> list[str]:
    seeds = [str(s) for s in prompts.get("seeds", [])]
    n = cost.config.synth_inputs.max_seeds
    return seeds[:n] if n > 0 else seeds


def _synth_inputs(cost: _Cost, ws: Workspace) -> None:
    from engine.store.templates import fill

    cfg = cost.config.synth_inputs
    prompts = ws.load_prompts()
    seeds = _seeds(cost, prompts)
    train = _split(cost, ws).train
    examples = "\n".join(
        f"{k + 1}. {d['input']}" for k, d in enumerate(train[: min(cfg.num_examples, len(train))])
    )
    template = prompts["templates"]["synth_inputs"]
    counter = cost.counter("teacher")
    attempts = 1 + cfg.retries
    calls = [
        counter.prompt(_user(fill(template, examples=examples, seed=s, n=cfg.per_seed)))
        for s in seeds
        for _ in range(attempts)
    ]
    cost.load("teacher")
    # attempts of one seed follow each other; seeds run side by side
    cost.sample(
        "teacher",
        calls,
        rows=1,
        max_tokens=cfg.max_tokens,
        in_flight=min(cfg.concurrency, max(1, len(seeds))),
    )
    cost.note(
        f"{_plural(len(seeds), 'seed')} × up to {_plural(attempts, 'teacher call')} "
        f"(retries while short) × ≤{cfg.max_tokens} tokens"
    )


def _synthetic_requests(cost: _Cost, ws: Workspace) -> list[dict[str, Any]]:
    """The synthetic requests synth-outputs will answer (rows with "input"): read, or, before
    synth-inputs has run, estimated from the config."""
    from engine.store import results

    path = ws.result(results.RESULT_FILES["synth-inputs"])
    if path.exists():
        loaded = results.read_synthetic_inputs(path)
        rows = [r for r in loaded.rows if str(r.get("input", "")).strip()]
        return rows
    cfg = cost.config.synth_inputs
    seeds = _seeds(cost, ws.load_prompts())
    demos = ws.load_demos()
    typical = max(demos, key=lambda d: len(d["input"]))["input"] if demos else "a request"
    n = len(seeds) * cfg.per_seed
    cost.note(
        f"synthetic_inputs.jsonl not written yet: assumed {n} requests "
        f"({len(seeds)} seeds × {cfg.per_seed}; the teacher usually writes fewer)"
    )
    return [{"id": f"in-{i + 1:04d}", "input": typical} for i in range(n)]


def _synth_outputs(cost: _Cost, ws: Workspace) -> None:
    from engine.store import results
    from engine.store.templates import fill

    cfg = cost.config.synth_outputs
    rows = _synthetic_requests(cost, ws)
    if cfg.limit > 0:
        rows = rows[: cfg.limit]
    existing = results.read_synthetic_rows(ws.result(results.RESULT_FILES["synth-outputs"]))
    kept = {results.row_key(r) for r in existing.rows if results.is_review_decision(r)}
    todo = [r for r in rows if (str(r.get("id")), r["input"]) not in kept]
    if len(todo) < len(rows):
        cost.note(f"{len(rows) - len(todo)} reviewed rows kept, not answered again")
    prompts = ws.load_prompts()
    system_prompt = str(prompts.get("system_prompt", "")).strip()
    counter = cost.counter("teacher")
    cost.load("teacher")
    first = [counter.prompt([*_system(system_prompt), *_user(r["input"])]) for r in todo]
    kw = {"rows": 1, "max_tokens": cfg.max_tokens, "in_flight": cfg.concurrency}
    cost.sample("teacher", first, **kw)
    calls = 1
    if cfg.critique:  # critique, then revise: each prompt also holds the draft (and critique)
        calls = 3
        templates = prompts["templates"]
        crit = counter.prompt(
            _user(fill(templates["critique"], system_prompt=system_prompt, request="", draft=""))
        )
        rev = counter.prompt(_user(fill(templates["revise"], request="", draft="", critique="")))
        cost.sample(
            "teacher",
            [crit + counter.text(r["input"]) + cfg.max_tokens for r in todo],
            **kw,
        )
        cost.sample(
            "teacher",
            [n - counter.prompt(_user("")) + rev + 2 * cfg.max_tokens for n in first],
            **kw,
        )
    cost.note(
        f"{_plural(len(todo), 'request')} × {_plural(calls, 'teacher call')} × "
        f"≤{cfg.max_tokens} tokens"
    )


def _sft(cost: _Cost, ws: Workspace) -> None:
    from engine.stages.sft import plan_training, training_conversations
    from engine.store import results

    cfg = cost.config.sft
    path = ws.result(results.RESULT_FILES["synth-outputs"])
    counter = cost.counter("policy")
    if path.exists():
        convs, how = training_conversations(results.read_synthetic_rows(path).rows, cfg)
        if not convs:
            raise EstimateError(f"{ws.rel(path)} has no training rows ({how})")
        lengths = [counter.conversation(c) for c in convs]
    else:
        reqs = _synthetic_requests(cost, ws)
        answer = cost.config.synth_outputs.max_tokens
        system_prompt = str(ws.load_prompts().get("system_prompt", "")).strip()
        system = _system(system_prompt if cfg.use_system_prompt else None)
        lengths = [
            counter.conversation(
                [*system, *_user(r["input"]), {"role": "assistant", "content": ""}]
            )
            + answer
            for r in reqs
        ]
        cost.note(f"synthetic rows not written yet: each answer taken as {answer} tokens")
    if cfg.too_long == "drop":
        lengths = [n for n in lengths if n <= cfg.max_length] or [cfg.max_length]
    lengths = [min(n, cfg.max_length) for n in lengths]
    plan = plan_training([[{"role": "user", "content": ""}]] * len(lengths), cfg)  # counts only
    n_val, train_n = len(plan.val_convs), len(plan.train_convs)
    batch, steps = plan.batch_size, plan.total_steps
    mean_len = _mean(lengths)
    cost.load("policy")
    cost.train("policy", steps, batch * mean_len)
    if n_val:
        cost.score("policy", (1 + _eval_count(steps, cfg.eval_every)) * n_val * mean_len)
    cost.checkpoints("policy", _checkpoint_count(steps, cfg.checkpoint_every))
    cost.note(
        f"{train_n} train / {n_val} val rows of ~{mean_len:.0f} tokens; "
        f"{_plural(steps, 'step')} of {batch}"
    )
    if cfg.sample_after:
        system_prompt = str(ws.load_prompts().get("system_prompt", "")).strip()
        _demo_sampling(
            cost,
            ws.load_demos(),
            system_prompt if cfg.use_system_prompt else None,
            "then sampled",
        )


def _judge_prompt_tokens(cost: _Cost, comparison: Any) -> int:
    from engine.llm.judge import judge_messages

    return cost.counter("judge").prompt(judge_messages(comparison, cost.judge_mode()))


def _method_rows(ws: Workspace, stage: str) -> list[dict[str, Any]]:
    from engine.store import results

    return list(results.read_method_outputs(ws.result(results.RESULT_FILES[stage])).rows)


def _validation(cost: _Cost, ws: Workspace) -> bool:
    """reward-model's check on baseline vs SFT outputs (False: the files are not there)."""
    from engine.llm.judge import Comparison

    base = {" ".join(r["input"].split()): r for r in _method_rows(ws, "baseline")}
    sft = {" ".join(r["input"].split()): r for r in _method_rows(ws, "sft")}
    shared = [k for k in base if k in sft]
    if not shared:
        return False
    rubric = str(ws.load_prompts().get("rubric", "")).strip()
    tokens = [
        _judge_prompt_tokens(
            cost,
            Comparison(_user(base[k]["input"]), base[k]["output"], sft[k]["output"], rubric),
        )
        for k in shared
    ]
    cost.judge(len(shared), _mean(tokens), part="validation")
    cost.note(f"validation: {_plural(len(shared), 'comparison')}, both orders")
    return True


def _reward_model(cost: _Cost, ws: Workspace) -> None:
    from engine.llm.judge import training_messages
    from engine.stages.reward_model import (
        OWN_SOURCES,
        build_own_pairs,
        canonical_examples,
        split_own_pairs,
    )

    cfg = cost.config.reward_model
    mode = cost.judge_mode()
    cost.load("judge")
    counter = cost.counter("judge")
    if cfg.train and not cfg.validate_only:
        train: list[Any] = []
        held: list[Any] = []
        rubric = str(ws.load_prompts().get("rubric", "")).strip()
        if cfg.own_pairs:
            rows = {src: _method_rows(ws, src) for src in OWN_SOURCES}
            own = build_own_pairs(
                _split(cost, ws).train, {k: v for k, v in rows.items() if v}, rubric
            )
            own_train, own_held = split_own_pairs(own, cfg.seed)
            train += own_train
            held += own_held
        lengths = [
            counter.conversation(training_messages(e.comparison, e.preference, e.feedback, mode))
            for e in train
        ]
        lengths = [n for n in lengths if n <= cfg.max_length]
        if cfg.dataset:
            extra = max(0, cfg.max_examples - cfg.heldout_examples)
            lengths += [cfg.max_length] * extra
            cost.note(
                f"dataset: {extra} rows assumed of up to {cfg.max_length} tokens "
                f"({cfg.heldout_examples} held out, not counted)"
            )
        if not lengths:
            raise EstimateError(
                "no judge training data yet: run baseline and prompting (your own pairs), or "
                "set reward_model.dataset"
            )
        batch = min(cfg.batch_size, len(lengths))
        steps = cfg.steps if cfg.steps > 0 else max(1, math.ceil(len(lengths) / batch))
        cost.train("judge", steps, batch * _mean(lengths))
        cost.checkpoints("judge", _checkpoint_count(steps, cfg.checkpoint_every))
        canon = canonical_examples(held)
        if canon:
            evals = 2 + (
                (steps - 1) // cfg.checkpoint_every if cfg.checkpoint_every and steps > 0 else 0
            )
            tokens = _mean([_judge_prompt_tokens(cost, e.comparison) for e in canon])
            cost.judge(evals * len(canon), tokens, part="judging")
            cost.note(f"held-out accuracy {evals}×: {_plural(len(canon), 'comparison')}")
        cost.note(
            f"{len(lengths)} comparisons of ~{_mean(lengths):.0f} tokens; "
            f"{_plural(steps, 'step')} of {batch}"
        )
    elif not cfg.train:
        cost.note("reward_model.train = false: no training")
    if cfg.validate or cfg.validate_only:
        _judge_accuracy(cost, ws, judges=2 if cfg.train and not cfg.validate_only else 1)
        if not _validation(cost, ws):
            cost.note("no baseline and SFT outputs yet: validation skipped")


def _judge_accuracy(cost: _Cost, ws: Workspace, judges: int) -> None:
    """The judge's accuracy check (engine.llm.judge_accuracy): base and few-shot samples for
    each held-out request (drawn once, then kept), and every judge's verdicts on the person's
    text against each of them."""
    from engine.llm.judge import Comparison
    from engine.llm.judge_accuracy import ACCURACY_SAMPLES
    from engine.store.results import JUDGE_ACCURACY_FILE

    held = _split(cost, ws).holdout
    if not held:
        return
    if not ws.result(JUDGE_ACCURACY_FILE).exists():
        cost.load("policy")
        counter = cost.counter("policy")
        prompts = [int(counter.prompt(_user(d["input"]))) for d in held]
        for _ in ("base", "few-shot"):
            cost.sample(
                "policy",
                prompts,
                rows=ACCURACY_SAMPLES,
                max_tokens=cost.config.sampling.max_tokens,
                in_flight=cost.config.reward_model.concurrency,
                part="judge accuracy",
            )
    rubric = str(ws.load_prompts().get("rubric", "")).strip()
    n = len(held) * 2 * ACCURACY_SAMPLES
    tokens = _judge_prompt_tokens(
        cost, Comparison(_user(held[0]["input"]), held[0]["output"], held[0]["output"], rubric)
    )
    cost.judge(judges * n, tokens, part="judge accuracy")
    cost.note(f"judge accuracy: {judges} × {_plural(n, 'comparison')} on held-out requests")


def _rl_prompts(cost: _Cost, ws: Workspace) -> None:
    from engine.stages.rl_prompts import DEFAULT_CALLS
    from engine.store.templates import fill

    cfg = cost.config.rl_prompts
    calls = cfg.teacher_calls if cfg.teacher_calls > 0 else DEFAULT_CALLS["local"]
    prompts = ws.load_prompts()
    template = prompts["templates"].get("rl_prompts") or prompts["templates"]["synth_inputs"]
    train = _split(cost, ws).train
    if not train:
        raise EstimateError("no training demonstrations")
    seeds = [str(s) for s in prompts.get("seeds", [])] or [""]
    longest = max(train, key=lambda d: len(d["input"]))["input"]
    counter = cost.counter("teacher")
    prompt = counter.prompt(
        _user(fill(template, examples=f"1. {longest}", seed=max(seeds, key=len), n=cfg.per_call))
    )
    cost.load("teacher")
    cost.sample(
        "teacher", [prompt] * calls, rows=1, max_tokens=cfg.max_tokens, in_flight=cfg.concurrency
    )
    cost.note(f"{_plural(calls, 'teacher call')} × ≤{cfg.max_tokens} tokens")


def _rl_rows(ws: Workspace, name: str) -> list[dict[str, Any]] | None:
    from engine.store import results

    path = ws.result(name)
    if not path.exists():
        return None
    return list(results.read_rl_prompts(path).rows)


def _registry_entry(ws: Workspace, stage: str) -> dict[str, Any] | None:
    from engine.store.checkpoints import read_registry

    entry = read_registry(ws.results_dir).get(stage)
    return entry if isinstance(entry, dict) else None


def _rlaif(cost: _Cost, ws: Workspace) -> None:
    from engine.llm.judge import Comparison, matchups
    from engine.stages.rlaif import CHUNK
    from engine.store.results import RL_DEV_FILE, RL_TRAIN_FILE

    cfg = cost.config.rlaif
    prompts = ws.load_prompts()
    system_prompt = str(prompts.get("system_prompt", "")).strip()
    rubric = str(prompts.get("rubric", "")).strip()
    counter = cost.counter("policy")
    train_rows = _rl_rows(ws, RL_TRAIN_FILE)
    if train_rows:
        convs = [
            [
                {"role": str(m.get("role")), "content": str(m.get("content", ""))}
                for m in r.get("prompt_conversation", [])
            ]
            for r in train_rows
        ]
    else:
        demos = _split(cost, ws).train or ws.load_demos()
        convs = [[*_system(system_prompt), *_user(d["input"])] for d in demos]
        cost.note("rl_train_data.jsonl not written yet: prompts taken as long as the demos'")
    dev_rows = _rl_rows(ws, RL_DEV_FILE)
    if dev_rows is not None:
        dev_convs = [
            [
                {"role": str(m.get("role")), "content": str(m.get("content", ""))}
                for m in r.get("prompt_conversation", [])
                if m.get("role") != "system"
            ]
            for r in dev_rows[: cfg.dev_prompts]
        ]
    else:
        n_dev = min(cfg.dev_prompts, cost.config.rl_prompts.dev_size)
        dev_convs = [[m for m in c if m["role"] != "system"] for c in convs[:1]] * n_dev
    batch = min(cfg.batch_size, len(convs))
    prompt = _mean([counter.prompt(c) for c in convs])
    dev_prompt = _mean([counter.prompt(c) for c in dev_convs])
    group, steps, n = cfg.group_size, cfg.steps, cfg.max_tokens
    cost.load("policy")
    rule_judge = cfg.judge == "shorter"
    if not rule_judge:
        cost.load("judge")
    sft = _registry_entry(ws, "sft")
    if cfg.init == "sft" and sft and sft.get("finished") and sft.get("state_path"):
        cost.checkpoints("policy", 1)  # reading the SFT state back, about a save's time
        cost.note("starts from the SFT checkpoint")
    pairs = len(matchups(group, CHUNK))
    judge_prompt = (
        _judge_prompt_tokens(cost, Comparison(convs[0], "", "", rubric)) + 2 * n if convs else 0
    )
    seq = prompt + n  # a sampled sequence, its prompt included
    for _ in range(steps):
        cost.sample("policy", [int(prompt)] * batch, rows=group, max_tokens=n, in_flight=batch)
        if not rule_judge:
            cost.judge(batch * pairs, judge_prompt)
        cost.score("policy", batch * group * seq)  # the initial policy's logprobs (KL)
        cost.train("policy", 1, batch * group * seq)
    evals = _eval_count(steps, cfg.eval_every)
    if evals and dev_convs:
        for _ in range(2 * evals):  # current and initial policy: separate batches
            cost.sample(
                "policy",
                [int(dev_prompt)] * len(dev_convs),
                rows=1,
                max_tokens=n,
                in_flight=len(dev_convs),
                part="dev evaluation",
            )
        if not rule_judge:
            cost.judge(evals * len(dev_convs), judge_prompt, part="dev evaluation")
    cost.checkpoints("policy", _checkpoint_count(steps, cfg.checkpoint_every))
    cost.note(
        f"{_plural(steps, 'step')} × {batch} prompts × {group} samples × ≤{n} tokens; "
        f"{_plural(batch * pairs, 'matchup')} a step"
        + (" (rule judge)" if rule_judge else ", both orders")
    )
    if evals and dev_convs:
        cost.note(f"dev win rate {evals}×: {_plural(len(dev_convs), 'dev prompt')}")
    if cfg.sample_after:
        _demo_sampling(cost, ws.load_demos(), system_prompt or None, "then sampled")


def _ditto(cost: _Cost, ws: Workspace) -> None:
    cfg = cost.config.ditto
    split = _split(cost, ws)
    train = list(split.train[: cfg.num_demos] if cfg.num_demos else split.train)
    if not train:
        raise EstimateError("no training demonstrations")
    counter = cost.counter("policy")
    demo_len = [
        min(counter.conversation(_conv(d["input"], d["output"])), cfg.max_length) for d in train
    ]
    prompt = [counter.prompt(_user(d["input"])) for d in train]
    sample_len = [min(p + cfg.max_tokens + 1, cfg.max_length) for p in prompt]
    b = min(cfg.batch_prompts, len(train))
    cost.load("policy")
    cost.train("policy", cfg.sft_max_steps, b * _mean(demo_len))
    cost.checkpoints("policy", 1 + cfg.rounds)
    n_pairs = b * cfg.pairs_per_prompt
    # a pair is the demonstration or a sample against a sample: about one of each
    seqs = n_pairs * (_mean(demo_len) + _mean(sample_len))
    for _ in range(cfg.rounds):
        cost.score("policy", _mean(demo_len))  # the reference on one demonstration
        cost.sample(
            "policy",
            prompt,
            rows=cfg.samples_per_demo,
            max_tokens=cfg.max_tokens,
            in_flight=cost.config.sampling.concurrency,
        )
        for _ in range(cfg.steps_per_round):
            cost.score("policy", seqs)  # reference log-probabilities (new sequences)
            cost.train("policy", 1, seqs)
    cost.note(
        f"SFT init: up to {_plural(cfg.sft_max_steps, 'step')} of {b} (stops early below "
        f"loss {cfg.sft_stop_loss})"
    )
    cost.note(
        f"{_plural(cfg.rounds, 'round')}: {len(train)} demos × {cfg.samples_per_demo} samples × "
        f"≤{cfg.max_tokens} tokens, {cfg.steps_per_round} DPO steps of {n_pairs} pairs"
    )
    if cfg.sample_after:
        _demo_sampling(cost, ws.load_demos(), None, "then sampled")


def _conv(request: str, answer: str) -> Messages:
    return [{"role": "user", "content": request}, {"role": "assistant", "content": answer}]


def _evaluate(cost: _Cost, ws: Workspace) -> None:
    from engine.llm.judge import Comparison
    from engine.store.checkpoints import read_registry
    from engine.store.results import RL_DEV_FILE

    cfg = cost.config.evaluate
    split = _split(cost, ws)
    held, train = split.holdout, split.train
    if not held:
        raise EstimateError("no demonstration is held out: evaluate has nothing to measure")
    prompts = ws.load_prompts()
    system_prompt = str(prompts.get("system_prompt", "")).strip()
    rubric = str(prompts.get("rubric", "")).strip()
    few = train[: cfg.few_shot_examples] if cfg.few_shot_examples else train
    # (name, adapter group, context before the request)
    methods: list[tuple[str, str, Messages]] = [("baseline", "base", [])]
    if system_prompt:
        methods.append(("prompting", "base", _system(system_prompt)))
    methods.append(("few-shot", "base", [m for d in few for m in _conv(d["input"], d["output"])]))
    policy = cost.config.model("policy")
    for name, entry in read_registry(ws.results_dir).items():
        if name == "reward-model" or not isinstance(entry, dict) or not entry.get("sampler_path"):
            continue
        if (entry.get("base_model") or policy) != policy:
            continue
        if entry.get("backend") not in (None, "local"):
            continue
        use_system = bool(entry.get("use_system_prompt", False))
        methods.append((name, name, _system(system_prompt) if use_system else []))
    if cfg.methods:
        methods = [m for m in methods if m[0] in cfg.methods]
        if not methods:
            raise EstimateError(f"evaluate.methods = {list(cfg.methods)}: none has results")
    counter = cost.counter("policy")
    cost.load("policy")
    use_judge = cfg.judge and len(methods) >= 2 and bool(rubric)
    if use_judge:
        cost.load("judge")
    # 1. likelihood of the held-out texts
    cost.score(
        "policy",
        sum(
            counter.conversation([*ctx, *_conv(d["input"], d["output"])])
            for _, _, ctx in methods
            for d in held
        ),
    )
    # 2. samples: one batch per adapter (the base methods share one)
    groups: dict[str, list[int]] = {}
    for _, group, ctx in methods:
        groups.setdefault(group, []).extend(
            counter.prompt([*ctx, *_user(d["input"])]) for d in held
        )
    for prompts_of in groups.values():
        cost.sample(
            "policy",
            prompts_of,
            rows=cfg.samples,
            max_tokens=cfg.max_tokens,
            in_flight=cfg.concurrency,
        )
    cost.note(
        f"{len(methods)} methods × {len(held)} held-out requests × {cfg.samples} samples × "
        f"≤{cfg.max_tokens} tokens"
    )
    if cfg.embedding:
        cost.add("embeddings", EMBEDDING_S)
    # 3. the judge
    if use_judge:
        m = len(methods)
        held_pairs = m * (m - 1) // 2 * len(held) * cfg.samples
        comp = Comparison(_user(held[0]["input"]), "", "", rubric, reference=held[0]["output"])
        judge_prompt = _judge_prompt_tokens(cost, comp) + 2 * cfg.max_tokens
        cost.judge(held_pairs, judge_prompt)
        dev_rows = _rl_rows(ws, RL_DEV_FILE) if cfg.dev_prompts else None
        n_dev = len(dev_rows[: cfg.dev_prompts]) if dev_rows else 0
        if n_dev and any(name == "baseline" for name, _, _ in methods):
            from engine.stages.evaluate import dev_turns  # the stage's own reading

            turns = [t for t in (dev_turns(r) for r in dev_rows[:n_dev]) if t]
            dev_prompt = _mean([counter.prompt(t) for t in turns])
            for group in groups:
                size = sum(1 for _, g, _ in methods if g == group)
                cost.sample(
                    "policy",
                    [int(dev_prompt)] * (size * n_dev),
                    rows=1,
                    max_tokens=cfg.max_tokens,
                    in_flight=cfg.concurrency,
                )
            dev_comp = Comparison(_user(""), "", "", rubric)
            cost.judge(
                (m - 1) * n_dev,
                _judge_prompt_tokens(cost, dev_comp) + dev_prompt + 2 * cfg.max_tokens,
            )
            cost.note(f"dev win rates: {_plural(n_dev, 'dev prompt')} per method")
        cost.note(f"judge: {_plural(held_pairs, 'held-out comparison')}, both orders")
        # The stage's accuracy check: your held-out text against each base and few-shot sample.
        comparators = sum(1 for name, _, _ in methods if name in ("baseline", "few-shot"))
        if comparators:
            n = comparators * len(held) * cfg.samples
            cost.judge(n, judge_prompt, part="judge accuracy")
            cost.note(f"judge accuracy: {_plural(n, 'comparison')} with your held-out text")
    cost.add("report", REPORT_S)


_STAGES: dict[str, Callable[[_Cost, Any], None]] = {
    "demos": _demos,
    "baseline": _baseline,
    "prompting": _prompting,
    "synth-inputs": _synth_inputs,
    "synth-outputs": _synth_outputs,
    "sft": _sft,
    "reward-model": _reward_model,
    "rl-prompts": _rl_prompts,
    "rlaif": _rlaif,
    "ditto": _ditto,
    "evaluate": _evaluate,
}
PART_ORDER = (
    "model load",
    "sampling",
    "training",
    "scoring",
    "judging",
    "validation",
    "dev evaluation",
    "checkpoints",
    "embeddings",
    "report",
)


def estimate_stage(
    stage_name: str,
    config: PersonaConfig,
    workspace: Workspace,
    profile: SpeedProfile | Mapping[str, SpeedProfile],
) -> Estimate | None:
    """About how long ``stage_name`` takes at ``config`` on this workspace, priced with
    ``profile`` (one profile, or one per model name: a model without its own is priced with
    the first). None on the Tinker backend. Raises :class:`EstimateError` when the stage
    cannot run as things are (the message says why)."""
    if config.backend.name != "local":
        return None
    fn = _STAGES.get(stage_name)
    if fn is None:
        raise EstimateError(f"no estimate for stage {stage_name!r}")
    if isinstance(profile, Mapping):
        by_model = dict(profile)
        if not by_model:
            raise EstimateError("no speed profile")
        first = next(iter(by_model.values()))
    else:
        by_model, first = {}, profile
    cost = _Cost(config, lambda model: by_model.get(model, first))
    fn(cost, workspace)
    missing = sorted(cost.loaded - by_model.keys())
    if by_model and missing:
        cost.note(f"{', '.join(missing)} timed at {first.key.model}'s speed")
    if any(not token_counter(m).exact for m in cost.loaded):
        cost.note("tokens counted roughly (4 characters a token): the model is not on disk yet")
    order = {p: i for i, p in enumerate(PART_ORDER)}
    parts = tuple(
        sorted(((p, s) for p, s in cost.parts.items()), key=lambda x: order.get(x[0], 99))
    )
    key = first.key
    where = f"{first.dtype_label}, {_plural(key.threads, 'thread')}"
    return Estimate(
        stage=stage_name,
        seconds=sum(s for _, s in parts),
        parts=parts,
        assumptions=tuple(cost.notes),
        where=where,
        upper_bound=cost.samples,
    )


# -- the profiles an estimate needs ------------------------------------------------------------


def local_models(config: PersonaConfig) -> list[str]:
    """The distinct models of the policy, teacher and judge roles, in that order."""
    from engine.store.config import ROLES

    return list(dict.fromkeys(config.model(r) for r in ROLES))


def cached_profiles(config: PersonaConfig) -> tuple[dict[str, SpeedProfile], list[str]]:
    """(the profiles in the cache for the config's models on this machine, the models to
    measure). A model whose profile was measured at another thread count than the service
    would use now is in both: priced with that profile until its own is measured."""
    from engine.backends.local import speed_profile as sp

    found: dict[str, SpeedProfile] = {}
    to_measure: list[str] = []
    for model in local_models(config):
        key = sp.current_key(model, threads=config.local.threads, dtype=config.local.dtype)
        profile = sp.nearest_profile(key)
        if profile is not None:
            found[model] = profile
        if profile is None or profile.key != key:
            to_measure.append(model)
    return found, to_measure


def measure_profiles(
    config: PersonaConfig,
    models: Sequence[str] | None = None,
    *,
    remeasure: bool = False,
    should_stop: Callable[[], bool] = lambda: False,
) -> dict[str, SpeedProfile]:
    """Measure (or read from the cache) the profile of each of ``models`` (default: the
    config's) with the config's dtype and threads, as the service would run them."""
    from engine.backends.local import speed_profile as sp
    from engine.backends.local.models import choose_compute

    dtype = None if config.local.dtype == "auto" else config.local.dtype
    plan = choose_compute(None, dtype)
    return {
        m: sp.ensure_profile(
            m, plan, threads=config.local.threads, remeasure=remeasure, should_stop=should_stop
        )
        for m in (models if models is not None else local_models(config))
    }


__all__ = [
    "Estimate",
    "EstimateError",
    "TokenCounter",
    "cached_profiles",
    "estimate_stage",
    "human_seconds",
    "local_models",
    "measure_profiles",
]
