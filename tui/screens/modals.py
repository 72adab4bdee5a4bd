"""Small dialogs: confirm, ask for a line of text, pick one of a list, the
abort dialog (keep or revert) and the rollout edit form."""

from __future__ import annotations

from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Horizontal, Vertical
from textual.screen import ModalScreen
from textual.widgets import Button, Input, Label, OptionList, RadioButton, RadioSet

from edgefleet.tui.data import RolloutEdit

# The edit form's fields: (RolloutEdit field, label, placeholder).
EDIT_FIELDS = (
    ("success", "success %", "100 (default)"),
    ("errors", "errors %[/min]", "0 (none tolerated), e.g. 20/3"),
    ("bake", "bake", "none, e.g. 5m"),
    ("max_per_minute", "max per minute", "no limit"),
    ("device_timeout", "device timeout", "none, e.g. 10m"),
    ("retries", "retries", "0"),
)


class ConfirmScreen(ModalScreen[bool]):
    """Yes or no; `y`/`n` answer from the keyboard."""

    BINDINGS = [Binding("y", "answer(True)", "Yes"), Binding("n,escape", "answer(False)", "No")]

    def __init__(self, question: str, yes: str = "Yes") -> None:
        super().__init__(classes="dialog-screen")
        self._question = question
        self._yes = yes

    def compose(self) -> ComposeResult:
        with Vertical(classes="dialog"):
            yield Label(self._question, classes="question", markup=False)
            with Horizontal(classes="buttons"):
                yield Button(f"{self._yes} [y]", id="yes", variant="primary")
                yield Button("Cancel [n]", id="no")

    def on_button_pressed(self, event: Button.Pressed) -> None:
        self.dismiss(event.button.id == "yes")

    def action_answer(self, yes: bool) -> None:
        self.dismiss(yes)


class PromptScreen(ModalScreen[str | None]):
    """One line of text; Enter accepts, Escape cancels (None)."""

    BINDINGS = [Binding("escape", "cancel", "Cancel")]

    def __init__(self, title: str, value: str = "", placeholder: str = "", hint: str = "") -> None:
        super().__init__(classes="dialog-screen")
        self._title, self._value, self._placeholder, self._hint = title, value, placeholder, hint

    def compose(self) -> ComposeResult:
        with Vertical(classes="dialog"):
            yield Label(self._title, classes="question", markup=False)
            yield Input(self._value, placeholder=self._placeholder, id="prompt")
            if self._hint:
                yield Label(self._hint, classes="hint", markup=False)

    def on_input_submitted(self, event: Input.Submitted) -> None:
        self.dismiss(event.value)

    def action_cancel(self) -> None:
        self.dismiss(None)


class ChoiceScreen(ModalScreen[str | None]):
    """Pick one option; Enter picks, Escape cancels (None)."""

    BINDINGS = [Binding("escape", "cancel", "Cancel")]

    def __init__(self, title: str, options: list[tuple[str, str]]) -> None:
        super().__init__(classes="dialog-screen")
        self._title = title
        self._options = options

    def compose(self) -> ComposeResult:
        with Vertical(classes="dialog"):
            yield Label(self._title, classes="question", markup=False)
            yield OptionList(*(label for label, _ in self._options), id="choices")

    def on_option_list_option_selected(self, event: OptionList.OptionSelected) -> None:
        self.dismiss(self._options[event.option_index][1])

    def action_cancel(self) -> None:
        self.dismiss(None)


class AbortScreen(ModalScreen[tuple[bool, str] | None]):
    """Abort a rollout: revert (default) or keep, and why. Answers
    (revert, reason), or None when cancelled."""

    BINDINGS = [Binding("escape", "cancel", "Cancel"), Binding("ctrl+y", "confirm", "Abort")]

    def __init__(self, what: str) -> None:
        super().__init__(classes="dialog-screen")
        self._what = what

    def compose(self) -> ComposeResult:
        with Vertical(classes="dialog"):
            yield Label(f"Abort {self._what}? No device is notified from then on.",
                        classes="question", markup=False)  # fmt: skip
            with RadioSet(id="mode"):
                yield RadioButton("revert: devices that took it go back", value=True, id="revert")
                yield RadioButton("keep: devices keep what they have", id="keep")
            yield Input(placeholder="reason (for the audit log)", id="reason")
            with Horizontal(classes="buttons"):
                yield Button("Abort [ctrl+y]", id="abort", variant="error")
                yield Button("Cancel [esc]", id="cancel")

    def on_mount(self) -> None:
        self.query_one(RadioSet).focus()

    def on_button_pressed(self, event: Button.Pressed) -> None:
        if event.button.id == "abort":
            self.action_confirm()
        else:
            self.dismiss(None)

    def on_input_submitted(self) -> None:
        self.action_confirm()

    def action_confirm(self) -> None:
        revert = self.query_one("#revert", RadioButton).value
        self.dismiss((revert, self.query_one("#reason", Input).value))

    def action_cancel(self) -> None:
        self.dismiss(None)


class RolloutEditScreen(ModalScreen[tuple[RolloutEdit, str] | None]):
    """A rollout's current stage thresholds and bake time, and its pacing,
    prefilled; ctrl+s answers (the edited fields, reason), Escape None. An
    emptied field goes back to the server's default."""

    BINDINGS = [Binding("escape", "cancel", "Cancel"), Binding("ctrl+s", "save", "Save")]

    def __init__(self, title: str, edit: RolloutEdit) -> None:
        super().__init__(classes="dialog-screen")
        self._title = title
        self._edit = edit

    def compose(self) -> ComposeResult:
        with Vertical(classes="dialog"):
            yield Label(self._title, classes="question", markup=False)
            for field, label, placeholder in EDIT_FIELDS:
                with Horizontal(classes="field"):
                    yield Label(label, classes="field-label", markup=False)
                    yield Input(getattr(self._edit, field), placeholder=placeholder, id=field)
            with Horizontal(classes="field"):
                yield Label("reason", classes="field-label")
                yield Input(placeholder="for the audit log", id="reason")
            yield Label("An emptied field takes the default.", classes="hint", markup=False)
            with Horizontal(classes="buttons"):
                yield Button("Save [ctrl+s]", id="save", variant="primary")
                yield Button("Cancel [esc]", id="cancel")

    def on_button_pressed(self, event: Button.Pressed) -> None:
        if event.button.id == "save":
            self.action_save()
        else:
            self.dismiss(None)

    def on_input_submitted(self) -> None:
        self.action_save()

    def action_save(self) -> None:
        values = {field: self.query_one(f"#{field}", Input).value for field, _, _ in EDIT_FIELDS}
        edit = RolloutEdit(stage=self._edit.stage, **values)
        self.dismiss((edit, self.query_one("#reason", Input).value))

    def action_cancel(self) -> None:
        self.dismiss(None)
