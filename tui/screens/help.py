"""Every key, by screen."""

from __future__ import annotations

from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import VerticalScroll
from textual.screen import ModalScreen
from textual.widgets import Static

HELP = """\
EdgeFleet TUI: keys

Everywhere  1-7 screens  ? help  ctrl+p palette  q quit  r refresh
            Enter open  Esc back/cancel  Tab next field

1 Overview  status, classes, versions; active rollouts; alerts
2 Devices   / filter (words, label k=v)  s sort (or click a header)
            a accept  x reject  l labels (k=v, -k)  p pin to a class
3 Classes   n new  e/Enter edit  ctrl+s save (errors shown in form)
4 Models    u push a model (progress)  b re-run the selected build
            arrows/Tab: versions -> builds -> candidates
5 Rollouts  n wizard  Enter live monitor
  wizard    ctrl+r dry run (devices per stage, exclusions)
            ctrl+s start (only what was dry-run)
  monitor   p pause  u resume  a approve  x abort (revert/keep)
            space mark a device  t retry (marked or every failed)
            s skip marked (asks why)  g promote the stage  e edit
            (stage thresholds, bake, pacing)
6 Telemetry m metric  g group by  t time range  / model filter
7 Audit     / filter  o older entries

Everything updates live from the control plane's watch stream. The line
above the keys: server, the token's role, connected or reconnecting.
"""


class HelpScreen(ModalScreen[None]):
    BINDINGS = [Binding("escape,q,question_mark", "app.pop_screen", "Close")]

    def compose(self) -> ComposeResult:
        with VerticalScroll(classes="dialog wide", id="help"):
            yield Static(HELP, markup=False)
