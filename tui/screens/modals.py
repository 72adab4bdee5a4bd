"""Small dialogs: confirm, ask for a line of text, pick one of a list, the
abort dialog (keep or revert), the rollout edit form and the choice of a
model version to assign.

The prompt and the edit form can send their answer themselves (`submit`):
they stay open, with what was typed and the problem shown inside, while
the answer does not parse, so an operator's next keys never reach the
screen below."""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Mapping, Sequence
from typing import TypeVar

from rich.text import Text
from textual import work
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Horizontal, Vertical
from textual.screen import ModalScreen
from textual.widgets import Button, Input, Label, OptionList, RadioButton, RadioSet, Static
from textual.widgets.option_list import Option

from edgefleet.tui.client import ClientError, InputError
from edgefleet.tui.data import ModelVersion, RolloutEdit
from edgefleet.tui.widgets import KeyButton, MarkedRadioButton

T = TypeVar("T")

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
                yield KeyButton(self._yes, "y", id="yes", variant="primary")
                yield KeyButton("Cancel", "n", id="no")

    def on_button_pressed(self, event: Button.Pressed) -> None:
        self.dismiss(event.button.id == "yes")

    def action_answer(self, yes: bool) -> None:
        self.dismiss(yes)


class SendingDialog(ModalScreen[T | None]):
    """A dialog that may send its answer itself: with `submit`, answering
    awaits `submit(answer)` and closes with the answer only once it went
    through. An InputError (what was typed does not parse; nothing was
    sent) is shown in the dialog (#dialog-errors), which stays open to fix it; a
    server's refusal closes it (the answer cannot be fixed by retyping) and
    is notified. Without `submit` it closes with the answer at once."""

    def __init__(self, submit: Callable[[T], Awaitable[object]] | None) -> None:
        super().__init__(classes="dialog-screen")
        self._submit = submit
        self._sending = False

    def compose_errors(self) -> ComposeResult:
        errors = Static(id="dialog-errors", classes="errors", markup=False)
        errors.display = False
        yield errors

    def answer(self, value: T) -> None:
        if self._submit is None:
            self.dismiss(value)
        elif not self._sending:  # a second Enter while the first is sent
            self._sending = True
            self._send(self._submit, value)

    @work(exclusive=True, group="dialog-send", exit_on_error=False)
    async def _send(self, submit: Callable[[T], Awaitable[object]], value: T) -> None:
        errors = self.query_one("#dialog-errors", Static)
        try:
            await submit(value)
        except InputError as err:
            errors.update(f"{err.title}: {err.message}")
            errors.display = True
            return
        except ClientError as err:
            self.app.notify(err.message, title=err.title, severity="error", markup=False)
            self.dismiss(None)
            return
        except Exception as err:  # a bug must not kill the operator's session
            self.app.notify(f"{type(err).__name__}: {err}", title="Unexpected error",
                            severity="error", markup=False)  # fmt: skip
            self.dismiss(None)
            return
        finally:
            self._sending = False
        self.dismiss(value)


class PromptScreen(SendingDialog[str]):
    """One line of text; Enter accepts (sends it, with `submit`), Escape
    cancels (None)."""

    BINDINGS = [Binding("escape", "cancel", "Cancel")]

    def __init__(
        self,
        title: str,
        value: str = "",
        placeholder: str = "",
        hint: str = "",
        submit: Callable[[str], Awaitable[object]] | None = None,
    ) -> None:
        super().__init__(submit)
        self._title, self._value, self._placeholder, self._hint = title, value, placeholder, hint

    def compose(self) -> ComposeResult:
        with Vertical(classes="dialog"):
            yield Label(self._title, classes="question", markup=False)
            yield Input(self._value, placeholder=self._placeholder, id="prompt")
            yield from self.compose_errors()
            if self._hint:
                yield Label(self._hint, classes="hint", markup=False)

    def on_input_submitted(self, event: Input.Submitted) -> None:
        self.answer(event.value)

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
                yield MarkedRadioButton("revert: devices that took it go back", value=True,
                                        id="revert")  # fmt: skip
                yield MarkedRadioButton("keep: devices keep what they have", id="keep")
            yield Input(placeholder="reason (for the audit log)", id="reason")
            with Horizontal(classes="buttons"):
                yield KeyButton("Abort", "ctrl+y", id="abort", variant="error")
                yield KeyButton("Cancel", "esc", id="cancel")

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


