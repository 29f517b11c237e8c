"""Transparent checkpoint and restore of a job's whole process tree (CRIU)."""
