"""Throughput telemetry: FLOPs and MFU (flops), per-phase timers (timer), peak memory
(memory), NVML power and energy (nvml), TensorBoard/JSON-lines metrics reduced over
ranks (writer) and the tables ``ear-dist bench`` prints (report)."""
