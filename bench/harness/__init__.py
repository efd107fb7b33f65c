"""The measuring harness, independent of what is measured: timers, alternation of variants
within one run, summary statistics, contention on a shared machine, deadlines and the
machine record. Scenarios (bench/scenarios) use it; report writers never do."""
from .deadline import NO_DEADLINE, Deadline
from .machine import device_slug, environment, pick_device
from .stats import summary
from .timers import sync, time_fn

__all__ = ["NO_DEADLINE", "Deadline", "device_slug", "environment", "pick_device", "summary", "sync", "time_fn"]
