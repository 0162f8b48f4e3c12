"""Memory measurement (tracker) and estimation."""
