"""Builds of models of every output kind: how each candidate of each ladder
scores by the metric its outputs' kind calls for (edgefleet.fidelity), and
what int8 costs a real classifier.

Models: the zoo's (testkit.model_zoo: an image classifier, a U-Net
segmenter, a CTC recognizer, and the stateful GRU, tried with its steps as
independent samples), the demo's (demo.models: the digits MLP and small
CNN trained on scikit-learn's digits, with labelled samples, and the GRU
forecaster), and PP-OCR's pretrained direction classifier (downloaded from
PyPI in the rapidocr-onnxruntime wheel; skipped, with the reason, when the
download fails). Each is built in this process with the build pipeline
itself (controlplane.build.pipeline.run_build, no server) for an
onnxruntime class and, when the TFLite toolchain is installed, a tflite
class; both `auto`, no budgets.

Per model x class it prints every candidate: size, p50/p95 latency, the
the lowest judged output's fidelity ("lowest %", what the floor is
compared with), each output's metric
by its kind (the build's own, Measurement.fidelity), and the verdict; and
the build's time.

Then "model quality": for the labelled classifiers, each int8 candidate's
size against fp32's and its accuracy drop on the held-out samples (goal
>= 3.5x smaller at <= 1 point), and whether this CPU has fast int8
(VNNI or Arm dot product).

    python -m bench.bench_model_kinds                  # everything
    python -m bench.bench_model_kinds --no-tflite --out kinds.json
    python -m bench.bench_model_kinds --smoke          # CI: zoo + digits, onnxruntime, few runs
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import datetime as dt
import shutil
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from bench.bench_builds import host_versions, machine_info
from bench.jsonout import write_results
from edgefleet import fidelity
from edgefleet.controlplane.build.types import BuildTarget, Evaluated
from edgefleet.controlplane.errors import DomainError
from edgefleet.demo import models as demo
from testkit import model_zoo

# --smoke: what CI runs (tests/e2e/test_bench_smoke.py) so the benchmark
# cannot rot: the zoo's three models with samples and the digits MLP, on
# onnxruntime only, 8 samples, 20 timed runs. Figures meaningless.
SMOKE = {
    "samples": 8,
    "runs": 20,
    "tflite": False,
    "ppocr": False,
    "models": ["image_classifier", "unet_segmenter", "ctc_recognizer", "digits"],
}
INT8_GOAL_RATIO, INT8_GOAL_DROP_POINTS = 3.5, 1.0
# /proc/cpuinfo flags of integer dot-product instructions, which make int8
# kernels faster than fp32 ones (without them int8 saves size, not time).
FAST_INT8_FLAGS = ("avx512_vnni", "avx_vnni", "asimddp")

perf = time.perf_counter


@dataclass(frozen=True)
class Case:
    """A model ready to build: its file, its samples, its judging spec."""

    name: str
    source: str
    model: Path
    samples: Path
    specs: tuple[fidelity.OutputSpec, ...]
    labelled: bool
    note: str = ""


def _trim(sample_path: Path, count: int, dst: Path) -> Path:
    """The first `count` samples of an .npz (every array, labels too)."""
    with np.load(sample_path) as data:
        np.savez(dst, **{k: data[k][:count] for k in data.files})
    return dst


def zoo_case(name: str) -> Callable[[Path, argparse.Namespace], Case]:
    def make(root: Path, args: argparse.Namespace) -> Case:
        built = model_zoo.BUILDERS[name][0](root, samples=args.samples)
        if built.sample_data is None:
            # The push format has no place for gru_stateful's rank-0 gain
            # or its state: try its steps as independent samples anyway.
            seq = model_zoo.gru_sequence(args.samples)
            np.savez(root / "steps.npz", **seq)  # type: ignore[arg-type]
            samples, note = root / "steps.npz", "steps as independent samples"
        else:
            samples, note = built.sample_data, ""
        specs = model_zoo.output_specs(built.model, built.declared)
        return Case(name, "zoo", built.model, samples, tuple(specs), built.labelled, note)

    return make


def demo_case(name: str, builder: Callable[[Path], demo.BuiltModel]) -> Callable[..., Case]:
    def make(root: Path, args: argparse.Namespace) -> Case:
        built = builder(root)
        samples = _trim(built.sample_data, args.samples, root / "samples-used.npz")
        with np.load(samples) as data:
            labelled = "labels" in data.files
        specs = model_zoo.output_specs(built.model)
        note = f"held-out score of the trained model {built.accuracy:.3f}"
        return Case(name, "demo", built.model, samples, tuple(specs), labelled, note)

    return make


def ppocr_case(root: Path, args: argparse.Namespace) -> Case:
    """Raises demo.ModelUnavailable when the wheel cannot be downloaded."""
    model = args.ppocr_model or demo.fetch_ppocr_cls(root)
    samples = root / "samples.npz"
    np.savez(samples, x=demo.render_text_lines(args.samples))
    specs = model_zoo.output_specs(model)
    note = "pretrained MobileNetV3 (rapidocr-onnxruntime wheel); rendered text lines"
    return Case("ppocr_cls", "pretrained", model, samples, tuple(specs), False, note)


def _digits_wide(root: Path) -> demo.BuiltModel:
    # The digits MLP with 480 zero-weighted hidden units: the same answers
    # from a model whose size is its weights, as in real models (the plain
    # MLP's 10 KB are as much graph as weights, which int8 cannot shrink).
    return demo.build_digits_classifier(root, padding=480)


CASES: dict[str, Callable[[Path, argparse.Namespace], Case]] = {
    "image_classifier": zoo_case("image_classifier"),
    "unet_segmenter": zoo_case("unet_segmenter"),
    "ctc_recognizer": zoo_case("ctc_recognizer"),
    "gru_stateful": zoo_case("gru_stateful"),
    "digits": demo_case("digits", demo.build_digits_classifier),
    "digits_wide": demo_case("digits_wide", _digits_wide),
    "cnn": demo_case("cnn", demo.build_small_cnn),
    "gru": demo_case("gru", demo.build_gru_forecaster),
    "ppocr_cls": ppocr_case,
}


def classes(tflite: bool) -> list[BuildTarget]:
    targets = [BuildTarget(class_name="gateway", runtime="onnxruntime", quantization="auto")]
    if tflite:
        targets.append(BuildTarget(class_name="pi", runtime="tflite", quantization="auto"))
    return targets


def _with_specs(target: BuildTarget, case: Case) -> BuildTarget:
    """The target with the version's judging spec (BuildTarget.outputs)."""
    return dataclasses.replace(target, outputs=case.specs)


