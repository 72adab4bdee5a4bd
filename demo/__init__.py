"""The demo fleet and the small real models it (and the tests) use."""
