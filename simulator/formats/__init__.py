"""Wire formats of the simulated provider APIs, one module per format."""
