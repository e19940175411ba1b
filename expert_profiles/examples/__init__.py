"""Example data for `steermoe profile detect`."""
