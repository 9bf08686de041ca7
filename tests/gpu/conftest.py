"""Fixtures of the hardware validation suite (tests/gpu): the NVML backend and the run report.

Backends:

* real NVML (``pynvml`` from nvidia-ml-py), the default. Without a GPU
  (``nvmlInit`` raises LibraryNotFound or DriverNotLoaded, or no device is
  enumerated) every test is skipped with the reason, unless
  ``GPUFLEET_GPU_TESTS_REQUIRED=1`` (tests/gpu/run.sh sets it), which turns the
  skip into a failure so a GPU node with a broken driver cannot pass.
* ``GPUFLEET_GPU_TESTS_BACKEND=sim``: ``SimulatedNVML(gpus=8)`` in place of
  the module, through the same code path, to check the suite itself anywhere.

``GPUFLEET_GPU_REPORT=PATH`` writes a JSON report of the run (GPU model,
driver, timings, metric families present and absent, test outcomes) for
docs/hardware-validation.md; the same facts are printed in the terminal summary.
"""

from __future__ import annotations

import json
import os
import platform
import time
from importlib import metadata
from pathlib import Path
from typing import Any

import pynvml
import pytest

BACKEND_ENV = "GPUFLEET_GPU_TESTS_BACKEND"
REQUIRED_ENV = "GPUFLEET_GPU_TESTS_REQUIRED"
REPORT_ENV = "GPUFLEET_GPU_REPORT"

HERE = Path(__file__).resolve().parent

# Filled by the fixtures and tests of this directory; written at the end of the session.
REPORT: dict[str, Any] = {}
_OUTCOMES: dict[str, str] = {}


def _unavailable(reason: str) -> None:
    if os.environ.get(REQUIRED_ENV, "") not in ("", "0"):
        pytest.fail(f"{reason} ({REQUIRED_ENV} is set: a GPU is required here)", pytrace=False)
    pytest.skip(reason)


def _open_real_nvml() -> Any:
    try:
        pynvml.nvmlInit()
    except pynvml.NVMLError_LibraryNotFound:
        _unavailable("no NVIDIA GPU: NVML library libnvidia-ml.so.1 not found (no driver installed); "
                     f"set {BACKEND_ENV}=sim to run the suite against the simulator")
    except pynvml.NVMLError_DriverNotLoaded:
        _unavailable("no NVIDIA GPU: the NVIDIA kernel driver is not loaded")
    except pynvml.NVMLError as exc:
        pytest.fail(f"nvmlInit failed on a machine with an NVIDIA driver: {exc} ({type(exc).__name__})",
                    pytrace=False)
    count = pynvml.nvmlDeviceGetCount()
    if count == 0:
        pynvml.nvmlShutdown()
        _unavailable("no NVIDIA GPU: NVML initialised but enumerates 0 devices")
    return pynvml


@pytest.fixture(scope="session")
def backend_name() -> str:
    name = os.environ.get(BACKEND_ENV, "nvml").strip().lower() or "nvml"
    if name not in ("nvml", "sim"):
        pytest.fail(f"{BACKEND_ENV}={name!r}: use 'nvml' (default, the real library) or 'sim'", pytrace=False)
    return name


@pytest.fixture(scope="session")
def nvml(backend_name: str):
    """The NVML module the collector is given, initialised for the tests' own direct calls.

    NVML counts nvmlInit calls, so the collectors' own init/shutdown does not
    disturb this session.
    """
    if backend_name == "sim":
        from exporters.gpu_sim import SimulatedNVML

        lib: Any = SimulatedNVML(gpus=8)
        lib.nvmlInit()
    else:
        lib = _open_real_nvml()
    REPORT["backend"] = backend_name
    yield lib
    try:
        lib.nvmlShutdown()
    except pynvml.NVMLError:
        pass


@pytest.fixture(scope="session")
def handles(nvml) -> list[Any]:
    return [nvml.nvmlDeviceGetHandleByIndex(i) for i in range(nvml.nvmlDeviceGetCount())]


@pytest.fixture(scope="session")
def gpu_report() -> dict[str, Any]:
    return REPORT


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo):
    rep = yield
    if item.path.resolve().is_relative_to(HERE):
        if rep.failed:
            _OUTCOMES[rep.nodeid] = "failed" if rep.when == "call" else "error"
            if rep.when != "call":
                errors = REPORT.setdefault("setup_errors", [])
                text = rep.longreprtext.strip().splitlines()[-1][:500] if rep.longreprtext.strip() else ""
                if text not in errors:
                    errors.append(text)
        elif rep.skipped:
            _OUTCOMES.setdefault(rep.nodeid, "skipped")
            if isinstance(rep.longrepr, tuple):
                reasons = REPORT.setdefault("skip_reasons", [])
                reason = str(rep.longrepr[2]).removeprefix("Skipped: ")
                if reason not in reasons:
                    reasons.append(reason)
        elif rep.when == "call":
            _OUTCOMES.setdefault(rep.nodeid, "passed")
    return rep


def _summary_lines() -> list[str]:
    r = REPORT
    lines = [
        f"backend: {r.get('backend')}  GPUs: {r.get('gpu_count')}  model: {', '.join(r.get('gpu_models', []))}",
        f"driver: {r.get('driver_version')}  CUDA driver: {r.get('cuda_driver_version')}  "
        f"NVML: {r.get('nvml_version')}  architecture: {r.get('architecture')}",
    ]
    t = r.get("timing")
    if t:
        lines.append(
            f"collect: first {t['collect_ms_first']:.1f} ms, steady {t['collect_ms_steady_mean']:.1f} ms "
            f"(min {t['collect_ms_steady_min']:.1f}, max {t['collect_ms_steady_max']:.1f}); "
            f"render {t['render_ms_mean']:.2f} ms; {t['series']} series, {t['payload_bytes']} bytes"
        )
    if "families_present" in r:
        lines.append(f"families present ({len(r['families_present'])}): {' '.join(r['families_present'])}")
        lines.append(f"families absent ({len(r['families_absent'])}): {' '.join(r['families_absent'])}")
    return lines


def pytest_terminal_summary(terminalreporter, exitstatus, config) -> None:
    if not REPORT.get("gpu_count"):
        return
    terminalreporter.write_sep("=", "gpufleet GPU hardware validation")
    for line in _summary_lines():
        terminalreporter.write_line(line)
    path = os.environ.get(REPORT_ENV)
    if path:
        terminalreporter.write_line(f"report written to {path}")


def pytest_sessionfinish(session, exitstatus) -> None:
    path = os.environ.get(REPORT_ENV)
    if not path or not (REPORT or _OUTCOMES):
        return
    report = dict(REPORT)
    report.setdefault("backend", os.environ.get(BACKEND_ENV, "nvml") or "nvml")
    report["generated_at"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    report["python_version"] = platform.python_version()
    try:
        report["nvidia_ml_py_version"] = metadata.version("nvidia-ml-py")
    except metadata.PackageNotFoundError:
        report["nvidia_ml_py_version"] = None
    report["tests"] = dict(sorted(_OUTCOMES.items()))
    report["passed"] = sum(v == "passed" for v in _OUTCOMES.values())
    report["failed"] = sum(v in ("failed", "error") for v in _OUTCOMES.values())
    report["skipped"] = sum(v == "skipped" for v in _OUTCOMES.values())
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    tmp.write_text(json.dumps(report, indent=2, sort_keys=True) + "\n")
    os.replace(tmp, out)
