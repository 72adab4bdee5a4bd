"""Every key, by screen."""

from __future__ import annotations

from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import VerticalScroll
from textual.screen import ModalScreen
from textual.widgets import Static

HELP = """\
EdgeFleet TUI: keys

Everywhere   1-7 switch screen   ? help   ctrl+p command palette   q quit
             Enter open          Esc back / cancel   Tab next field   r refresh

1 Overview   devices by status, class, version; active rollouts; alerts
2 Devices    / filter (words, label k=v)   s sort (click a header too)
             a accept   x reject   l labels (k=v, -k)   p pin to a class
3 Classes    n new   e / Enter edit   (ctrl+s saves, the server's message shows)
4 Models     u push a model (with progress)   b re-run the selected build
             arrows move between versions and builds; candidates follow
5 Rollouts   n new rollout wizard   Enter live monitor
   wizard    fill in, ctrl+r dry run (per stage devices, exclusions), ctrl+s start
   monitor   p pause   u resume   a approve   x abort (revert or keep)
6 Telemetry  m metric   g group by   t time range   / model filter
7 Audit      / filter   o older entries

Everything updates live from the control plane's watch stream.
"""


class HelpScreen(ModalScreen[None]):
    BINDINGS = [Binding("escape,q,question_mark", "app.pop_screen", "Close")]

    def compose(self) -> ComposeResult:
        with VerticalScroll(classes="dialog wide", id="help"):
            yield Static(HELP, markup=False)
