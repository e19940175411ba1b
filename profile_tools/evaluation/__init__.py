"""Measuring steering: `steermoe eval` (behaviour rate per steering setting, with its side
effect on a control set) and `steermoe audit` (how refusal falls as safety experts are
suppressed)."""
