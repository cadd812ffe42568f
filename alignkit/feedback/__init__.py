"""Feedback without annotators: AI judges and the labels they write (RLAIF).

Every producer here writes the same preference / ranking / KTO files as the simulated
annotators and the app, with provenance in extra fields the trainers ignore.
"""
