"""Fraud scoring: probability, decision, reason codes, and the labels that teach it."""