class RolloutEditScreen(SendingDialog[tuple[RolloutEdit, str]]):
    """A rollout's current stage thresholds and bake time, and its pacing,
    prefilled; ctrl+s answers (the edited fields, reason), sent with
    `submit` when given; Escape None. An emptied field goes back to the
    server's default."""

    BINDINGS = [Binding("escape", "cancel", "Cancel"), Binding("ctrl+s", "save", "Save")]

    def __init__(
        self,
        title: str,
        edit: RolloutEdit,
        submit: Callable[[tuple[RolloutEdit, str]], Awaitable[object]] | None = None,
    ) -> None:
        super().__init__(submit)
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
            yield from self.compose_errors()
            yield Label("An emptied field takes the default.", classes="hint", markup=False)
            with Horizontal(classes="buttons"):
                yield KeyButton("Save", "ctrl+s", id="save", variant="primary")
                yield KeyButton("Cancel", "esc", id="cancel")

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
        self.answer((edit, self.query_one("#reason", Input).value))

    def action_cancel(self) -> None:
        self.dismiss(None)


class AssignScreen(ModalScreen[tuple[str, str] | None]):
    """Pick a model, then one of its versions (newest first), to assign:
    Enter on a model goes to its versions, Enter on a version answers
    (model, version), Escape cancels (None). `assigned` names the version
    of each model the device has now."""

    BINDINGS = [Binding("escape", "cancel", "Cancel")]

    def __init__(
        self, title: str, versions: Sequence[ModelVersion], assigned: Mapping[str, str]
    ) -> None:
        super().__init__(classes="dialog-screen")
        self._title = title
        self._assigned = dict(assigned)
        self._versions: dict[str, list[str]] = {}
        for v in versions:
            self._versions.setdefault(v.model_name, []).append(v.version)
        self._model = next(iter(self._versions), "")

    def compose(self) -> ComposeResult:
        with Vertical(classes="dialog wide"):
            yield Label(self._title, classes="question", markup=False)
            with Horizontal(id="assign-lists"):
                # Text prompts: names come from outside and may hold `[`.
                yield OptionList(*(Option(Text(self._model_label(m)), id=m)
                                   for m in self._versions), id="assign-models")  # fmt: skip
                yield OptionList(id="assign-versions")
            yield Label("Enter picks, Tab goes to the other list, Esc cancels", classes="hint")

    def _model_label(self, model: str) -> str:
        now = self._assigned.get(model)
        return f"{model} (has {now})" if now else model

    def on_mount(self) -> None:
        self.show_versions(self._model)

    def show_versions(self, model: str) -> None:
        self._model = model
        versions = self.query_one("#assign-versions", OptionList)
        versions.clear_options()
        for v in self._versions.get(model, []):
            now = " (assigned now)" if self._assigned.get(model) == v else ""
            versions.add_option(Option(Text(f"{v}{now}"), id=v))
        versions.highlighted = 0 if versions.option_count else None

    def on_option_list_option_highlighted(self, event: OptionList.OptionHighlighted) -> None:
        if event.option_list.id == "assign-models" and event.option.id:
            self.show_versions(event.option.id)

    def on_option_list_option_selected(self, event: OptionList.OptionSelected) -> None:
        if event.option_list.id == "assign-models":
            self.query_one("#assign-versions", OptionList).focus()
        elif event.option.id:
            self.dismiss((self._model, event.option.id))

    def action_cancel(self) -> None:
        self.dismiss(None)
