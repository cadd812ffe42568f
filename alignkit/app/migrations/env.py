"""Alembic environment: runs on the connection `alignkit.app.db.upgrade` hands it (no alembic.ini needed).

New revision after changing `db.py`:
    alembic -x url=sqlite:///tmp.db revision --autogenerate -m "what changed"   (from this folder's parent, with
    script_location set to this folder), then read and edit what it wrote.
"""

from alembic import context
from sqlalchemy import create_engine

from alignkit.app.db import Base

config = context.config
connection = config.attributes.get("connection")
if connection is None:  # the alembic command line: the URL comes from `-x url=...`
    connection = create_engine(context.get_x_argument(as_dictionary=True)["url"]).connect()
context.configure(connection=connection, target_metadata=Base.metadata, render_as_batch=True)
with context.begin_transaction():
    context.run_migrations()
