"""The demo fleet: a control plane on embedded SQLite in a temp dir, five real
agents with different device profiles, device classes that place them, an
operator accepting a pending device, and a real model pushed to the registry.
Every operator step goes through the real `edgefleet` CLI; at the end the
terminal UI opens on the fleet (`--tui-headless` tours it without a terminal,
`--no-tui` or EDGEFLEET_DEMO_TUI=off skips it)."""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from rich.console import Console
from rich.rule import Rule

from edgefleet.demo.models import build_digits_classifier, build_small_cnn
from edgefleet.polling import WaitTimeout, wait_for

BIN = Path(sys.executable).parent
# How often the demo asks again while it waits: some questions are CLI runs.
POLL_S = 0.2
FINAL_ROLLOUT_STATES = (
    "ROLLOUT_STATE_SUCCEEDED", "ROLLOUT_STATE_SUCCEEDED_WITH_FAILURES", "ROLLOUT_STATE_ABORTED",
    "ROLLOUT_STATE_PAUSED",
)  # fmt: skip
# The second model every device holds beside the digits MLP.
CNN = "digits-cnn"
# The devices the apps of the rollout step call, both models on each.
APP_DEVICES = ("gateway-1", "pi-kitchen", "pi-hallway")
console = Console()


@dataclass(frozen=True)
class DemoDevice:
    name: str
    labels: dict[str, str]
    hardware: dict[str, Any] = field(default_factory=dict)
    pending: bool = False


DEVICES = [
    DemoDevice(
        "pi-kitchen",
        {"tier": "canary"},
        {"arch": "aarch64", "cpu_model": "Cortex-A72", "cpu_cores": 4, "memory_mb": 3884,
         "board_model": "Raspberry Pi 4 Model B Rev 1.4", "accelerators": []},
    ),
    DemoDevice(
        "pi-hallway",
        {"tier": "stable"},
        {"arch": "aarch64", "cpu_model": "Cortex-A76", "cpu_cores": 4, "memory_mb": 3950,
         "board_model": "Raspberry Pi 5 Model B Rev 1.0", "accelerators": []},
    ),
    DemoDevice(
        "jetson-dock",
        {"tier": "stable"},
        {"arch": "aarch64", "cpu_model": "ARMv8 Processor rev 1 (v8l)", "cpu_cores": 6,
         "memory_mb": 7620, "board_model": "NVIDIA Jetson Orin Nano Developer Kit",
         "accelerators": [{"kind": "jetson", "name": "Orin (nvgpu)", "memory_mb": 7620}]},
    ),
    # This machine as it is: nothing overridden.
    DemoDevice("gateway-1", {"tier": "stable"}),
    DemoDevice(
        "field-unit-7",
        {"tier": "stable"},
        {"arch": "armv7l", "cpu_model": "ARMv7 Processor rev 4 (v7l)", "cpu_cores": 4,
         "memory_mb": 922, "board_model": "Raspberry Pi 3 Model B Plus Rev 1.3",
         "accelerators": []},
        pending=True,
    ),
]  # fmt: skip

CLASSES = [
    ["pi-class", "--runtime", "tflite", "--quantization", "int8", "--max-size-mb", "4",
     "--latency-budget-ms", "30", "--max-memory-mb", "16", "--min-accuracy-retention", "0.98",
     "--description", "Raspberry Pi 4/5 class boards",
     "--match", "arch == aarch64", "--match", "memory_mb < 4096"],
    ["jetson", "--runtime", "tensorrt", "--accelerator", "jetson", "--quantization", "fp16",
     "--latency-budget-ms", "5", "--max-memory-mb", "2048", "--priority", "10",
     "--description", "NVIDIA Jetson modules", "--match", "accelerator == jetson"],
    ["x86-gateway", "--runtime", "onnxruntime", "--quantization", "auto",
     "--latency-budget-ms", "10", "--max-memory-mb", "1024",
     "--description", "x86 gateways", "--match", "arch == x86_64"],
    # No rules (nothing is placed in it): a microcontroller profile whose 2 KB
    # flash budget no candidate can meet, to show a failed build's report.
    ["tiny-mcu", "--runtime", "tflite", "--quantization", "int8", "--microcontroller",
     "--max-size-mb", "0.002", "--description", "Cortex-M class with 2 KB for the model"],
]  # fmt: skip


