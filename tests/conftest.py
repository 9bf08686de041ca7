"""Shared helpers for the test suite."""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from demo.stack import poll
from exporters.collector import render
from tests.slurm_fixture import slurm_cluster_fixture, slurm_fixture  # noqa: F401 - one Slurm per session

REPO = Path(__file__).resolve().parent.parent
SHARED_FIXTURES = REPO.parent / "shared" / "fixtures"


def parse(text: bytes | str) -> dict[str, list[tuple[dict[str, str], float]]]:
    """Exposition text -> {sample name: [(labels, value), ...]}."""
    if isinstance(text, bytes):
        text = text.decode()
    out: dict[str, list[tuple[dict[str, str], float]]] = {}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            out.setdefault(s.name, []).append((dict(s.labels), s.value))
    return out


def value(samples: dict, name: str, **labels: str) -> float:
    """The single sample of ``name`` whose labels include ``labels``."""
    hits = [v for lab, v in samples.get(name, []) if all(lab.get(k) == str(x) for k, x in labels.items())]
    assert len(hits) == 1, f"{name}{labels}: {len(hits)} samples in {samples.get(name)}"
    return hits[0]


def scrape_collector(collector) -> dict:
    return parse(render(collector.collect()))


class SimState:
    """Writes the simulator's fault-injection file the way an operator would."""

    def __init__(self, path: Path):
        self.path = path
        self.data: dict = {"gpus": {}}
        self.write()

    def gpu(self, index: int, **settings) -> None:
        self.data.setdefault("gpus", {}).setdefault(str(index), {}).update(settings)
        self.write()

    def set(self, **top) -> None:
        self.data.update(top)
        self.write()

    def write(self) -> None:
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(yaml.safe_dump(self.data))
        os.replace(tmp, self.path)  # atomic, and a new inode the simulator notices


@pytest.fixture
def sim_state(tmp_path: Path) -> SimState:
    return SimState(tmp_path / "state.yaml")


def wait_for(predicate: Callable[[], object], timeout: float = 10.0, interval: float = 0.02):
    try:
        return poll(predicate, timeout, interval)
    except TimeoutError as exc:
        raise AssertionError(str(exc)) from None


def need_binary(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        if os.environ.get("CI"):
            pytest.fail(f"{name} is required in CI (make setup installs it)")
        pytest.skip(f"{name} not installed (run make setup)")
    return path
