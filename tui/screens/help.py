"""Every key, by screen."""

from __future__ import annotations

from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import VerticalScroll
from textual.screen import ModalScreen
from textual.widgets import Static

HELP = """\
EdgeFleet TUI: keys

Everywhere  1-7 screens  ? help  q quit  r refresh  Esc back/cancel
            ctrl+p (or / where / is no filter) jump to any device,
            rollout, model or class by name or id prefix
            Enter open  Tab next field

1 Overview  status, classes, versions; active rollouts; alerts
            Enter on an alert opens the device or rollout it names
2 Devices   / filter (words, label k=v)  s sort (or click a header)
            space select  shift+arrows extend  * select all shown
            Esc clear the selection
            a accept  x reject  l labels (k=v, -k)  p pin to a class
            m assign a model  u unassign: on the selection (asks once,
            with the count) or the device under the cursor
  device    a x l p m u as above  Enter on a rollout opens its monitor;
            history shows every update's full reason
3 Classes   n new  e/Enter edit  ctrl+s save (errors shown in form)
4 Models    u push a model (progress)  b re-run the selected build
            arrows/Tab: versions -> builds -> candidates
5 Rollouts  n wizard  Enter live monitor
  wizard    ctrl+r dry run (devices per stage, exclusions)
            ctrl+s start (only what was dry-run)
  monitor   p pause  u resume  a approve  x abort (revert/keep)
            Enter open the device  space mark a device
            t retry (marked or every failed)  s skip marked (asks why)
            g promote the stage  e edit (thresholds, bake, pacing)
6 Telemetry m metric  g group by  t time range  / model filter
            d device filter (name or id prefix)
7 Audit     / filter the loaded entries; Enter searches the whole log
            on the server (actor=alice action=rollout NAME)  o older

Everything updates live from the control plane's watch stream. The line
above the keys: server, the token's role, connected or reconnecting.
"""


class HelpScreen(ModalScreen[None]):
    BINDINGS = [Binding("escape,q,question_mark", "app.pop_screen", "Close")]

    def compose(self) -> ComposeResult:
        with VerticalScroll(classes="dialog wide", id="help"):
            yield Static(HELP, markup=False)
