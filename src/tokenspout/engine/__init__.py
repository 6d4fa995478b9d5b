"""Token producers behind one async interface (see ``interface.Engine``)."""
