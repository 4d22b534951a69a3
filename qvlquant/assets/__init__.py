"""Shipped data: the embedded demo model, the test bed and the demo's text data."""
