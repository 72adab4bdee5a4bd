"""Models and builds: every version; per class the build of the selected
version; the selected build's candidate table (size, p95, peak memory,
fidelity by each output's metric, accuracy, verdict and reasons). Push a
model from a file; re-run a build."""

from __future__ import annotations

from rich.text import Text
from textual import work
from textual.app import ComposeResult
from textual.binding import Binding
from textual.widgets import DataTable, Static

from edgefleet.controlplane.client.format import format_bytes
from edgefleet.tui.data import Build, Candidate, ModelVersion
from edgefleet.tui.screens.base import FleetScreen, cursor_key, keep_cursor, reporting
from edgefleet.tui.summary import format_time

# Seconds between re-reads of the builds while one shown is queued or
# running: the server records a build's progress without announcing it on
# the watch stream (only its state changes are), so the bar would sit at its
# first value until the build ended.
BUILD_POLL_S = 2.0
_UNFINISHED = frozenset({"queued", "running"})


def verdict(c: Candidate) -> str:
    if c.error:
        return "error"
    if c.chosen:
        return "CHOSEN"
    if c.fallback:
        return "FALLBACK"
    return "pass" if c.passed else "fail"


CANDIDATE_COLUMNS = (
    "candidate", "size", "p95 ms", "peak MB", "fidelity", "accuracy", "verdict", "reasons",
)  # fmt: skip


def candidate_cells(c: Candidate) -> tuple[str, ...]:
    """One row of the candidate table. A candidate that was not built or could
    not run measured nothing: `-` in its figures, its error as the reason."""
    measured = not c.error
    return (
        c.name,
        format_bytes(c.size_bytes) if c.size_bytes else "-",
        f"{c.latency_p95_ms:.3f}" if measured else "-",
        f"{c.peak_memory_mb:.1f}" if measured else "-",
        f"{c.agreement * 100:.1f}%" + (f" {c.metric}" if c.metric else "") if measured else "-",
        f"{c.accuracy * 100:.1f}%" if measured and c.accuracy is not None else "-",
        verdict(c),
        c.error or "; ".join((*c.reasons, *(f"note: {n}" for n in c.notes))) or "-",
    )


class ModelsScreen(FleetScreen):
    TOPICS = frozenset({"model", "build", "class"})
    NAV_MODE = "models"
    BINDINGS = [
        Binding("u", "push", "Push model"),
        Binding("b", "rebuild", "Re-run build"),
        Binding("r", "refresh", "Refresh", show=False),
    ]

    def __init__(self) -> None:
        super().__init__()
        self._versions: list[ModelVersion] = []
        self._builds: list[Build] = []

    def compose(self) -> ComposeResult:
        yield from self.compose_nav()
        yield DataTable(id="versions", cursor_type="row")
        yield Static(id="builds-title", classes="section")
        yield DataTable(id="builds", cursor_type="row")
        yield Static(id="candidates-title", classes="section")
        yield DataTable(id="candidates", cursor_type="row")
        yield from self.compose_footer()

    def on_mount(self) -> None:
        self.query_one("#versions", DataTable).add_columns(
            "model", "version", "size", "opset", "samples", "created", "description"
        )
        self.query_one("#builds", DataTable).add_columns(
            "class", "state", "progress", "chosen", "artifact", "time", "error"
        )
        self.query_one("#candidates", DataTable).add_columns(*CANDIDATE_COLUMNS)
        self.query_one("#versions", DataTable).focus()
        self.set_interval(BUILD_POLL_S, self.poll_unfinished)
        super().on_mount()

    def poll_unfinished(self) -> None:
        if any(b.state in _UNFINISHED for b in self._builds):
            self.refresh_builds()

    def reload(self) -> None:
        self.load()

    def selected_version(self) -> ModelVersion | None:
        key = cursor_key(self.query_one("#versions", DataTable))
        return next((v for v in self._versions if v.ref == key), None)

    def selected_build(self) -> Build | None:
        key = cursor_key(self.query_one("#builds", DataTable))
        return next((b for b in self._builds if b.id == key), None)

    @work(exclusive=True, group="models", exit_on_error=False)
    async def load(self) -> None:
        with reporting(self):
            self._versions = await self.client.list_versions()
            table = self.query_one("#versions", DataTable)
            key = cursor_key(table)
            table.clear()
            for v in self._versions:
                samples = f"{v.samples}{' +labels' if v.has_labels else ''}"
                table.add_row(v.model_name, v.version, format_bytes(v.size_bytes), str(v.opset),
                              samples, format_time(v.created_at), v.description or "-",
                              key=v.ref)  # fmt: skip
            keep_cursor(table, key)
            await self.load_builds()

    async def load_builds(self) -> None:
        version = self.selected_version()
        self._builds = (
            await self.client.list_builds(version.model_name, version.version) if version else []
        )
        self._builds.sort(key=lambda b: b.class_name)
        title = f"Builds of {version.ref}" if version else "Builds (push a model: u)"
        self.query_one("#builds-title", Static).update(title)
        table = self.query_one("#builds", DataTable)
        key = cursor_key(table)
        table.clear()
        for b in self._builds:
            took = "reused" if b.reused_from else (f"{b.duration_s:.1f}s" if b.duration_s else "-")
            table.add_row(b.class_name, b.state, f"{b.progress * 100:.0f}%", b.chosen or "-",
                          format_bytes(b.artifact_size) if b.artifact_size else "-", took,
                          b.error or "-", key=b.id)  # fmt: skip
        keep_cursor(table, key)
        self.show_candidates()

    def show_candidates(self) -> None:
        build = self.selected_build()
        title = f"Candidates for {build.class_name}" if build else "Candidates"
        if build and build.fallback_reason:
            title += f" (no fallback: {build.fallback_reason})"
        # Text: a reason is the server's words, never markup.
        self.query_one("#candidates-title", Static).update(Text(title))
        table = self.query_one("#candidates", DataTable)
        # Kept over a re-read of the same build (the poll while one runs);
        # another build's rows have other keys, so its table starts at the top.
        key = cursor_key(table)
        table.clear()
        for i, c in enumerate(build.candidates if build else ()):
            table.add_row(*candidate_cells(c), key=f"{build.id}:{i}" if build else None)
        keep_cursor(table, key)

    @work(exclusive=True, group="builds", exit_on_error=False)
    async def refresh_builds(self) -> None:
        with reporting(self):
            await self.load_builds()

    def on_data_table_row_highlighted(self, event: DataTable.RowHighlighted) -> None:
        if event.data_table.id == "versions":
            self.refresh_builds()
        elif event.data_table.id == "builds":
            self.show_candidates()

    def action_push(self) -> None:
        from edgefleet.tui.screens.push import PushScreen

        self.app.push_screen(PushScreen(), lambda _: self.reload())

    def action_rebuild(self) -> None:
        build = self.selected_build()
        if build is None:
            self.app.notify("select a build first", severity="warning")
            return
        self.rebuild(build)

    @work(group="rebuild", exit_on_error=False)
    async def rebuild(self, build: Build) -> None:
        with reporting(self):
            await self.client.run_build(build.model_name, build.model_version, build.class_name)
            self.app.notify(f"build of {build.model_name}@{build.model_version} for "
                            f"{build.class_name} queued again")  # fmt: skip
            await self.load_builds()
