"""Tests of the data pipeline room."""
