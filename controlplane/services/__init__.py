"""services layer."""

from edgefleet.extras import require

# Before any module here imports them: without its extra, this package says
# in one line what to install (edgefleet.extras).
require("server", "sqlalchemy", "psycopg", part="edgefleet.controlplane.services")
