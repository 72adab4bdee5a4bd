"""Create or edit a device class. Fields are text as in the CLI; what does
not parse, and what the server refuses, is shown under the form."""

from __future__ import annotations

from textual import work
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Horizontal, Vertical, VerticalScroll
from textual.screen import ModalScreen
from textual.widgets import Button, Checkbox, Input, Label, Static

from edgefleet.controlplane.domain.rules import split_unquoted
from edgefleet.controlplane.errors import InvalidArgument
from edgefleet.tui.app_types import fleet_client
from edgefleet.tui.client import ClientError
from edgefleet.tui.data import ClassDraft, DeviceClass
from edgefleet.tui.widgets import KeyButton, MarkedCheckbox

# (field id, label, placeholder)
FIELDS = (
    ("name", "name", "pi-class"),
    ("description", "description", ""),
    ("priority", "priority", "0 (higher wins)"),
    ("runtime", "runtime", "onnxruntime | tflite | tensorrt"),
    ("quantization", "quantization", "auto | fp32 | fp16 | int8"),
    ("max_size_mb", "max size MB", ""),
    ("latency_budget_ms", "p95 budget ms", ""),
    ("max_memory_mb", "max memory MB", "per model"),
    ("device_memory_mb", "device memory MB", "all models together"),
    ("fallback", "fallback", "none | fp16 | int8 | auto (served while hot)"),
    ("min_accuracy_retention", "accuracy kept", "0.95"),
    ("accelerator", "accelerator", "jetson | nvidia-gpu"),
    ("threads", "threads", "1"),
    ("speed_factor", "speed factor", "1"),
    ("rules", "match rules", "arch == aarch64; memory_mb < 4096"),
)


def split_rules(text: str) -> list[str]:
    """The form's `;`-separated rules (a quoted `;` is part of its value)."""
    try:
        return split_unquoted(text, ";")
    except InvalidArgument:
        return [text]  # a quote left open: parsing the one rule says so


def _num(value: float | int | None) -> str:
    return "" if value is None else f"{value:g}"


def draft_values(c: DeviceClass) -> dict[str, str]:
    return {
        "name": c.name, "description": c.description, "priority": str(c.priority),
        "runtime": c.runtime, "quantization": c.quantization,
        "max_size_mb": _num(c.max_model_size_mb),
        "latency_budget_ms": _num(c.latency_budget_p95_ms),
        "max_memory_mb": _num(c.max_memory_mb),
        "device_memory_mb": _num(c.device_memory_mb), "fallback": c.fallback,
        "min_accuracy_retention": _num(c.min_accuracy_retention), "accelerator": c.accelerator,
        "threads": _num(c.threads), "speed_factor": _num(c.speed_factor),
        "rules": "; ".join(c.rules),
    }  # fmt: skip


class ClassFormScreen(ModalScreen[DeviceClass | None]):
    BINDINGS = [Binding("escape", "cancel", "Cancel"), Binding("ctrl+s", "save", "Save")]
    # The first field one can type in (the scrolling form itself is focusable
    # and would otherwise take the focus).
    AUTO_FOCUS = "#form Input"

    def __init__(self, existing: DeviceClass | None) -> None:
        super().__init__(classes="dialog-screen")
        self.existing = existing

    def compose(self) -> ComposeResult:
        values = draft_values(self.existing) if self.existing else {}
        title = f"Edit class {self.existing.name}" if self.existing else "New device class"
        with Vertical(classes="dialog wide"):
            yield Label(title, classes="question", markup=False)
            with VerticalScroll(id="form"):
                for key, label, placeholder in FIELDS:
                    with Horizontal(classes="field"):
                        yield Label(label, classes="field-label")
                        yield Input(
                            values.get(key, ""),
                            placeholder=placeholder,
                            id=key,
                            disabled=key == "name" and self.existing is not None,
                            # Tab into a field edits it; it does not select
                            # the text for the next key to replace.
                            select_on_focus=False,
                        )
                yield MarkedCheckbox("microcontroller (also a TFLite Micro C array)",
                               self.existing.microcontroller if self.existing else False,
                               id="microcontroller")  # fmt: skip
            yield Static(id="errors", classes="errors")
            with Horizontal(classes="buttons"):
                yield KeyButton("Save", "ctrl+s", id="save", variant="primary")
                yield KeyButton("Cancel", "esc", id="cancel")

    def draft(self) -> ClassDraft:
        v = {key: self.query_one(f"#{key}", Input).value for key, _, _ in FIELDS}
        # `;` inside a quoted value belongs to the value.
        rules = tuple(r.strip() for r in split_rules(v.pop("rules")) if r.strip())
        return ClassDraft(**v, rules=rules,
                          microcontroller=self.query_one(Checkbox).value)  # fmt: skip

    def on_button_pressed(self, event: Button.Pressed) -> None:
        if event.button.id == "save":
            self.action_save()
        else:
            self.dismiss(None)

    def on_input_submitted(self) -> None:
        self.action_save()

    def action_cancel(self) -> None:
        self.dismiss(None)

    def action_save(self) -> None:
        self.save(self.draft())

    @work(exclusive=True, group="class-form", exit_on_error=False)
    async def save(self, draft: ClassDraft) -> None:
        errors = self.query_one("#errors", Static)
        errors.update("saving...")
        try:
            saved = await fleet_client(self).save_class(draft, create=self.existing is None)
        except ClientError as err:
            # Shown in the form (it stays open to fix) and as a notification.
            errors.update(f"{err.title}: {err.message}")
            self.app.notify(err.message, title=err.title, severity="error", markup=False)
            return
        self.app.notify(
            saved.match_summary or f"class {saved.name} saved", title="Saved", markup=False
        )
        for warning in saved.match_warnings:
            self.app.notify(warning, title="Check the rules", severity="warning", markup=False)
        self.dismiss(saved)
