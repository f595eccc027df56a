#!/usr/bin/env python3
"""Prints each `layers` variant's per-request overhead over `bare` from criterion's saved
estimates (target/criterion/layers/*/new/estimates.json, median point estimates), and the
ratio the issue's target is about: drain_stack overhead / (timeout + concurrency limit)."""
import json, os, sys
root = sys.argv[1] if len(sys.argv) > 1 else "target/criterion/layers"
med = {}
for name in sorted(os.listdir(root)):
    p = os.path.join(root, name, "new", "estimates.json")
    if os.path.exists(p):
        med[name] = json.load(open(p))["median"]["point_estimate"]
bare = med["bare"]
for k, v in med.items():
    print(f"{k:32s} {v:8.1f} ns   overhead {v - bare:7.1f} ns")
peer = med["timeout_plus_concurrency_limit"] - bare
print(f"ratio drain_stack / peers = {(med['drain_stack'] - bare) / peer:.2f}")
if "drain_stack_response_timeout" in med:
    print(f"ratio drain_stack_response_timeout / peers = {(med['drain_stack_response_timeout'] - bare) / peer:.2f}")
print(f"reject overhead = {med['reject'] - bare:.1f} ns ({(med['reject'] - bare) / bare * 100:.1f} % of bare)")
