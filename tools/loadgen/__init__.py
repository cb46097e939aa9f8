"""MQTT load generator for `make bench`: multi-process, pre-encoded, header-walking.

`python -m tools.loadgen --port 1883` runs the benchmark scenarios against a broker that is
already running; `tools.bench` starts MeshMQ and mosquitto and compares them. Modules:
`wire` (raw encoders and scanners), `clients` (asyncio protocols), `worker` (one generator
process), `runner` (processes, phases, CPU/RSS sampling), `scenarios` (workloads and metrics).
"""

from tools.loadgen.scenarios import SCENARIOS, Metric, Params, ScenarioResult, run_scenario

__all__ = ["SCENARIOS", "Metric", "Params", "ScenarioResult", "run_scenario"]