# ------------------------------------------------------------------ fidelity


def _fidelity_text(scores: Sequence[fidelity.OutputScore]) -> str:
    parts = []
    for s in scores:
        if s.metric.startswith("error"):
            parts.append(s.metric)
        elif not s.judged:
            diff = s.details.get("max abs diff")
            shown = "" if diff is None else f" (max|diff| {diff:.2g})"
            parts.append(f"{s.output}: state, not judged{shown}")
        else:
            parts.append(f"{s.output}: {s.metric} {s.value:.4f}")
    return "; ".join(parts)


# ------------------------------------------------------------------ builds


def run_case_build(case: Case, target: BuildTarget, workdir: Path, runs: int) -> dict[str, Any]:
    from edgefleet.controlplane.build.pipeline import run_build

    started = perf()
    try:
        result = run_build(
            case.model, case.samples, _with_specs(target, case), workdir,
            lambda fraction, message: None, runs=runs,
        )  # fmt: skip
    except DomainError as exc:
        return {"class": target.class_name, "runtime": target.runtime, "error": str(exc),
                "build_s": perf() - started, "candidates": []}  # fmt: skip
    build_s = perf() - started
    return {
        "class": target.class_name,
        "runtime": target.runtime,
        "error": "",
        "build_s": build_s,
        "reference_accuracy": result.reference_accuracy,
        "candidates": [_candidate(e, e.measurement.fidelity) for e in result.candidates],
        "log": list(result.log),
    }


def _candidate(e: Evaluated, scores: Sequence[fidelity.OutputScore]) -> dict[str, Any]:
    m = e.measurement
    return {
        "name": e.candidate.name,
        "precision": e.candidate.precision,
        "error": e.error,
        "size_bytes": m.size_bytes,
        "latency_p50_ms": m.latency_p50_ms,
        "latency_p95_ms": m.latency_p95_ms,
        "agreement": m.agreement,
        "accuracy": m.accuracy,
        "fidelity": [s.to_json() for s in scores],
        "fidelity_text": _fidelity_text(scores),
        "passed": e.passed,
        "chosen": e.chosen,
        "reasons": list(e.reasons),
    }


