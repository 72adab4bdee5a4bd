"""Widgets shared by screens."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime

from textual.content import Content, ContentText
from textual.style import Style
from textual.widgets import Button, Checkbox, RadioButton, Static
from textual.widgets.button import ButtonVariant
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


class KeyButton(Button):
    """A button whose label names its key, `Save [ctrl+s]`, whatever is done
    to it. A Button reads a str label as markup, where `[esc]` or `[y]` is a
    style tag and vanishes: the label here is plain text, and a new label
    (`button.label = ...`) gets the key again."""

    def __init__(
        self,
        label: str,
        key: str,
        *,
        id: str | None = None,
        variant: ButtonVariant = "default",
        disabled: bool = False,
    ) -> None:
        self.key_hint = key
        # Button's constructor sets the label without validating it.
        super().__init__(self._with_key(label), id=id, variant=variant, disabled=disabled)

    def _with_key(self, label: ContentText) -> Content:
        text = label.plain if not isinstance(label, str) else label
        hint = f"[{self.key_hint}]"
        return Content(text if text.endswith(hint) else f"{text} {hint}")

    def validate_label(self, label: ContentText) -> Content:
        return self._with_key(label)


def _marked(toggle: Checkbox | RadioButton, on: str, off: str) -> Content:
    """The toggle's state as text (`on` or `off`), coloured as Textual
    colours it, so it reads the same without colour (NO_COLOR, monochrome,
    a colour-blind operator)."""
    mark = on[1] if toggle.value else off[1]
    colour = toggle.get_visual_style("toggle--button").foreground
    return Content.assemble(on[0], (mark, Style(foreground=colour)), on[2])


class MarkedRadioButton(RadioButton):
    """A radio button showing `(•)` when chosen and `( )` when not."""

    @property
    def _button(self) -> Content:
        return _marked(self, "(•)", "( )")


class MarkedCheckbox(Checkbox):
    """A checkbox showing `[x]` when ticked and `[ ]` when not."""

    @property
    def _button(self) -> Content:
        return _marked(self, "[x]", "[ ]")


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
