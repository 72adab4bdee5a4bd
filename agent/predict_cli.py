"""`edgefleet-agent predict`: one inference call to the running agent on this
device, from the command line, over its fast-path unix socket
(<state_dir>/predict.sock, agent/inference_client.py).

    edgefleet-agent predict --model digits --input sample.npz [--json]
        [--state-dir DIR | --config FILE]

The .npz's arrays are the inputs, keyed by input name (np.savez(path,
input=x)); pickled objects are never loaded. The first line names the model,
the version that answered and which of its artifacts served ("primary", or
"fallback" while the power/thermal policy serves the lighter one); then the
outputs, one line each (name, shape, dtype, a short summary). With --json,
all of it as one JSON object ("variant" is "" from an agent that does not
say).

Exit status: 0 when the call succeeded, 1 when it failed (the agent is not
running, it refused the request: the agent's message is printed), 2 for a
usage or configuration error (a bad or missing .npz, an unreadable config)."""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import zipfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from edgefleet.agent.config import default_config_path, load_config
from edgefleet.agent.errors import ConfigError
from edgefleet.agent.inference_client import (
    InferenceClient,
    InferenceError,
    Result,
    tensor_array,
    tensor_message,
)
from edgefleet.v1 import common_pb2, inference_pb2

# Where the agent listens (agent/inference_server.py FAST_SOCKET_NAME): not
# imported from there, which would load the gRPC server for one call.
FAST_SOCKET_NAME = "predict.sock"
OK, CALL_FAILED, USAGE = 0, 1, 2
PROG = "edgefleet-agent predict"


class UsageError(Exception):
    """Bad arguments, config or input file: exit status 2."""


def _seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of seconds") from None
    if not math.isfinite(value) or value <= 0:
        raise argparse.ArgumentTypeError(f"{text}: must be a positive number of seconds")
    return value


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog=PROG, description="Run one inference on the agent running on this device."
    )
    p.add_argument("--model", required=True, help="the model's name")
    p.add_argument("--input", required=True, type=Path, help=".npz file: one array per input name")
    p.add_argument("--json", action="store_true", help="print the outputs as JSON, in full")
    p.add_argument(
        "--timeout", type=_seconds, default=30.0, help="seconds, > 0 (default: %(default)s)"
    )
    where = p.add_mutually_exclusive_group()
    where.add_argument("--state-dir", type=Path, help="the agent's state directory")
    where.add_argument(
        "--config", type=Path, help="the agent's config file (its state_dir is used)"
    )
    return p


def socket_path(state_dir: Path | None, config: Path | None) -> Path:
    """The fast-path socket of the agent whose state directory is given, or
    named by its config (default: the agent's default config path)."""
    if state_dir is None:
        try:
            state_dir = load_config(config or default_config_path()).state_dir
        except ConfigError as exc:
            raise UsageError(exc.message) from exc
    return state_dir / FAST_SOCKET_NAME


def load_inputs(path: Path) -> dict[str, np.ndarray]:
    """The arrays of the .npz at `path`, by name (no pickles)."""
    try:
        if not path.is_file():
            raise FileNotFoundError(path)
        if not zipfile.is_zipfile(path):
            # np.load would try the file as a pickle (and refuse) or a .npy.
            raise UsageError(f"{path}: not an .npz archive (a zip of .npy arrays)")
        with np.load(path, allow_pickle=False) as archive:
            if not isinstance(archive, np.lib.npyio.NpzFile):
                raise UsageError(f"{path}: not an .npz archive (a single .npy array?)")
            inputs = {name: archive[name] for name in archive.files}
    except FileNotFoundError:
        raise UsageError(f"{path}: no such file") from None
    except (zipfile.BadZipFile, EOFError) as exc:
        raise UsageError(f"{path}: not an .npz archive ({exc})") from None
    except ValueError as exc:  # pickled object arrays, a corrupt member
        raise UsageError(f"{path}: cannot read its arrays: {exc}") from None
    except OSError as exc:
        raise UsageError(f"{path}: cannot read it: {exc.strerror or exc}") from None
    if not inputs:
        raise UsageError(f"{path}: holds no arrays (save them with np.savez(path, input=x))")
    return inputs


def summary(array: np.ndarray) -> str:
    """One line about `array`: its shape, dtype and a few values."""
    head = f"shape {tuple(array.shape)} {array.dtype}"
    if array.size == 0:
        return head
    if np.issubdtype(array.dtype, np.number):
        head += f" min {array.min():.6g} max {array.max():.6g}"
        if array.ndim >= 1 and array.shape[-1] > 1:
            top = np.argmax(array.reshape(-1, array.shape[-1]), axis=-1)
            head += f" argmax {top[:8].tolist()}{' ...' if top.size > 8 else ''}"
    flat = array.reshape(-1)[:6].tolist()
    return f"{head} values {flat}{' ...' if array.size > 6 else ''}"


# ArtifactVariant -> what the output calls it ("" for an agent that does not say).
VARIANTS = {
    common_pb2.ARTIFACT_VARIANT_PRIMARY: "primary",
    common_pb2.ARTIFACT_VARIANT_FALLBACK: "fallback",
}


def as_json(model: str, result: Result, variant: str = "") -> dict[str, Any]:
    return {
        "model_name": model,
        "model_version": result.model_version,
        "variant": variant,
        "outputs": {
            name: {"dtype": str(a.dtype), "shape": list(a.shape), "data": a.tolist()}
            for name, a in result.outputs.items()
        },
    }


def main(argv: Sequence[str]) -> int:
    try:
        args = parser().parse_args(argv)
    except SystemExit as exc:  # argparse printed the usage
        return OK if exc.code == 0 else USAGE
    try:
        inputs = load_inputs(args.input)
        path = socket_path(args.state_dir, args.config)
    except UsageError as exc:
        print(f"{PROG}: {exc}", file=sys.stderr)
        return USAGE
    if not path.exists():
        print(
            f"{PROG}: no agent listening at {path}: is edgefleet-agent running with "
            "this state directory?",
            file=sys.stderr,
        )
        return CALL_FAILED
    try:
        with InferenceClient(path) as client:
            request = inference_pb2.PredictRequest(
                model_name=args.model,
                inputs=[tensor_message(name, array) for name, array in inputs.items()],
            )
            # The message itself, not client.predict(): its answer says
            # which artifact served.
            response = client.predict_message(request, timeout_s=args.timeout)
            result = Result(
                response.model_version, {t.name: tensor_array(t) for t in response.outputs}
            )
            variant = VARIANTS.get(response.variant, "")
    except InferenceError as exc:
        print(f"{PROG}: {exc}", file=sys.stderr)
        return CALL_FAILED
    except OSError as exc:
        print(f"{PROG}: cannot reach the agent at {path}: {exc}", file=sys.stderr)
        return CALL_FAILED
    try:
        if args.json:
            print(json.dumps(as_json(args.model, result, variant)))
            return OK
        print(f"{args.model} {result.model_version}" + (f" ({variant})" if variant else ""))
        for name, array in result.outputs.items():
            print(f"  {name}: {summary(array)}")
    except BrokenPipeError:
        # The reader went away (`| head`): what it read was enough. Point
        # stdout at nothing so the interpreter's final flush stays quiet.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    return OK