# ------------------------------------------------------------------ model quality


def fast_int8() -> list[str]:
    """The integer dot-product flags this CPU has (FAST_INT8_FLAGS)."""
    flags: set[str] = set()
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith(("flags", "features")):
                flags.update(line.split(":", 1)[1].split())
    return [f for f in FAST_INT8_FLAGS if f in flags]


def quality_rows(results: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Each int8 candidate of each labelled model's builds against that
    build's fp32 candidate: size ratio and accuracy drop in points."""
    rows = []
    for model in results:
        if not model.get("labelled"):
            continue
        for build in model["builds"]:
            ran = [c for c in build["candidates"] if not c["error"]]
            fp32 = next((c for c in ran if c["precision"] == "fp32"), None)
            reference = build.get("reference_accuracy")
            if fp32 is None or reference is None:
                continue
            for c in ran:
                if c["precision"] != "int8" or c["accuracy"] is None:
                    continue
                ratio = fp32["size_bytes"] / c["size_bytes"]
                drop = (reference - c["accuracy"]) * 100
                rows.append({
                    "model": model["name"], "class": build["class"], "candidate": c["name"],
                    "fp32_bytes": fp32["size_bytes"], "int8_bytes": c["size_bytes"],
                    "ratio": ratio, "fp32_accuracy": reference, "int8_accuracy": c["accuracy"],
                    "drop_points": drop,
                    "goal_met": ratio >= INT8_GOAL_RATIO and drop <= INT8_GOAL_DROP_POINTS,
                    "p50_fp32_ms": fp32["latency_p50_ms"], "p50_int8_ms": c["latency_p50_ms"],
                })  # fmt: skip
    return rows


# ------------------------------------------------------------------ report


def _table(headers: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def _verdict(c: dict[str, Any]) -> str:
    if c["error"]:
        return "error: " + str(c["error"]).splitlines()[0][:120]
    text = "CHOSEN" if c["chosen"] else ("passes" if c["passed"] else "fails")
    return text + (": " + "; ".join(c["reasons"]) if c["reasons"] else "")


def _ms(value: float) -> str:
    return f"{value:.3f}" if value > 0 else "-"


def print_report(results: dict[str, Any]) -> None:
    machine = results["machine"]
    flags = ", ".join(machine["cpu_flags"]) or "no notable flags"
    ort_version = results["host_packages"].get("onnxruntime", "?")
    print(f"# Model kinds: {results['date']}, {machine['cores']} x {machine['cpu_model']} "
          f"({flags}); onnxruntime {ort_version}; tflite: {results['tflite']}")  # fmt: skip
    for model in results["models"]:
        if model.get("skipped"):
            print(f"\n## {model['name']} ({model['source']}): skipped: {model['skipped']}")
            continue
        kinds = ", ".join(s["name"] + "=" + s["kind"] for s in model["specs"])
        note = f"; {model['note']}" if model["note"] else ""
        print(f"\n## {model['name']} ({model['source']}; {kinds}{note})")
        for build in model["builds"]:
            title = f"{model['name']} x {build['class']} ({build['runtime']})"
            if build["error"]:
                print(f"\n{title}: build failed in {build['build_s']:.1f} s: {build['error']}")
                continue
            print(f"\n{title}: build {build['build_s']:.1f} s")
            rows: list[tuple[str, ...]] = [
                (
                    c["name"],
                    f"{c['size_bytes'] / 1024:,.1f}" if c["size_bytes"] else "-",
                    _ms(c["latency_p50_ms"]),
                    _ms(c["latency_p95_ms"]),
                    "-" if c["error"] else f"{c['agreement'] * 100:.1f}",
                    c["fidelity_text"] or "-",
                    _verdict(c),
                )
                for c in build["candidates"]
            ]
            headers = ("candidate", "KiB", "p50 ms", "p95 ms", "lowest %", "metric by kind",
                       "verdict")  # fmt: skip
            print(_table(headers, rows))
    quality: list[tuple[str, ...]] = [
        (
            q["model"], q["class"], q["candidate"],
            f"{q['fp32_bytes']:,} -> {q['int8_bytes']:,}", f"{q['ratio']:.2f}x",
            f"{q['fp32_accuracy'] * 100:.1f} -> {q['int8_accuracy'] * 100:.1f}",
            f"{q['drop_points']:+.1f}", f"{q['p50_fp32_ms']:.3f} -> {q['p50_int8_ms']:.3f}",
            "met" if q["goal_met"] else "not met",
        )
        for q in results["quality"]
    ]  # fmt: skip
    int8_flags = results["fast_int8_flags"]
    print(
        f"\n## model quality: int8 vs fp32 (goal >= {INT8_GOAL_RATIO}x smaller at <= "
        f"{INT8_GOAL_DROP_POINTS:g} point drop); fast int8 on this host: "
        + (f"yes ({', '.join(int8_flags)})" if int8_flags else "no (no VNNI / dot-product flags)")
    )
    quality_headers = ("model", "class", "candidate", "bytes", "smaller", "accuracy %",
                       "drop pts", "p50 ms", "goal")  # fmt: skip
    print(_table(quality_headers, quality) if quality else "(no labelled model built)")
    print(f"\ntotal {results['total_s']:.1f} s")


# ------------------------------------------------------------------ main


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="EdgeFleet builds of models of every output kind")
    add = parser.add_argument
    add("--models", nargs="+", choices=list(CASES), metavar="NAME",
        help=f"only these (default: all of {', '.join(CASES)})")  # fmt: skip
    add("--samples", type=int, default=200,
        help="samples per model (the demo's: its first N, at most its 200 held-out ones); "
        "one sample is 100/N points of accuracy")  # fmt: skip
    add("--runs", type=int, default=200, help="timed runs per candidate (the build's default)")
    add("--no-tflite", dest="tflite", action="store_false",
        help="skip the tflite class even when its toolchain is installed")  # fmt: skip
    add("--no-ppocr", dest="ppocr", action="store_false", help="skip the PP-OCR download")
    add("--ppocr-model", type=Path, help="the PP-OCR classifier .onnx (skips the download)")
    add("--out", type=Path, help="write the JSON results (with every build's log) here")
    add("--smoke", action="store_true", help="CI's short run (SMOKE)")
    args = parser.parse_args(argv)
    if args.smoke:
        chosen = args.models
        vars(args).update(SMOKE)
        args.models = chosen or SMOKE["models"]
    args.models = args.models or list(CASES)
    if args.samples < 1 or args.runs < 1:
        parser.error("--samples and --runs must be >= 1")
    return args


def _say(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def run(args: argparse.Namespace) -> dict[str, Any]:
    from edgefleet.controlplane.build.toolchain import find_tflite

    started = dt.datetime.now(dt.UTC)
    tflite = args.tflite and find_tflite() is not None
    tflite_state = "built" if tflite else ("off (--no-tflite)" if not args.tflite else
                                           "toolchain not installed")  # fmt: skip
    names = [n for n in args.models if n != "ppocr_cls" or args.ppocr]
    models: list[dict[str, Any]] = []
    tmp = Path(tempfile.mkdtemp(prefix="edgefleet-bench-kinds-"))
    try:
        for name in names:
            root = tmp / name
            root.mkdir()
            try:
                case = CASES[name](root, args)
            except demo.ModelUnavailable as exc:
                models.append({"name": name, "source": "pretrained", "skipped": str(exc)})
                _say(f"{name}: skipped: {exc}")
                continue
            record: dict[str, Any] = {
                "name": name, "source": case.source, "note": case.note, "labelled": case.labelled,
                "specs": [s.to_json() for s in case.specs], "builds": [],
            }  # fmt: skip
            for target in classes(tflite):
                _say(f"{name}: building for {target.class_name} ({target.runtime})")
                build = run_case_build(case, target, root / target.class_name, args.runs)
                failed = f", {build['error']}" if build["error"] else ""
                _say(f"  {build['build_s']:.1f} s{failed}")
                record["builds"].append(build)
            models.append(record)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return {
        "date": started.date().isoformat(),
        "started_at": started.isoformat(timespec="seconds"),
        "machine": machine_info(),
        "host_packages": host_versions(),
        "tflite": tflite_state,
        "fast_int8_flags": fast_int8(),
        "args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
        "models": models,
        "quality": quality_rows(models),
    }


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    started = perf()
    results = run(args)
    results["total_s"] = perf() - started
    print_report(results)
    if args.out:
        write_results(args.out, results)
        _say(f"results written to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
