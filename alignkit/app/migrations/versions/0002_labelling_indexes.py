"""indexes of the labelling queries

Revision ID: 0002
Revises: 0001

Without them each `next` and `submit` scanned every item, assignment or judgement of the campaign
(`benchmarks/app_votes.py`: the first free item by position, the annotator's count of judgements,
the expired assignments); with them each is an index search whatever the campaign's size.
"""

from alembic import op

revision = '0002'
down_revision = '0001'
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table('items', schema=None) as batch_op:
        batch_op.create_index('ix_items_free', ['campaign_id', 'assigned', 'position'], unique=False)
    with op.batch_alter_table('assignments', schema=None) as batch_op:
        batch_op.create_index('ix_assignments_open', ['campaign_id', 'done', 'created_at'], unique=False)
        batch_op.create_index('ix_assignments_user_open', ['user_id', 'campaign_id', 'done'], unique=False)
    with op.batch_alter_table('judgements', schema=None) as batch_op:
        batch_op.create_index('ix_judgements_campaign_user', ['campaign_id', 'user_id'], unique=False)


def downgrade() -> None:
    with op.batch_alter_table('judgements', schema=None) as batch_op:
        batch_op.drop_index('ix_judgements_campaign_user')
    with op.batch_alter_table('assignments', schema=None) as batch_op:
        batch_op.drop_index('ix_assignments_user_open')
        batch_op.drop_index('ix_assignments_open')
    with op.batch_alter_table('items', schema=None) as batch_op:
        batch_op.drop_index('ix_items_free')
