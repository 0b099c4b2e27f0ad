"""One lifecycle for every training stage: reuse, resume or start fresh; save; record.

sft, reward-model, rlaif, ditto (and ditto's SFT initialisation, ``sft-demos``) each build a
:class:`TrainRun` from what they train on and their config section, then:

    run = TrainRun(ctx, "sft", settings=section_settings(cfg, "sft"), inputs={...}, total=40)
    decision = run.decide()           # Reuse | Resume(step) | Fresh, with the reason in words
    yield run.explain(decision)
    if decision.action == "reuse": ...sample or validate only...; return
    for ev in await run.start(decision, new_client): yield ev
    async for ev in run.steps(one_step, label="sft: steps"): yield ev

The fingerprint is the whole config section (minus :data:`NOT_FINGERPRINTED`, settings that
cannot change the trained weights) and the inputs (data, base model, init and judge
checkpoints, backend, held-out split, optimizer). A resume must meet the same fingerprint as a
reuse; only the length of training (steps, rounds) may differ: a run that grew continues from
where it stopped, and says so. Both the settings and the inputs are recorded with every
checkpoint in results/checkpoints.toml, so the decision can name what changed.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import Any, Literal

import tinker

from engine.run.context import StageCancelled, StageContext
from engine.run.events import CheckpointSaved, Event, LogLine, Progress
from engine.run.futures import resolve
from engine.store.checkpoints import latest_checkpoint, update_entry

# Settings that cannot change the trained weights: a rerun with other values reuses or resumes.
NOT_FINGERPRINTED = (
    "resume",  # whether to reuse at all
    "sample_after",  # sampling after training reads the weights, never writes them
    "checkpoint_every",  # when weights are saved, not what they are
    "concurrency",  # requests in flight
    "eval_every",  # how often a held-out measure is logged (sft: val loss; rlaif: dev win rate)
    "dev_prompts",  # rlaif: the size of that dev evaluation
    "validate",  # reward-model: the check after training
    "validate_only",
    "rubric",  # reward-model: the rubric of that check
    "train",  # reward-model: whether to train at all (false uses the base judge)
    "combine",  # reward-model: how a verdict is read from both orders (rlaif fingerprints it)
    "tie_margin",  # reward-model: the same
)

Action = Literal["reuse", "resume", "fresh"]


@dataclass(frozen=True)
class Decision:
    action: Action
    why: str
    step: int = 0  # where a resume continues
    entry: Mapping[str, Any] | None = None


def section_settings(
    section: Any,
    name: str,
    *,
    only: Callable[[str], bool] = lambda _k: True,
) -> dict[str, Any]:
    """Every setting of a config section, keyed ``section.key`` (lists for tuples)."""
    return {
        f"{name}.{k}": list(v) if isinstance(v, tuple) else v
        for k, v in vars(section).items()
        if only(k)
    }


def optimizer_settings(ctx: StageContext) -> dict[str, Any]:
    return section_settings(ctx.config.optimizer, "optimizer")


def adam(ctx: StageContext, lr: float) -> tinker.AdamParams:
    """AdamW at ``lr`` with the [optimizer] section's betas, eps and weight decay."""
    o = ctx.config.optimizer
    return tinker.AdamParams(
        learning_rate=lr, beta1=o.beta1, beta2=o.beta2, eps=o.eps, weight_decay=o.weight_decay
    )


def digest(value: Any) -> str:
    """A short, stable hash of any JSON-able value (training data, conversations)."""
    return hashlib.sha256(json.dumps(value, sort_keys=True).encode()).hexdigest()[:16]


def _plain(value: Any) -> Any:
    """A value TOML can hold (no None)."""
    if value is None:
        return "none"
    if isinstance(value, tuple | list):
        return [_plain(v) for v in value]
    return value


def step_name(step: int) -> str:
    """The name of a periodic checkpoint (``final`` is the last one)."""
    return f"step-{step:06d}"