def _toml(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    return json.dumps(str(value))


def agent_config(device: DemoDevice, server: str, token: str, state_dir: Path) -> str:
    """A TOML agent config (see agent/packaging/agent.example.toml)."""
    lines = [
        f"server = {_toml(server)}",
        # The demo's control plane serves plain text (edgefleet server --insecure).
        "insecure = true",
        f"enrollment_token = {_toml(token)}",
        f"state_dir = {_toml(state_dir)}",
        f"name = {_toml(device.name)}",
        f"hardware_id = {_toml('demo-' + device.name)}",
        "backoff_max_s = 5",
        # Short intervals so the demo shows telemetry within seconds.
        "telemetry_interval_s = 2",
        "[labels]",
        *(f"{k} = {_toml(v)}" for k, v in device.labels.items()),
    ]
    if device.hardware:
        lines.append("[hardware]")
        hw = dict(device.hardware)
        accelerators = hw.pop("accelerators", None)
        lines += [f"{k} = {_toml(v)}" for k, v in hw.items()]
        if accelerators == []:
            lines.append("accelerators = []")
        for acc in accelerators or []:
            lines.append("[[hardware.accelerators]]")
            lines += [f"{k} = {_toml(v)}" for k, v in acc.items()]
    return "\n".join(lines) + "\n"


class Demo:
    def __init__(self, data_dir: Path) -> None:
        self.data_dir = data_dir
        self.server: subprocess.Popen[bytes] | None = None
        self.agents: list[subprocess.Popen[bytes]] = []
        self.env = dict(os.environ)
        # The CNN's answers while the digits rollout runs: version -> calls,
        # and every failed call (there must be none: it is not being updated).
        self.cnn_versions: dict[str, int] = {}
        self.cnn_failures: list[str] = []

    def step(self, title: str) -> None:
        console.print(Rule(f"[bold]{title}"))

    def cli(self, *args: str, capture: bool = False, check: bool = True, echo: bool = True) -> str:
        """Run `edgefleet ARGS`, echoing the command like a terminal session
        (polls pass echo=False)."""
        shown = " ".join(a if " " not in a else repr(a) for a in args)
        if echo:
            console.print(f"[dim]$[/] [bold cyan]edgefleet {shown}[/]")
        result = subprocess.run(
            [str(BIN / "edgefleet"), *args],
            env=self.env,
            stdout=subprocess.PIPE if capture else None,
            text=True,
        )
        if result.returncode != 0 and check:
            raise SystemExit(f"demo step failed: edgefleet {shown}")
        return result.stdout or ""

    def start_server(self) -> None:
        self.step("Start a control plane (embedded SQLite)")
        port_file = self.data_dir / "port"
        log = open(self.data_dir / "server.log", "wb")  # noqa: SIM115 - the child owns it
        self.server = subprocess.Popen(
            # Plain text: the demo's agents and simulated devices run on this machine.
            [str(BIN / "edgefleet"), "server", "--insecure",
             "--data-dir", str(self.data_dir / "cp"), "--listen", "127.0.0.1:0",
             "--port-file", str(port_file), "--heartbeat-interval", "5",
             # Two models x four classes: two builds at a time halve the wait.
             "--build-workers", "2"],
            stdout=log, stderr=subprocess.STDOUT,
        )  # fmt: skip
        server = self.server

        def listening() -> bool:
            if server.poll() is not None:
                raise SystemExit("gave up waiting for the control plane to listen: it exited")
            return port_file.exists()

        wait_for(listening, 60, what="the control plane to listen", interval=POLL_S)
        address = f"127.0.0.1:{port_file.read_text().strip()}"
        token = (self.data_dir / "cp" / "admin-token").read_text().strip()
        self.env.update(EDGEFLEET_SERVER=address, EDGEFLEET_TOKEN=token)
        console.print(f"control plane on [bold]{address}[/], data in {self.data_dir / 'cp'}")
        console.print("bootstrap admin token written to cp/admin-token (mode 0600)")

    def create_classes(self) -> None:
        self.step("Device classes: constraint profiles and match rules")
        for args in CLASSES:
            self.cli("classes", "create", *args, capture=True)
        self.cli("classes", "ls")

    def start_agents(self) -> None:
        self.step("Enrollment tokens, then five agents boot and register")
        auto = json.loads(
            self.cli("tokens", "create", "--name", "demo-fleet", "--label", "site=demo",
                     "--max-uses", "10", "--json", capture=True)
        )["secret"]  # fmt: skip
        pending = json.loads(
            self.cli("tokens", "create", "--name", "field-units", "--policy", "pending",
                     "--json", capture=True)
        )["secret"]  # fmt: skip
        for device in DEVICES:
            home = self.data_dir / "agents" / device.name
            home.mkdir(parents=True, exist_ok=True)
            config = home / "agent.toml"
            token = pending if device.pending else auto
            config.write_text(
                agent_config(device, self.env["EDGEFLEET_SERVER"], token, home / "state")
            )
            log = open(home / "agent.log", "wb")  # noqa: SIM115 - the child owns it
            self.agents.append(
                subprocess.Popen(
                    [str(BIN / "edgefleet-agent"), "--config", str(config)],
                    stdout=log, stderr=subprocess.STDOUT,
                )
            )  # fmt: skip
        console.print(f"started {len(self.agents)} edgefleet-agent processes")
        try:
            # Generous: five agents importing their runtimes at once on a
            # busy two-core machine take a while.
            wait_for(lambda: self.agents_up() and len(self.devices()) == len(DEVICES), 120,
                     what="every agent to register", interval=POLL_S)  # fmt: skip
            wait_for(lambda: self.agents_up() and all(d.get("online") for d in self.devices()),
                     120, what="every agent to connect", interval=POLL_S)  # fmt: skip
        except WaitTimeout:
            self.agents_report()
            raise

    def agents_up(self) -> bool:
        """True while every agent runs; an exited one ends the demo with
        its log, rather than a wait for one that will never come."""
        if all(proc.poll() is None for proc in self.agents):
            return True
        self.agents_report()
        raise SystemExit("an agent exited before the fleet was up (its log is above)")
        self.cli("devices", "ls")

    def agents_report(self) -> None:
        """Each agent's exit status and the end of its log, for a demo that
        gave up waiting for them."""
        for device, proc in zip(DEVICES, self.agents, strict=False):
            log = self.data_dir / "agents" / device.name / "agent.log"
            tail = log.read_text(errors="replace").splitlines()[-5:] if log.exists() else []
            status = "running" if proc.poll() is None else f"exited {proc.returncode}"
            console.print(f"agent {device.name} ({status}), the end of {log}:", markup=False)
            for line in tail:
                console.print(f"  {line}", markup=False, soft_wrap=True)

    def devices(self) -> list[dict[str, Any]]:
        out = subprocess.run(
            [str(BIN / "edgefleet"), "devices", "ls", "--json"],
            env=self.env, capture_output=True, text=True, check=True,
        ).stdout  # fmt: skip
        return list(json.loads(out))

    def accept_pending(self) -> None:
        self.step("An operator accepts the pending device")
        pending = [d for d in self.devices() if d["state"] == "DEVICE_STATE_PENDING"]
        for device in pending:
            self.cli("devices", "accept", device["id"])
        self.cli("devices", "ls", "--unclassified")
        jetson = next(d for d in self.devices() if d["name"] == "jetson-dock")
        self.cli("devices", "show", jetson["id"])

    def push_model(self) -> None:
        self.step("Push two real models: an MLP and a CNN trained on scikit-learn's digits")
        built = build_digits_classifier(self.data_dir / "model")
        console.print(f"MLP trained; held-out accuracy {built.accuracy:.1%}")
        self.cli("models", "push", "digits", "1.0.0", str(built.model),
                 "--sample-data", str(built.sample_data), "--labels", str(built.labels),
                 "--description", "8x8 digits classifier")  # fmt: skip
        cnn = build_small_cnn(self.data_dir / "cnn")
        console.print(f"CNN trained; held-out accuracy {cnn.accuracy:.1%}")
        self.cli("models", "push", CNN, "1.0.0", str(cnn.model),
                 "--sample-data", str(cnn.sample_data), "--labels", str(cnn.labels),
                 "--description", "8x8 digits CNN (1x8x8 images)")  # fmt: skip
        self.cli("models", "ls")

    def show_builds(self) -> None:
        self.step("Builds: each class gets its best measured artifact, or says why not")
        # The push queued one build per class; `builds run` finds them (no
        # rebuild: same inputs, same result) and waits. It exits 1 because
        # the tiny-mcu build must fail.
        self.cli("builds", "run", "digits@1.0.0", check=False)
        self.cli("builds", "run", f"{CNN}@1.0.0", check=False, capture=True)
        builds = json.loads(self.cli("builds", "ls", "--json", capture=True))
        pi = next(
            b for b in builds if b["class_name"] == "pi-class" and b["model_name"] == "digits"
        )
        self.cli("builds", "show", pi["id"])
        self.cli("artifacts", "ls")

    def deploy(self) -> None:
        self.step("Deploy both models: every classified device installs its class's artifacts")
        devices = self.devices()
        targets = [d for d in devices if d.get("class_name")]
        for model in ("digits", CNN):
            self.cli("devices", "assign", f"{model}@1.0.0", *(d["id"] for d in targets),
                     "--reason", "first install")  # fmt: skip

        def settled() -> bool:
            placed = [d for d in self.devices() if d.get("class_name")]
            states = [m.get("state") for d in placed for m in d.get("models", [])]
            return len(states) == 2 * len(placed) and all(
                s in ("committed", "failed") for s in states
            )

        wait_for(settled, 180, what="every device to install or reject both models",
                 interval=POLL_S)  # fmt: skip
        self.cli("devices", "ls")
        # No TensorRT on this machine: the Jetson's agent refuses the artifact
        # when it validates it, and says why.
        jetson = next(d for d in devices if d["name"] == "jetson-dock")
        self.cli("devices", "history", jetson["id"])

    def serve(self) -> None:
        self.step("Apps on a device call the on-device inference API")
        from sklearn.datasets import load_digits

        from edgefleet.agent.inference_client import InferenceClient

        digits = load_digits()
        x = (digits.data[-8:] / 16.0).astype(np.float32)
        # Each model as its own input: the MLP flat (64), the CNN an image (1x8x8).
        calls = {"digits": ("input", x), CNN: ("image", x.reshape(-1, 1, 8, 8))}
        for name in ("gateway-1", "pi-kitchen"):
            socket = self.data_dir / "agents" / name / "state" / "predict.sock"
            with InferenceClient(socket) as client:
                for model, (input_name, batch) in calls.items():
                    predicted, version = [], ""
                    # One image per call: the Pi's TFLite artifacts have a fixed batch of 1.
                    for row in batch:
                        reply = client.predict(model, {input_name: row[None]}, timeout_s=5)
                        scores = next(iter(reply.outputs.values()))
                        predicted.append(int(scores.argmax()))
                        version = reply.model_version
                    console.print(
                        f"{name} ({model} {version}): predicted {predicted}, "
                        f"true {[int(t) for t in digits.target[-8:]]}"
                    )
        self.step("Telemetry: requests and p95 latency per device, as agents report them")

        def reported() -> bool:
            out = self.cli("telemetry", "query", "request-count", "--model", "digits", "--json",
                           capture=True, echo=False)  # fmt: skip
            return any(series.get("points") for series in json.loads(out))

        wait_for(reported, 60, what="telemetry to arrive", interval=POLL_S)
        self.cli("telemetry", "query", "latency-p95-ms", "--by", "device", "--model", "digits",
                 "--since", "5m", "--step", "1m")  # fmt: skip

    def rollout(self) -> None:
        self.step(
            "A staged rollout of digits 1.1.0 while apps call both models: health gates "
            f"decide, a failing class goes back, {CNN} is never touched"
        )
        # 1.1.0 answers like a retrained 1.0.0 but holds 20,000 more hidden
        # units: about 1.5 MB more as int8 on the Pis, 6 MB as fp32 on the
        # gateway.
        built = build_digits_classifier(self.data_dir / "model-1.1", seed=1, padding=20_000)
        self.cli("models", "push", "digits", "1.1.0", str(built.model),
                 "--sample-data", str(built.sample_data), "--labels", str(built.labels),
                 capture=True)  # fmt: skip
        # Waits for the builds; exits 1 because tiny-mcu's must fail.
        self.cli("builds", "run", "digits@1.1.0", check=False, capture=True)
        # The memory gate judges the memory the model adds on each device (as
        # its agent measured it at load) against 5 % of the class's model
        # memory limit: 0.8 MB on the Pis (16 MB), which 1.1.0's 1.5 MB
        # exceed, and 51 MB on the gateway (1024 MB). So the Pis fail the gate on the
        # model's own size and are dropped and put back on 1.0.0; the gateway
        # carries on.
        spec = ["digits@1.1.0", "--class", "pi-class", "--class", "x86-gateway",
                "--stage", "2,stratified,bake=8s,memory=0.05,on-failure=abort",
                "--stage", "100%"]  # fmt: skip
        self.cli("rollouts", "create", *spec, "--dry-run")
        created = json.loads(self.cli("rollouts", "create", *spec, "--start", "--json",
                                      capture=True))  # fmt: skip
        rollout_id = created["id"]
        stop = threading.Event()
        traffic = threading.Thread(target=self._traffic, args=(stop,), daemon=True)
        traffic.start()
        try:

            def ended() -> bool:
                out = self.cli("rollouts", "show", rollout_id, "--json", capture=True, echo=False)
                shown = json.loads(out)
                devices = shown.get("devices", [])
                settling = any(d.get("state") in ("ROLLOUT_DEVICE_STATE_IN_PROGRESS",
                                                  "ROLLOUT_DEVICE_STATE_REVERTING")
                               for d in devices)  # fmt: skip
                return shown.get("state") in FINAL_ROLLOUT_STATES and not settling

            wait_for(ended, 180, what="the rollout to finish", interval=POLL_S)
        finally:
            stop.set()
            traffic.join()
        self.cli("rollouts", "show", rollout_id)
        self.cli("devices", "ls")
        answered = sum(self.cnn_versions.values())
        # One line however narrow the terminal (scripts and the demo's test read it).
        console.print(
            f"{CNN} on {', '.join(APP_DEVICES)} while digits rolled out: {answered} calls "
            f"answered, {len(self.cnn_failures)} failed, versions {sorted(self.cnn_versions)}",
            soft_wrap=True,
            markup=False,
            highlight=False,
        )
        for failure in self.cnn_failures[:3]:
            console.print(f"  {failure}", markup=False)

    def _traffic(self, stop: threading.Event) -> None:
        """Apps calling both models while the rollout runs: the health gates
        judge the new digits version on this traffic's telemetry, and the
        CNN's answers show that updating one model leaves the other alone."""
        from edgefleet.agent.inference_client import InferenceClient

        image = np.zeros((1, 1, 8, 8), dtype=np.float32)
        x = np.zeros((1, 64), dtype=np.float32)
        clients = [InferenceClient(self.data_dir / "agents" / name / "state" / "predict.sock")
                   for name in APP_DEVICES]  # fmt: skip
        try:
            while not stop.wait(0.1):
                for name, client in zip(APP_DEVICES, clients, strict=True):
                    # A digits version being swapped in or back may refuse a call.
                    with contextlib.suppress(Exception):
                        client.predict("digits", {"input": x}, timeout_s=1)
                    try:
                        reply = client.predict(CNN, {"image": image}, timeout_s=1)
                    except Exception as exc:  # never expected: nobody updates the CNN
                        self.cnn_failures.append(f"{name}: {type(exc).__name__}: {exc}")
                        continue
                    version = reply.model_version
                    self.cnn_versions[version] = self.cnn_versions.get(version, 0) + 1
        finally:
            for client in clients:
                client.close()

    def tui(self, mode: str) -> None:
        """Open the TUI on the demo fleet: the real one on a terminal, a
        headless tour of every screen with `headless`, nothing with `off`
        (or when not on a terminal, so a piped run does not hang)."""
        from edgefleet.tui.client import FleetClient

        client = FleetClient(self.env["EDGEFLEET_SERVER"], self.env["EDGEFLEET_TOKEN"])
        if mode == "headless":
            from edgefleet.tui.tour import run_tour

            self.step("The operators' TUI (headless: a pilot visits every screen)")
            for line in run_tour(client):
                console.print(line, markup=False, highlight=False)
            return
        if mode == "off" or not (sys.stdin.isatty() and sys.stdout.isatty()):
            console.print("TUI: not a terminal, skipped (--tui-headless tours it without one; "
                          "`edgefleet tui` opens it)")  # fmt: skip
            return
        from edgefleet.tui.app import make_app

        self.step("The operators' TUI: q quits (the demo then stops the fleet)")
        make_app(client).run()

    def stop(self) -> None:
        for proc in [*self.agents, self.server]:
            if proc is not None and proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for proc in [*self.agents, self.server]:
            if proc is not None:
                try:
                    proc.wait(15)
                except subprocess.TimeoutExpired:
                    proc.kill()


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--data-dir", type=Path, help="keep the demo's data here (default: temp)")
    parser.add_argument(
        "--keep-running", action="store_true", help="leave the fleet running until Ctrl-C"
    )
    tui = parser.add_mutually_exclusive_group()
    tui.add_argument(
        "--tui-headless", action="store_const", const="headless", dest="tui",
        help="tour the TUI's screens without a terminal and print what they show (CI)",
    )  # fmt: skip
    tui.add_argument("--no-tui", action="store_const", const="off", dest="tui",
                     help="do not open the TUI at the end")  # fmt: skip
    parser.set_defaults(tui=os.environ.get("EDGEFLEET_DEMO_TUI", "on"))
    args = parser.parse_args(argv)
    data_dir = args.data_dir or Path(tempfile.mkdtemp(prefix="edgefleet-demo-"))
    data_dir.mkdir(parents=True, exist_ok=True)
    demo = Demo(data_dir)
    try:
        demo.start_server()
        demo.create_classes()
        demo.start_agents()
        demo.accept_pending()
        demo.push_model()
        demo.show_builds()
        demo.deploy()
        demo.serve()
        demo.rollout()
        demo.tui(args.tui)
        demo.step("Done")
        console.print(
            "Agents registered on boot, were placed in classes by rules, the pending one was "
            "accepted, two models were pushed, every class got a measured, signed artifact "
            "of each (or a report of what each candidate missed), the devices installed "
            "both side by side (the Jetson refused its TensorRT artifacts: no TensorRT "
            "here), served real inference to apps, and reported telemetry; a staged rollout "
            "of digits 1.1.0 dropped the class that failed its health gate (back on 1.0.0) "
            f"and completed on the other, while {CNN} kept answering, untouched."
        )
        if args.keep_running:
            console.print(
                f"Fleet running. In another shell:\n  export EDGEFLEET_SERVER="
                f"{demo.env['EDGEFLEET_SERVER']} EDGEFLEET_TOKEN={demo.env['EDGEFLEET_TOKEN']}\n"
                "  edgefleet devices ls\nCtrl-C stops it."
            )
            signal.sigwait({signal.SIGINT, signal.SIGTERM})
    except WaitTimeout as exc:
        raise SystemExit(str(exc)) from None  # a line for the operator, not a traceback
    finally:
        demo.stop()
        if args.data_dir is None and not args.keep_running:
            shutil.rmtree(data_dir, ignore_errors=True)


if __name__ == "__main__":
    main()
