"""docs/metrics.md is generated from the descriptors and must be current."""

from exporters import metricsdoc
from exporters.gpu import GpuCollector
from exporters.gpu_sim import SimulatedNVML
from tests.conftest import scrape_collector


def test_committed_catalogue_is_current():
    assert metricsdoc.main(["--check"]) == 0, "run: python -m exporters.metricsdoc --write"


def test_every_emitted_series_is_in_the_catalogue(sim_state):
    sim_state.gpu(0, xid={"79": 1})
    c = GpuCollector(SimulatedNVML(gpus=2, state_file=str(sim_state.path), state_poll_interval=0),
                     expected_count=2, dcgm_compat=True)
    try:
        scrape_collector(c)
        names = set(scrape_collector(c))
    finally:
        c.close()
    documented = metricsdoc.all_metric_names()
    # prometheus_client's parser names counter samples <family>_total
    undocumented = {n for n in names if n not in documented and n.removesuffix("_total") not in documented}
    assert not undocumented
