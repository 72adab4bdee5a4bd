"""SQL storage: typed models, engine set-up and the unit of work."""

from edgefleet.extras import require

# Before any module here imports them: without its extra, this package says
# in one line what to install (edgefleet.extras).
require("server", "sqlalchemy", "alembic", part="edgefleet.controlplane.db")
