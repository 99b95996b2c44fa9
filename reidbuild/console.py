"""How the CLI shows a run on stderr: stage lines, and progress as a bar (terminal) or plain lines (logs).

The pipeline and stages only emit ``pipeline.Event`` values (``progress`` ones carry done/total); this is
the one place that turns them into text. Bars use click's progress bar (counts and ETA) and appear only
when stderr is a terminal and the output is not ``--json``; in CI logs a line is written when a loop ends
or every ``LINE_EVERY_S`` seconds; ``--quiet`` shows neither.
"""
from __future__ import annotations

import sys
import time
from typing import Any, Optional

import click

LINE_EVERY_S = 5.0


class Progress:
    """Progress of one loop at a time (a new label finishes the previous bar)."""

    def __init__(self, mode: str) -> None:
        self.mode = mode  # bar | lines | off
        self.key: Optional[tuple[str, str]] = None
        self.bar: Any = None
        self.last_line = 0.0

    @classmethod
    def for_stderr(cls, quiet: bool, as_json: bool) -> "Progress":
        if quiet:
            return cls("off")
        return cls("bar" if sys.stderr.isatty() and not as_json else "lines")

    def update(self, stage: str, what: str, done: int, total: int) -> None:
        if self.mode == "off" or total <= 0:
            return
        key = (stage, what)
        if key != self.key:
            self.finish()
            self.key = key
            self.last_line = time.monotonic()
            if self.mode == "bar":
                self.bar = click.progressbar(length=total, label=f"    {stage}: {what}", file=sys.stderr,
                                             show_eta=True, show_pos=True, width=24)
                self.bar.render_progress()
        if self.bar is not None:
            self.bar.update(done - self.bar.pos)
            if done >= total:
                self.finish()
        elif done >= total or time.monotonic() - self.last_line >= LINE_EVERY_S:
            self.last_line = time.monotonic()
            click.echo(f"    {stage}: {what} {done}/{total}", err=True)
            if done >= total:
                self.key = None

    def finish(self) -> None:
        if self.bar is not None:
            self.bar.render_finish()
            self.bar = None
        self.key = None


def event_text(label: str, ev: Any) -> Optional[str]:
    """The stderr line for a pipeline event (``label`` names the manifest in a fleet), None for none."""
    where = f"[{label}] " if label else ""
    return {"start": f"==> {where}{ev.stage}: running ({ev.message})",
            "done": f"    {where}{ev.stage}: done in {ev.seconds:.1f} s",
            "cached": f"    {where}{ev.stage}: up to date",
            "restored": f"    {where}{ev.stage}: restored from cache",
            "skip": f"    {where}{ev.stage}: SKIPPED ({ev.message})",
            "fail": f"    {where}{ev.stage}: FAILED in {ev.seconds:.1f} s",
            "warn": f"warning: {where}{ev.message}",
            "log": f"    {where}{ev.stage}: {ev.message}"}.get(ev.kind)


class EventPrinter:
    """The CLI's ``emit``: stage lines on stderr, progress through ``Progress``, and a log for ``--json``."""

    def __init__(self, quiet: bool = False, as_json: bool = False) -> None:
        self.quiet = quiet
        self.progress = Progress.for_stderr(quiet, as_json)
        self.log: list[dict[str, Any]] = []

    def __call__(self, ev: Any) -> None:  # a pipeline.Event
        if ev.kind == "progress":
            self.progress.update(ev.stage, ev.message, ev.done, ev.total)
            return
        self.progress.finish()
        self.log.append({"kind": ev.kind, "stage": ev.stage, "message": ev.message, "seconds": round(ev.seconds, 3)})
        text = event_text("", ev)
        if text is not None and (not self.quiet or ev.kind == "warn"):  # a cache warning still shows
            click.echo(text, err=True)
