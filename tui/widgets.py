"""Widgets shared by screens."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime

from textual.widgets import Static
from textual_plotext import PlotextPlot

from edgefleet.tui.data import ConnectionStatus, Series


class ConnectionBar(Static):
    """The link to the control plane in words (server, role, state), on
    every screen; it follows the app's `connection`."""

    def __init__(self) -> None:
        super().__init__(classes="connection", markup=False)

    def on_mount(self) -> None:
        self.watch(self.app, "connection", self.show, init=True)

    def show(self, status: ConnectionStatus) -> None:
        self.update(status.line)
        self.set_class(status.state != "connected", "-lost")


class SeriesPlot(PlotextPlot):
    """Telemetry series as lines over minutes before `now` (so the axis
    reads the same whatever the wall clock)."""

    def show(self, series: Sequence[Series], now: datetime, title: str) -> None:
        plt = self.plt
        plt.clear_data()
        plt.clear_figure()
        plt.title(title)
        plt.xlabel("minutes ago")
        drawn = False
        for s in series:
            if not s.points:
                continue
            xs = [-(now - at).total_seconds() / 60 for at, _ in s.points]
            plt.plot(xs, [v for _, v in s.points], label=s.group or "all", marker="braille")
            drawn = True
        if not drawn:
            plt.title(f"{title}: no data in this range")
        self.refresh()
