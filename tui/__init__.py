"""EdgeFleet operator TUI (see issue 6)."""

from edgefleet.extras import require

# Before any module here imports them: without its extra, this package says
# in one line what to install (edgefleet.extras).
require("tui", "textual", "textual_plotext", "rich", part="edgefleet.tui")
