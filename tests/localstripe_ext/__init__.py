"""localstripe extended with what Berth's billing needs (see server.py)."""
