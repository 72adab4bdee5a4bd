"""EdgeFleet operator TUI (see issue 6)."""
