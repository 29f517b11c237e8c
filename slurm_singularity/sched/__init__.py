"""sched subsystem."""
