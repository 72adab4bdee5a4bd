"""`edgefleet-agent predict` over the real fast-path unix socket of a real
ModelHost serving a model installed by the real update machine (in this
process: the integration tier starts no edgefleet programs)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from edgefleet.agent.serving import warm_inputs
from edgefleet.demo.models import build_digits_classifier
from testkit.update_rig import ModelsRig, model_assignment


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("models")
    return {"1.0.0": build_digits_classifier(root / "m", hidden=16, seed=0).model}


def test_the_predict_command_calls_the_agents_socket(
    tmp_path: Path, models: dict[str, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    """`edgefleet-agent predict` over the real fast-path socket of a real
    ModelHost (in this process: the e2e tier runs it against a real agent)."""
    from edgefleet.agent.inference_server import FAST_SOCKET_NAME, FramedServer
    from edgefleet.agent.main import main

    rig = ModelsRig(tmp_path / "state")
    a, data = model_assignment(models["1.0.0"], "alpha", "1.0.0", 1)
    rig.downloader.add(data)
    rig.boot()
    rig.assign(a)
    rig.settled("alpha", 1)
    spec = rig.host.active("alpha").accepts
    sample = tmp_path / "sample.npz"
    np.savez(sample, **warm_inputs(spec))
    state = str(tmp_path / "state")
    # No agent yet: the path is named.
    assert main(["predict", "--model", "alpha", "--input", str(sample), "--state-dir", state]) == 1
    assert FAST_SOCKET_NAME in capsys.readouterr().err
    server = FramedServer(rig.host, tmp_path / "state" / FAST_SOCKET_NAME)
    server.start()
    try:
        argv = ["predict", "--model", "alpha", "--input", str(sample), "--state-dir", state]
        assert main([*argv, "--json"]) == 0
        answer = json.loads(capsys.readouterr().out)
        assert answer["model_version"] == "1.0.0" and answer["outputs"]
        assert main(argv) == 0
        assert "alpha 1.0.0" in capsys.readouterr().out
        # Unknown model: the agent's message, listing what it serves.
        argv[2] = "nope"
        assert main(argv) == 1
        assert "NOT_FOUND" in (err := capsys.readouterr().err) and "alpha" in err
        # A file that is not an .npz: a usage error.
        bad = tmp_path / "bad.npz"
        bad.write_bytes(b"not a zip")
        argv[2], argv[4] = "alpha", str(bad)
        assert main(argv) == 2
        assert "not an .npz" in capsys.readouterr().err
        # A missing input: the agent's message.
        empty = tmp_path / "wrong.npz"
        np.savez(empty, other=np.zeros(3, dtype=np.float32))
        argv[4] = str(empty)
        assert main(argv) == 1
        assert "INVALID_ARGUMENT" in capsys.readouterr().err
        # A deadline that has passed before the call is a usage error.
        for timeout in ("0", "-1", "nan"):
            assert main([*argv, "--timeout", timeout]) == 2
            assert "positive number of seconds" in capsys.readouterr().err
    finally:
        server.stop(0)
        rig.stop()
