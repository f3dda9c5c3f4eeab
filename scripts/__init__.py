"""Maintenance and benchmark scripts; a package so that tests can import them (scripts.make_sample_images)."""