class TrainRun:
    """The reuse/resume/fresh decision, the training client, saving and recording for one
    stage's training.

    ``settings`` are the stage's config values (``section.key``, see :func:`section_settings`;
    the [optimizer] section is added); those in :data:`NOT_FINGERPRINTED` are recorded but not
    fingerprinted. ``length_keys`` name the
    settings that only set how long training runs (kept out of the fingerprint when
    ``growable``: a finished run whose length grew continues). ``fields`` are recorded with
    every checkpoint (base_model, holdout, ...). ``extras`` is called at each save and returns
    more fields to record (what a stage keeps beside its weights: DITTO's replay buffer).
    """

    def __init__(
        self,
        ctx: StageContext,
        stage: str,
        *,
        section: str,
        settings: Mapping[str, Any],
        inputs: Mapping[str, Any],
        total: int,
        length_keys: tuple[str, ...] = (),
        growable: bool = True,
        unit: str = "step",
        counter: str = "step",
        fields: Mapping[str, Any] | None = None,
        extras: Callable[[str, int, bool], Awaitable[dict[str, Any]]] | None = None,
        names: Callable[[int, bool], str] | None = None,
    ) -> None:
        self.ctx = ctx
        self.stage = stage
        self.section = section
        all_settings = {k: _plain(v) for k, v in {**settings, **optimizer_settings(ctx)}.items()}
        out = {k for k in all_settings if k.split(".", 1)[-1] in NOT_FINGERPRINTED}
        if growable:
            out |= set(length_keys)
        self.settings = {k: v for k, v in all_settings.items() if k not in out}
        self.other_settings = {k: v for k, v in all_settings.items() if k in out}
        self.inputs = {k: _plain(v) for k, v in {**inputs, "backend": ctx.backend}.items()}
        self.total = total
        self.growable = growable
        self.length_keys = length_keys
        self.unit = unit
        self.counter = counter  # the registry field that holds how far training got
        self.fields = dict(fields or {})
        self.extras = extras
        self.names = names or (lambda n, finished: "final" if finished else step_name(n))
        self.fingerprint = digest([self.settings, self.inputs])
        self.tc: Any = None
        self.saved: CheckpointSaved | None = None  # the last checkpoint this run saved
        self.step = 0
        self.last_saved = 0
        self.stopped_early = False
        self._fresh = True

    # -- the decision ------------------------------------------------------------------

    @property
    def resume_setting(self) -> str:
        return f"{self.section}.resume"

    def decide(self, *, resume: bool = True) -> Decision:
        """Reuse the finished run, resume the unfinished one, or start fresh, and why."""
        prev = latest_checkpoint(self.ctx.workspace.results_dir, self.stage)
        if not resume:
            return Decision("fresh", f"{self.resume_setting} = false: training from the start")
        if not prev or not (prev.get("state_path") or prev.get("sampler_path")):
            return Decision("fresh", "no earlier run: training from the start")
        changed = self._changes(prev)
        if changed:
            return Decision("fresh", f"{changed}: training from the start", entry=prev)
        done = int(prev.get(self.counter, 0))
        before = int(prev.get(f"total_{self.counter}s", done))
        u = self.unit
        if prev.get("finished"):
            if not prev.get("sampler_path"):
                return Decision("fresh", "the finished run recorded no weights", entry=prev)
            if self.total == before or (prev.get("stopped_early") and done <= self.total):
                why = f"training already finished with these settings ({done} {u}s"
                why += ", stopped early" if prev.get("stopped_early") else ""
                why += f", {prev['sampler_path']}): reusing it"
                return Decision("reuse", why, entry=prev)
            if self.total > done and prev.get("state_path"):
                return Decision(
                    "resume",
                    f"{self._length_name()} grew from {before} to {self.total}: continuing "
                    f"the finished run from {u} {done}",
                    done,
                    prev,
                )
            return Decision(
                "fresh",
                f"{self._length_name()} is now {self.total}, below the {done} {u}s already "
                "trained: training from the start",
                entry=prev,
            )
        if not prev.get("state_path") or done > self.total:
            return Decision(
                "fresh",
                f"the unfinished run (at {u} {done}) cannot continue to {self.total}: "
                "training from the start",
                entry=prev,
            )
        why = f"resuming from {u} {done} of {self.total} (the unfinished run's checkpoint)"
        if before != self.total:
            why += f" ({self._length_name()} changed from {before})"
        return Decision("resume", why, done, prev)

    def _length_name(self) -> str:
        return " / ".join(self.length_keys) or f"the number of {self.unit}s"

    def _changes(self, prev: Mapping[str, Any]) -> str:
        """What differs from the recorded run, in words ("" when its fingerprint matches)."""
        if prev.get("fingerprint") == self.fingerprint:
            return ""
        old_settings, old_inputs = prev.get("settings"), prev.get("inputs")
        if not isinstance(old_settings, dict) or not isinstance(old_inputs, dict):
            return "the earlier run recorded no settings (an older version of Persona)"
        parts = []
        for key in sorted(set(self.settings) | set(old_settings)):
            a, b = old_settings.get(key, "unset"), self.settings.get(key, "unset")
            if a != b:
                parts.append(f"{key} changed ({_short(a)} -> {_short(b)})")
        for key in sorted(set(self.inputs) | set(old_inputs)):
            a, b = old_inputs.get(key, "unset"), self.inputs.get(key, "unset")
            if a != b:
                parts.append(f"the {key.replace('_', ' ')} changed ({_short(a)} -> {_short(b)})")
        return "; ".join(parts) or "the recorded fingerprint differs"

    def explain(self, decision: Decision) -> LogLine:
        """The decision as one log line; a reuse also names the settings that differ but
        cannot change the weights, and how to train again."""
        text = decision.why
        if decision.action == "reuse":
            old = (decision.entry or {}).get("other_settings")
            if isinstance(old, dict):
                diff = [k for k, v in self.other_settings.items() if old.get(k, v) != v]
                if diff:
                    text += f"; {', '.join(diff)} changed, which cannot change the trained weights"
            text += f"; --set {self.resume_setting}=false trains again"
        level = "warning" if decision.action == "fresh" and decision.entry else "info"
        return LogLine(text, level)

    # -- the training client -----------------------------------------------------------

    async def start(
        self, decision: Decision, new_client: Callable[[], Awaitable[Any]]
    ) -> list[Event]:
        """Open the training client: from the recorded state (optimizer included) on a
        resume, else ``new_client()``. Returns the events to yield."""
        events: list[Event] = []
        if decision.action == "resume" and decision.entry:
            svc = self.ctx.service_client()
            path = str(decision.entry["state_path"])
            try:
                self.tc = await resolve(svc.create_training_client_from_state_with_optimizer(path))
                self.step = self.last_saved = decision.step
                self._fresh = False
                return events
            except FileNotFoundError as e:
                events.append(LogLine(f"cannot resume ({e}); training from the start", "warning"))
        self.tc = await new_client()
        self.step = self.last_saved = 0
        self._fresh = True
        return events

    # -- saving ------------------------------------------------------------------------

    def due(self, step: int, every: int) -> bool:
        return bool(every) and step % every == 0 and step < self.total

    async def save(self, *, finished: bool = False, name: str | None = None) -> CheckpointSaved:
        """Save state and sampler weights (both submitted before either is awaited) and
        record them. A fresh run replaces the stage's entry; while it is unfinished the last
        finished run stays recorded under ``last_finished`` (its outputs are still the
        stage's results)."""
        n = self.step
        name = name or self.names(n, finished)
        state_future = self.tc.save_state(name)
        sampler_future = self.tc.save_weights_for_sampler(name)
        state, sampler = await resolve(state_future), await resolve(sampler_future)
        extra = await self.extras(name, n, finished) if self.extras else {}
        self.record(str(sampler.path), str(state.path), name, finished, extra)
        self.saved = CheckpointSaved(
            name=name, step=n, sampler_path=str(sampler.path), state_path=str(state.path)
        )
        return self.saved

    def record(
        self,
        sampler_path: str,
        state_path: str,
        name: str,
        finished: bool,
        extra: Mapping[str, Any] | None = None,
    ) -> dict[str, Any]:
        """Record a saved checkpoint of this run (at ``self.step``) in the registry."""
        ws = self.ctx.workspace
        fields = {
            **self.fields,
            "sampler_path": sampler_path,
            "state_path": state_path,
            "checkpoint": name,
            self.counter: self.step,
            f"total_{self.counter}s": self.total,
            "finished": finished,
            "stopped_early": self.stopped_early,
            "run": ws.rel(self.ctx.run_dir),
            "backend": self.ctx.backend,
            "fingerprint": self.fingerprint,
            "settings": self.settings,
            "other_settings": self.other_settings,
            "inputs": self.inputs,
            **(extra or {}),
        }
        fresh = self._fresh
        self._fresh = False

        def merge(old: dict[str, Any] | None) -> dict[str, Any]:
            old = dict(old or {})
            keep = old.get("last_finished")
            if old.get("finished"):
                keep = {k: v for k, v in old.items() if k != "last_finished"}
            entry = {k: v for k, v in fields.items() if v is not None}
            if not fresh:
                entry = {**{k: v for k, v in old.items() if k != "last_finished"}, **entry}
            if not finished and isinstance(keep, dict):
                entry["last_finished"] = keep
            return entry

        self.last_saved = self.step
        return update_entry(ws.results_dir, self.stage, merge)

    async def cancel_checkpoint(self) -> AsyncIterator[Event]:
        """On cancel: save what was trained since the last checkpoint, so a rerun loses none."""
        if self.step > self.last_saved:
            yield await self.save()
            yield LogLine(
                f"cancelled at {self.unit} {self.step}/{self.total}; checkpoint saved, rerun to "
                "resume"
            )
        else:
            yield LogLine(
                f"cancelled at {self.unit} {self.step}/{self.total}; "
                + (
                    "rerun to resume from the last checkpoint"
                    if self.step
                    else "nothing trained yet"
                )
            )

    # -- the loop ----------------------------------------------------------------------

    async def steps(
        self,
        one_step: Callable[[int], AsyncIterator[Event]],
        *,
        label: str,
        checkpoint_every: int,
        after: Callable[[int], AsyncIterator[Event]] | None = None,
        progress: bool = True,
    ) -> AsyncIterator[Event]:
        """Run ``one_step(step)`` (0-based; it yields its metrics) until ``total``, with
        progress, periodic checkpoints, ``after(step)`` once each step is saved (1-based),
        the cancel checkpoint, and the final checkpoint. A step may call :meth:`stop` to end
        training early (a loss below its stop line). ``progress = False``: ``one_step``
        reports finer progress of its own."""
        if progress:
            yield Progress(self.step, self.total, label)
        try:
            while self.step < self.total and not self.stopped_early:
                self.ctx.check_cancel()
                async for ev in one_step(self.step):
                    yield ev
                self.step += 1
                if progress:
                    yield Progress(self.step, self.total, label)
                if self.due(self.step, checkpoint_every) and not self.stopped_early:
                    yield await self.save()
                if after is not None:
                    self.ctx.check_cancel()
                    async for ev in after(self.step):
                        yield ev
        except StageCancelled:
            async for ev in self.cancel_checkpoint():
                yield ev
            raise
        yield await self.save(finished=True)

    def stop(self) -> None:
        """End training after the current step (early stopping)."""
        self.stopped_early = True


def _short(value: Any) -> str:
    text = json.dumps(value) if not isinstance(value, str) else value
    return text if len(text) <= 40 else text[:37] + "..."
