"""The demo fleet and the small real models it (and the tests) use."""

from edgefleet.extras import require

# The demo runs a control plane and trains with scikit-learn: without those,
# one line says what to install (edgefleet.extras).
require("server", part="edgefleet.demo")
require("demo", part="edgefleet.demo")
