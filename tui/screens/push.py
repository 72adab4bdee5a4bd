"""Push a model version from files, with upload progress."""

from __future__ import annotations

from pathlib import Path

from textual import work
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Horizontal, Vertical
from textual.screen import ModalScreen
from textual.widgets import Button, Input, Label, ProgressBar, Static

from edgefleet.tui.app_types import fleet_client
from edgefleet.tui.client import ClientError, InputError
from edgefleet.tui.data import ModelVersion
from edgefleet.tui.widgets import KeyButton

FIELDS = (
    ("name", "model name", "digits"),
    ("version", "version", "1.0.0 (semver, immutable)"),
    ("model", "ONNX file", "path/to/model.onnx"),
    ("sample_data", "sample data", "optional .npz, one array per input"),
    ("labels", "labels", "optional labels.txt"),
    ("description", "description", ""),
)


class PushScreen(ModalScreen[ModelVersion | None]):
    BINDINGS = [Binding("escape", "cancel", "Cancel"), Binding("ctrl+s", "push", "Push")]

    def compose(self) -> ComposeResult:
        with Vertical(classes="dialog wide"):
            yield Label("Push a model version", classes="question")
            for key, label, placeholder in FIELDS:
                with Horizontal(classes="field"):
                    yield Label(label, classes="field-label")
                    yield Input(placeholder=placeholder, id=key)
            yield ProgressBar(total=1, show_eta=False, id="progress")
            yield Static(id="errors", classes="errors")
            with Horizontal(classes="buttons"):
                yield KeyButton("Push", "ctrl+s", id="push", variant="primary")
                yield KeyButton("Cancel", "esc", id="cancel")

    def value(self, key: str) -> str:
        return self.query_one(f"#{key}", Input).value.strip()

    def on_button_pressed(self, event: Button.Pressed) -> None:
        if event.button.id == "push":
            self.action_push()
        else:
            self.dismiss(None)

    def on_input_submitted(self) -> None:
        self.action_push()

    def action_cancel(self) -> None:
        self.dismiss(None)

    def action_push(self) -> None:
        def path(key: str) -> Path | None:
            return Path(self.value(key)).expanduser() if self.value(key) else None

        self.push(path("model"), path("sample_data"), path("labels"))

    def progress(self, sent: int, total: int) -> None:
        self.query_one(ProgressBar).update(total=max(total, 1), progress=sent)

    @work(exclusive=True, group="push", exit_on_error=False)
    async def push(self, model: Path | None, sample_data: Path | None, labels: Path | None) -> None:
        errors = self.query_one("#errors", Static)
        try:
            name, version = self.value("name"), self.value("version")
            if not (name and version and model):
                raise InputError("name, version and the ONNX file are required")
            errors.update(f"uploading {model} ...")
            pushed = await fleet_client(self).push_model(
                name, version, model, sample_data=sample_data, labels=labels,
                description=self.value("description"), on_progress=self.progress,
            )  # fmt: skip
        except ClientError as err:
            errors.update(f"{err.title}: {err.message}")
            self.app.notify(err.message, title=err.title, severity="error", markup=False)
            return
        self.app.notify(f"pushed {pushed.ref}: builds queued for every class")
        for warning in pushed.push_warnings:
            self.app.notify(warning, title="push warning", severity="warning", markup=False)
        self.dismiss(pushed)
