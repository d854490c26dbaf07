"""The teams' web dashboard."""
