"""Resource backends: the inferos kernel driver client (driver.py)."""
