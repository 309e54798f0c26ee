"""Duplicate finding: similar pairs at scale (graph), groups and keep rules (finder), actions with undo, reports."""
