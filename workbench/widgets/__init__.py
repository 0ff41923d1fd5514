"""Reusable widgets: plots, sparkline rows and stat panels."""
